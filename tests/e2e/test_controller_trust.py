"""Controller trust: replays against rebuilt hosts, fetches re-checked in the auditing transaction,
acks from unknown keys. Real controller, real agents, real SSH, real Kafka."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole, generate_signing_key
from ckms.errors import PermissionDeniedError, SealedError, TransportError
from ckms.protocol import FetchRequest, InstallSpec, SyncRequest, Targets
from ckms.store import audit as audit_log
from ckms_agent.daemon import Agent, HostRevokedError
from ckms_agent.enroll import enroll
from tests.support.cli import send_installed_ack
from tests.support.fleet import agent_config, enroll_agent, host_rpc, running_agent, wait_until
from tests.support.kafka import link_as

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}
RAW = InstallSpec(path="/etc/ckms/{team}/{purpose}.key", format="raw")


Record = tuple[bytes, list[tuple[str, bytes]]]


async def _topic_records(kafka: KafkaLink, topic: str) -> list[Record]:
    """Every record on ``topic`` so far (value, headers), as one with read access sees it."""
    consumer = AIOKafkaConsumer(
        topic, **kafka.client_args(group_id=None, auto_offset_reset="earliest")
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
        return [(r.value, list(r.headers)) for rs in batches.values() for r in rs]
    finally:
        await consumer.stop()


async def test_a_rebuilt_host_ignores_the_revocation_of_its_predecessor(
    controller: Controller, tmp_path: Path
) -> None:
    """A host revoked, then re-enrolled under the same name with ``enroll --force``: a copy of
    the old signed ``host.revoked`` sent to the topic again does not wipe the new host."""
    c = controller
    config = await enroll_agent(c, tmp_path, "web-1", WEB)
    await c.lifecycle.create(
        "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="alice"
    )
    path = tmp_path / "web-1" / "root" / "etc/ckms/web/tls.key"
    agent = Agent(agent_config(config))
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(path.exists, what="first install")
        await c.hosts.revoke("web-1", actor="alice")
        with pytest.raises(HostRevokedError):
            await asyncio.wait_for(task, 30)
    finally:
        agent.stop()
    assert not path.exists()

    token = await c.hosts.create_token("web-1", WEB, actor="alice")
    await enroll(
        controller_host="127.0.0.1",
        controller_port=c.port,
        token=token.token,
        host_key_fingerprint=c.host_key_fingerprint,
        state_dir=tmp_path / "web-1" / "state",
        config_path=config,
        root=tmp_path / "web-1" / "root",
        force=True,
    )
    assert agent_config(config).event_seq_floor > 0
    old = [
        r
        for r in await _topic_records(
            link_as(c, SubjectRole.SUBSCRIBER, "reader"), c.settings.events_topic
        )
        if b'"host.revoked"' in r[0]
    ]
    assert len(old) == 1
    again = Agent(agent_config(config))
    task = asyncio.create_task(again.run())
    try:
        await wait_until(path.exists, what="install after re-enrollment")
        # An attacker with write access to the topic (the controller's Kafka certificate)
        # sends the signed revocation again.
        producer = AIOKafkaProducer(**c.settings.kafka.client_args())
        await producer.start()
        try:
            value, headers = old[0]
            await producer.send_and_wait(c.settings.events_topic, value, headers=headers)
        finally:
            await producer.stop()
        await c.lifecycle.rotate("web/tls", actor="alice")

        async def has_v2() -> bool:
            return path.read_bytes() == await c.vault.material("web/tls", 2)

        # One partition: the rotation comes after the replayed record, which was dropped.
        await wait_until(has_v2, what="v2 installed after the replayed revocation")
        assert not task.done()
        assert again._subscriber is not None
        assert again._subscriber.stats.get("replayed", 0) >= 1
    finally:
        again.stop()
        with contextlib.suppress(HostRevokedError):
            await asyncio.wait_for(task, 30)
    assert path.exists()


async def test_a_fetch_for_a_key_retargeted_meanwhile_is_not_sent(
    controller: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Targets changed between authorization and the auditing transaction: nothing is sent."""
    c = controller
    config = await enroll_agent(c, tmp_path, "host-t", {"env": "prod", "role": "db"})
    await c.lifecycle.create(
        "db/main", "aes-256", targets=Targets(hosts=("host-t",), env="prod"), actor="alice"
    )
    authorize = c.agents._wrap

    async def retargeted_right_after_authorization(*args: object) -> object:
        reply = await authorize(*args)  # type: ignore[arg-type]
        await c.lifecycle.set_targets(
            "db/main", Targets(selectors=({"role": "nothing"},), env="prod"), actor="alice"
        )
        return reply

    monkeypatch.setattr(c.agents, "_wrap", retargeted_right_after_authorization)
    async with host_rpc(c, config) as rpc:
        with pytest.raises(PermissionDeniedError, match="retargeted meanwhile"):
            await rpc.call("fetch", FetchRequest(key="db/main", version=1).model_dump())
    assert c.store is not None
    records = await audit_log.load_records(c.store)
    assert not [r for r in records if r.action == "key.fetch" and r.outcome == "ok"]
    changed_at = next(i for i, r in enumerate(records) if r.action == "key.set_targets")
    assert any(r.outcome == "refused" and r.actor == "host:host-t" for r in records[changed_at:])


