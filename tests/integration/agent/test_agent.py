"""The real Agent against a real SSH RPC server and a real Kafka broker, run in-process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from agent_harness import TOKEN, World, wait_until

from ckms.crypto import generate_signing_key
from ckms.protocol import AckStatus, Envelope, EventType, InstallSpec, SignedMessage
from ckms_agent.daemon import Agent, HostRevokedError
from ckms_agent.enroll import enroll
from ckms_agent.files import TEMP_MARK
from ckms_agent.status import collect_status

pytestmark = pytest.mark.kafka

KEY = "payments/db"
RAW = InstallSpec(path="/etc/ckms/{team}/{purpose}.key")


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        agent.stop()
        with contextlib.suppress(HostRevokedError):
            await asyncio.wait_for(task, 20)


def mode_of(path) -> int:
    return path.stat().st_mode & 0o7777


async def test_enroll_run_install_ack_rotate_and_revoke(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ctl = world.controller
    key = ctl.add_key(KEY, install=RAW)
    path = world.host_path("/etc/ckms/payments/db.key")
    agent = Agent(world.config())
    trust = world.agent_public()
    async with running(agent):
        # First sync installs v1 with the exact bytes and mode 0600.
        await wait_until(path.exists, what="the key file")
        assert path.read_bytes() == key.versions[1].material
        assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
        ack = await world.ack_reader.wait_for(trust, lambda a: a.data.version == 1)
        assert ack.type is EventType.ACK
        assert (ack.data.agent, ack.data.key, ack.data.status) == ("web-1", KEY, "installed")
        assert ack.data.digest == key.versions[1].digest and ack.data.event_id is None

        # A rotation event: fetched, checked, installed, acked with the event's id.
        v2 = ctl.rotate(KEY)
        rotated = ctl.rotated_event(KEY, v2)
        await ctl.publish(rotated)
        await wait_until(lambda: path.read_bytes() == key.versions[v2].material, what="v2")
        ack2 = await world.ack_reader.wait_for(
            trust, lambda a: a.data.version == v2 and a.data.event_id is not None
        )
        assert ack2.data.status == "installed" and ack2.data.digest == key.versions[v2].digest
        assert ack2.data.event_id == _event_id(rotated.value)
        assert [a.seq for a in world.ack_reader.acks] == sorted(
            a.seq for a in world.ack_reader.acks
        )

        # A forged revocation (another signer) is dropped, logged, counted; nothing changes.
        intruder = generate_signing_key()
        await ctl.publish(ctl.revoked_event(KEY, v2, signer=intruder))
        await wait_until(lambda: agent.event_stats.get("unknown-signer", 0) >= 1, what="drop")
        assert any(
            "dropped event" in r.getMessage() and "unknown-signer" in r.getMessage()
            for r in caplog.records
        )
        assert path.read_bytes() == key.versions[v2].material

        # The controller goes away; a signed revocation still removes the key at once.
        await ctl.stop()
        revoked = ctl.revoked_event(KEY, v2)
        await ctl.publish(revoked)
        await wait_until(lambda: not path.exists(), what="removal after revocation")
        # Its ack waits in the host's queue (acks ride the SSH connection) until it is back.
        assert await agent.state.pending_ack_count() >= 1
        assert not any(
            json.loads(v)["data"]["status"] == "removed" for v, _ in world.ack_reader.raw
        )
        await ctl.start()
        removed = await world.ack_reader.wait_for(
            trust, lambda a: a.data.status == "removed" and a.data.version == v2
        )
        assert removed.data.event_id == _event_id(revoked.value)
        assert not [p for p in path.parent.iterdir() if TEMP_MARK in p.name]
        status = await collect_status(agent.config)
        assert status.keys == [] and status.last_contact is not None

    # Key material never reached a log line, in any encoding.
    material = [v.material for v in key.versions.values()]
    text = "\n".join(r.getMessage() for r in caplog.records)
    for m in material:
        for form in (m.hex(), base64.b64encode(m).decode(), base64.urlsafe_b64encode(m).decode()):
            assert form.rstrip("=") not in text
    assert "fetched key=payments/db version=2" in text


async def test_digest_mismatch_on_fetch_is_refused(world: World) -> None:
    ctl = world.controller
    ctl.add_key(KEY, install=RAW)
    ctl.corrupt.add((KEY, 1))
    path = world.host_path("/etc/ckms/payments/db.key")
    agent = Agent(world.config())
    trust = world.agent_public()
    async with running(agent):
        failed = await world.ack_reader.wait_for(trust, lambda a: a.data.status == "failed")
        assert failed.data.version == 1 and "does not match the digest" in failed.data.error
        assert not path.exists()
        assert not path.parent.exists() or not list(path.parent.iterdir())
        # Once the controller serves the right material, the next sync installs it.
        ctl.corrupt.clear()
        await ctl.publish(ctl.rotated_event(KEY, 1))
        await wait_until(path.exists, what="install after the fix")
        assert path.read_bytes() == ctl.keys[KEY].versions[1].material


async def test_keyring_rotation_and_revocation_rewrites_locally(world: World) -> None:
    ctl = world.controller
    spec = InstallSpec(path="/keys/{team}_{purpose}.json", format="keyring-json", mode=0o640)
    key = ctl.add_key(KEY, install=spec)
    v2 = ctl.rotate(KEY)
    path = world.host_path("/keys/payments_db.json")
    agent = Agent(world.config())
    trust = world.agent_public()
    async with running(agent):
        await wait_until(path.exists, what="the keyring")
        import json

        ring = json.loads(path.read_bytes())
        assert [(e["version"], e["primary"]) for e in ring["versions"]] == [(1, False), (2, True)]
        assert mode_of(path) == 0o640
        # Revoke the old version while the controller is down: the keyring is rewritten from
        # what the agent has, without v1, and v2 stays usable.
        await ctl.stop()
        del key.versions[1]
        await ctl.publish(ctl.revoked_event(KEY, 1))
        await wait_until(
            lambda: [e["version"] for e in json.loads(path.read_bytes())["versions"]] == [v2],
            what="keyring without v1",
        )
        ring = json.loads(path.read_bytes())
        assert ring["primary"] == v2
        assert base64.b64decode(ring["versions"][0]["material"]) == key.versions[v2].material
        await ctl.start()  # the ack waited in the host's queue for the controller
        await world.ack_reader.wait_for(
            trust, lambda a: a.data.status == "removed" and a.data.version == 1
        )


async def test_staleness_removes_keys_without_controller_contact(world: World) -> None:
    ctl = world.controller
    ctl.add_key(KEY, install=RAW, max_staleness_s=60)
    path = world.host_path("/etc/ckms/payments/db.key")
    offset = [0.0]
    import time

    agent = Agent(world.config(), clock=lambda: time.time() + offset[0])
    trust = world.agent_public()
    async with running(agent):
        await wait_until(path.exists, what="the key file")
        await ctl.stop()
        await wait_until(lambda: not agent.connected, what="disconnect")
        offset[0] = 120.0  # two minutes without contact: past the key's 60 s
        await wait_until(lambda: not path.exists(), what="stale key removed")
        await ctl.start()  # the ack waited in the host's queue for the controller
        ack = await world.ack_reader.wait_for(trust, lambda a: a.data.status == "removed")
        assert "stale" in (ack.data.error or "") or ack.data.version == 1


async def test_cancelling_run_is_a_clean_stop(world: World) -> None:
    ctl = world.controller
    key = ctl.add_key(KEY, install=RAW)
    path = world.host_path("/etc/ckms/payments/db.key")
    agent = Agent(world.config())
    task = asyncio.create_task(agent.run())
    await wait_until(path.exists, what="the key file")
    v2 = ctl.rotate(KEY)
    await ctl.publish(ctl.rotated_event(KEY, v2))
    await wait_until(lambda: ctl.calls.count(("web-1", "fetch")) >= 2, what="the v2 fetch")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    assert not [p for p in path.parent.iterdir() if TEMP_MARK in p.name]
    status = await collect_status(agent.config)
    [held] = status.keys
    # Whatever the cancel interrupted, the record matches the file on disk.
    assert held.intact
    on_disk = path.read_bytes()
    primary = next(v for v in held.versions if v.primary)
    assert on_disk == key.versions[primary.version].material


async def test_host_revocation_drops_every_key_and_stops(world: World) -> None:
    ctl = world.controller
    ctl.add_key(KEY, install=RAW)
    ctl.add_key("app/sig", install=InstallSpec(path="/keys/{purpose}.key"))
    paths = [world.host_path("/etc/ckms/payments/db.key"), world.host_path("/keys/sig.key")]
    agent = Agent(world.config())
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: all(p.exists() for p in paths), what="both keys")
        await ctl.publish(ctl.event(EventType.HOST_REVOKED, {"host": "web-2"}))
        await ctl.publish(ctl.event(EventType.HOST_REVOKED, {"host": "web-1"}))
        with pytest.raises(HostRevokedError):
            await asyncio.wait_for(task, 30)
    finally:
        agent.stop()
    assert not any(p.exists() for p in paths)
    acks = await world.ack_reader.wait_for(
        world.agent_public(), lambda a: a.data.key == "app/sig" and a.data.status == "removed"
    )
    assert acks.data.status is AckStatus.REMOVED
    status = await collect_status(agent.config)
    assert status.revoked and status.keys == []
    with pytest.raises(HostRevokedError, match="re-enroll"):
        await Agent(world.config()).run()

    # Re-enrolled with --force (new keys, state reset): the host converges again.
    await enroll(
        controller_host="127.0.0.1",
        controller_port=ctl.port,
        token=TOKEN,
        host_key_fingerprint=ctl.fingerprint,
        state_dir=world.tmp / "state",
        config_path=world.config_path,
        root=world.root,
        force=True,
    )
    again = Agent(world.config())
    async with running(again):
        await wait_until(lambda: all(p.exists() for p in paths), what="keys after re-enroll")


def _event_id(value: bytes) -> str:
    import json

    return json.loads(value)["id"]


def _rollout_event(world: World, version: int, state: str, stage: int) -> SignedMessage:
    key = world.controller.keys[KEY]
    return world.controller.event(
        EventType.KEY_ROLLOUT,
        {
            "key": KEY,
            "key_id": "kid-" + KEY.replace("/", "-"),
            "version": version,
            "state": state,
            "stage": stage,
            "stages": [50, 100],
            "gate": "healthy",
            "released": 1,
            "targets": key.targets.model_dump(mode="json"),
        },
    )


async def test_a_stage_resumed_after_a_failed_health_check_is_tried_again_at_once(
    world: World,
) -> None:
    """The host's health check refuses v2 (its stage halts); the abort and the resume reach it
    together, so every sync asks for the same v2: the resume's ``key.rollout`` makes the agent
    try again at once (not after the reconcile interval's hold-off), and a later stage's event
    has it acknowledge the v2 it holds again."""
    broken = world.tmp / "broken"
    world.set_policy(hooks={"gate": {"health": ["sh", "-c", f"test ! -e {broken}"]}})
    ctl = world.controller
    spec = InstallSpec(path="/keys/{team}_{purpose}.json", format="keyring-json", health="gate")
    key = ctl.add_key(KEY, install=spec)
    path = world.host_path("/keys/payments_db.json")
    agent = Agent(world.config())
    trust = world.agent_public()

    def acked(status: str) -> Callable[[Envelope], bool]:
        return lambda a: a.data.version == 2 and a.data.status == status

    async with running(agent):
        await wait_until(path.exists, what="the keyring with v1")
        broken.touch()
        ctl.rotate(KEY)
        key.versions[2].primary, key.versions[1].primary = False, True
        key.versions[2].state = "PreActive"
        await ctl.publish(_rollout_event(world, 2, "running", 1))
        await world.ack_reader.wait_for(trust, acked("failed"), timeout_s=60)
        assert [e["version"] for e in json.loads(path.read_bytes())["versions"]] == [1]

        broken.unlink()  # the fix; the controller's desired state for the host is unchanged
        await ctl.publish(
            _rollout_event(world, 2, "halted", 1),
            _rollout_event(world, 2, "rolled-back", 1),
            _rollout_event(world, 2, "running", 1),
        )
        # Well within the hold-off (0.9 of the 300 s reconcile interval), on a busy machine too.
        await world.ack_reader.wait_for(trust, acked("installed"), timeout_s=60)
        assert [e["version"] for e in json.loads(path.read_bytes())["versions"]] == [1, 2]

        await ctl.publish(_rollout_event(world, 2, "running", 2))

        async def acked_twice() -> bool:
            await world.ack_reader.poll(trust)
            return sum(1 for a in world.ack_reader.acks if acked("installed")(a)) >= 2

        await wait_until(acked_twice, 60, "v2 acknowledged again for the next stage")
        assert {a.data.digest for a in world.ack_reader.acks if acked("installed")(a)} == {
            key.versions[2].digest
        }