async def test_a_stranger_cannot_deliver_acks_and_a_new_host_can_at_once(
    controller: Controller, tmp_path: Path
) -> None:
    """Acks ride the host's own SSH connection: a key the controller does not know is refused
    at login, before any ack is read; a host enrolled since has its acks applied at once."""
    c = controller
    stranger = generate_signing_key()
    for name in ("nobody", "web-3"):  # an unknown name, and the name about to be enrolled
        with pytest.raises(TransportError, match="refused the key"):
            await send_installed_ack(c, stranger, name, "web/tls", 1, "sha256:" + "0" * 64, 1)
    assert c.acks.stats.applied == 0 and not c.acks.stats.dropped

    config = await enroll_agent(c, tmp_path, "web-3", WEB)
    await c.lifecycle.create(
        "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="alice"
    )
    async with running_agent(config):

        async def acked() -> bool:
            assert c.store is not None
            return bool(
                await c.store.fetchall(
                    "SELECT 1 FROM fleet_state WHERE host_id = 'web-3' AND status = 'installed'"
                )
            )

        await wait_until(acked, what="ack of the new host applied")


async def test_enrollment_is_refused_while_sealed(controller: Controller, tmp_path: Path) -> None:
    """What enrollment pins is only checked once unsealed, so a sealed controller enrolls no one."""
    c = controller
    token = await c.hosts.create_token("web-4", WEB, actor="alice")
    await c.vault.seal(actor="alice")
    with pytest.raises(SealedError):
        await enroll(
            controller_host="127.0.0.1",
            controller_port=c.port,
            token=token.token,
            host_key_fingerprint=c.host_key_fingerprint,
            state_dir=tmp_path / "web-4" / "state",
            config_path=tmp_path / "web-4" / "agent.toml",
            root=tmp_path / "web-4" / "root",
        )
    assert not (tmp_path / "web-4" / "agent.toml").exists()
    assert c.store is not None
    assert await c.store.fetchone("SELECT 1 FROM hosts WHERE id = 'web-4'") is None


async def test_an_agent_enrolled_before_keyed_digests_asks_for_the_digest_key_once(
    controller: Controller, tmp_path: Path
) -> None:
    """No digest key on the host (enrolled by an older agent): it asks, stores it 0600, and
    installs only material whose keyed digest matches."""
    c = controller
    config = await enroll_agent(c, tmp_path, "web-5", WEB)
    digest_key = agent_config(config).digest_key_path
    assert digest_key.stat().st_mode & 0o777 == 0o600
    given = digest_key.read_bytes()
    digest_key.unlink()
    await c.lifecycle.create(
        "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="alice"
    )
    path = tmp_path / "web-5" / "root" / "etc/ckms/web/tls.key"
    assert c.store is not None
    store = c.store

    async def acked() -> list[str]:
        rows = await store.fetchall("SELECT digest FROM fleet_state WHERE host_id = 'web-5'")
        return [r["digest"] for r in rows]

    async with running_agent(config):
        await wait_until(path.exists, what="install with a digest key asked for")
        digests = await wait_until(acked, what="install acked")
    assert digest_key.read_bytes() == given and digest_key.stat().st_mode & 0o777 == 0o600
    assert digests == [c.vault.digest(await c.vault.material("web/tls", 1))]


async def test_a_sealed_controller_answers_no_host(controller: Controller, tmp_path: Path) -> None:
    """While sealed, rows cannot be checked: a host's sync is refused (it keeps what it has)
    rather than answered from targets nobody verified."""
    c = controller
    config = await enroll_agent(c, tmp_path, "web-6", WEB)
    await c.vault.seal(actor="alice")
    async with host_rpc(c, config) as rpc:
        with pytest.raises(SealedError):
            await rpc.call("sync", SyncRequest().model_dump())


@pytest.mark.parametrize("channel", [True, False], ids=["channel", "exec"])
async def test_a_revoked_host_loses_its_open_connection_at_once(
    controller: Controller, tmp_path: Path, channel: bool
) -> None:
    """Authentication is once per connection: a host revoked while connected (its long-lived
    channel, or exec requests on a kept connection) is cut off at once, not only refused
    request by request, and cannot come back."""
    c = controller
    config = await enroll_agent(c, tmp_path, "web-1", WEB)
    beat = SyncRequest().model_dump(mode="json")
    async with host_rpc(c, config, channel=channel) as rpc:
        assert rpc.multiplexed is channel
        await rpc.call("heartbeat", beat)
        await c.hosts.revoke("web-1", actor="alice")
        with pytest.raises(TransportError):
            await rpc.call("heartbeat", beat)
        with pytest.raises(TransportError, match="refused the key"):
            await rpc.connect()
