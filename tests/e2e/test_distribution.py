"""Whole flows: a real controller, real agents, real SSH, real Kafka, real files in temp dirs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from ckms.crypto import generate_signing_key
from ckms.errors import NotDistributableError, PermissionDeniedError, TransportError
from ckms.protocol import (
    EventType,
    FetchRequest,
    InstallSpec,
    RevocationReason,
    SyncReply,
    SyncRequest,
    Targets,
    encode_event,
)
from ckms.ssh import generate_ssh_key
from ckms.store import audit as audit_log
from ckms_agent.enroll import enroll
from ckms_agent.identity import load_keys
from tests.support.acks import publish
from tests.support.fleet import agent_config, enroll_agent, host_rpc, running_agent, wait_until

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}
KEYRING = InstallSpec(path="/etc/ckms/{team}/{purpose}.json", format="keyring-json")


async def converged(c: Controller, key: str, hosts: set[str]) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return {s.host for s in status if s.converged} >= hosts


def keyring(root: Path) -> dict:
    return json.loads((root / "etc/ckms/web/tls.json").read_bytes())


async def test_enroll_install_rotate_revoke(controller: Controller, tmp_path: Path) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "web-1", WEB)
    root = tmp_path / "web-1" / "root"
    async with running_agent(config):
        key = await c.lifecycle.create(
            "web/tls",
            "aes-256",
            targets=Targets(selectors=(WEB,)),
            install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key", format="raw"),
            actor="alice",
        )
        path = root / "etc/ckms/web/tls.key"
        await wait_until(lambda: converged(c, "web/tls", {"web-1"}), what="first install acked")
        assert path.read_bytes() == await c.vault.material("web/tls", 1)
        assert path.stat().st_mode & 0o777 == 0o600
        assert key.version(1).digest

        await c.lifecycle.set_targets("web/tls", key.targets, install=KEYRING, actor="alice")
        await c.lifecycle.rotate("web/tls", actor="alice")
        await wait_until(lambda: converged(c, "web/tls", {"web-1"}), what="rotation acked")
        ring = keyring(root)
        assert ring["primary"] == 2
        assert [v["version"] for v in ring["versions"]] == [1, 2]  # v1 kept for its grace
        v1 = base64.b64decode(ring["versions"][0]["material"])
        assert v1 == await c.vault.material("web/tls", 1)

        await c.lifecycle.revoke(
            "web/tls", RevocationReason.KEY_COMPROMISE, version=1, actor="alice"
        )

        async def v1_removed() -> bool:
            assert c.store is not None
            rows = await c.store.fetchall(
                "SELECT status FROM fleet_state WHERE host_id = 'web-1' AND version = 1"
            )
            return [r["status"] for r in rows] == ["removed"]

        await wait_until(v1_removed, what="removal acked")
        assert [v["version"] for v in keyring(root)["versions"]] == [2]
        assert v1 not in (root / "etc/ckms/web/tls.json").read_bytes()
    # The whole story is in the audit log, which verifies.
    assert c.store is not None
    records = await audit_log.load_records(c.store)
    actions = [r.action for r in records]
    for action in ("host.enroll", "key.create", "key.fetch", "fleet.ack", "key.revoke"):
        assert action in actions
    report = await audit_log.verify_store(c.store, await c.vault.public_key())
    assert report.ok


async def test_a_stopped_agent_converges_through_sync(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "web-2", WEB)
    root = tmp_path / "web-2" / "root"
    await c.lifecycle.create(
        "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=KEYRING, actor="alice"
    )
    async with running_agent(config):
        await wait_until(lambda: converged(c, "web/tls", {"web-2"}), what="first install")
    # While the agent is down: a rotation and a revocation.
    await c.lifecycle.rotate("web/tls", actor="alice")
    await c.lifecycle.revoke("web/tls", RevocationReason.KEY_COMPROMISE, version=1, actor="alice")
    assert [v["version"] for v in keyring(root)["versions"]] == [1]
    async with running_agent(config):
        await wait_until(lambda: converged(c, "web/tls", {"web-2"}), what="converged after restart")
        assert [v["version"] for v in keyring(root)["versions"]] == [2]


@pytest.mark.requirement("SP800-130-DISTRIBUTE", "PCI-3.7.2")
async def test_a_host_cannot_fetch_a_key_targeted_at_another(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config_a = await enroll_agent(c, tmp_path, "host-a", {"env": "prod", "role": "db"})
    await enroll_agent(c, tmp_path, "host-b", WEB)
    await c.lifecycle.create(
        "web/tls", "aes-256", targets=Targets(hosts=("host-b",), env="prod"), actor="alice"
    )
    async with host_rpc(c, config_a) as rpc:
        with pytest.raises(PermissionDeniedError, match="not a target of web/tls"):
            await rpc.call("fetch", FetchRequest(key="web/tls", version=1).model_dump())
        # Asking along with a sync is authorized the same way: only db/main v1 comes back,
        # and the refusals are audited, while the sync itself is still answered.
        await c.lifecycle.create(
            "db/main", "aes-256", targets=Targets(hosts=("host-a",), env="prod"), actor="alice"
        )
        asked = SyncRequest(
            fetch=(
                FetchRequest(key="db/main", version=1),
                FetchRequest(key="web/tls", version=1),
                FetchRequest(key="db/main", version=7),
            )
        )
        reply = SyncReply.model_validate(await rpc.call("sync", asked.model_dump(mode="json")))
        assert [(m.key, m.version) for m in reply.material] == [("db/main", 1)]
        assert [k.key for k in reply.keys] == ["db/main"]
    assert c.store is not None
    records = [r for r in await audit_log.load_records(c.store) if r.actor == "host:host-a"]
    refused = [r for r in records if r.outcome == "refused"]
    assert refused[0].object == "rpc:fetch"
    assert [(r.action, r.object, r.details["version"]) for r in refused[1:]] == [
        ("key.fetch", "key:web/tls", 1),
        ("key.fetch", "key:db/main", 7),
    ]
    fetched = [r for r in records if r.action == "key.fetch" and r.outcome == "ok"]
    assert [(r.object, r.details["version"]) for r in fetched] == [("key:db/main", 1)]
    assert not (tmp_path / "host-a" / "root").exists() or not any(
        (tmp_path / "host-a" / "root").rglob("*.key")
    )


@pytest.mark.requirement("PCI-3.7.2")
async def test_material_revoked_while_a_fetch_is_served_is_not_sent(
    controller: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "host-r", {"env": "prod", "role": "db"})
    await c.lifecycle.create(
        "db/main", "aes-256", targets=Targets(hosts=("host-r",), env="prod"), actor="alice"
    )
    assert c.agents is not None
    authorize = c.agents._wrap

    async def revoked_right_after_authorization(*args: object) -> object:
        reply = await authorize(*args)  # type: ignore[arg-type]
        await c.lifecycle.revoke(
            "db/main", RevocationReason.KEY_COMPROMISE, version=1, actor="alice"
        )
        return reply

    monkeypatch.setattr(c.agents, "_wrap", revoked_right_after_authorization)
    async with host_rpc(c, config) as rpc:
        with pytest.raises(PermissionDeniedError, match=r"(revoked meanwhile|not distributable)"):
            await rpc.call("fetch", FetchRequest(key="db/main", version=1).model_dump())
    assert c.store is not None
    records = await audit_log.load_records(c.store)
    assert not [r for r in records if r.action == "key.fetch" and r.outcome == "ok"]
    revoked_at = next(i for i, r in enumerate(records) if r.action == "key.revoke")
    assert any(r.outcome == "refused" and r.actor == "host:host-r" for r in records[revoked_at:])


async def test_a_fetch_of_a_retired_version_says_so_by_its_own_error_class(
    controller: Controller, tmp_path: Path
) -> None:
    # The agent tells a stale plan (the version was retired after its sync) from a refusal by
    # this class, across the RPC: it syncs again rather than report a failed install.
    c = controller
    config = await enroll_agent(c, tmp_path, "host-d", {"env": "prod", "role": "db"})
    await c.lifecycle.create(
        "db/main", "aes-256", targets=Targets(hosts=("host-d",), env="prod"), actor="alice"
    )
    await c.lifecycle.rotate("db/main", actor="alice")
    await c.lifecycle.deactivate("db/main", 1, actor="alice")
    async with host_rpc(c, config) as rpc:
        with pytest.raises(NotDistributableError, match="version 1 is Deactivated"):
            await rpc.call("fetch", FetchRequest(key="db/main", version=1).model_dump())


@pytest.mark.requirement("PCI-3.7.7")
async def test_the_agent_refuses_a_controller_with_another_host_key(
    controller: Controller, tmp_path: Path
) -> None:
    token = await controller.hosts.create_token("web-9", WEB, actor="alice")
    wrong = "SHA256:" + base64.b64encode(b"\0" * 32).decode().rstrip("=")
    with pytest.raises(TransportError, match="not the pinned"):
        await enroll(
            controller_host="127.0.0.1",
            controller_port=controller.port,
            token=token.token,
            host_key_fingerprint=wrong,
            state_dir=tmp_path / "state",
            config_path=tmp_path / "agent.toml",
        )
    assert not (tmp_path / "agent.toml").exists()


async def test_reused_and_expired_enrollment_tokens_are_refused(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    token = await c.hosts.create_token("web-3", WEB, actor="alice")
    kw = {"controller_host": "127.0.0.1", "controller_port": c.port}
    pin = c.host_key_fingerprint
    await enroll(
        **kw,
        token=token.token,
        host_key_fingerprint=pin,
        state_dir=tmp_path / "a",
        config_path=tmp_path / "a.toml",
    )
    with pytest.raises(PermissionDeniedError, match="already used"):
        await enroll(
            **kw,
            token=token.token,
            host_key_fingerprint=pin,
            state_dir=tmp_path / "b",
            config_path=tmp_path / "b.toml",
        )
    from datetime import timedelta

    short = await c.hosts.create_token("web-4", WEB, actor="alice", ttl=timedelta(seconds=1))
    await asyncio.sleep(1.2)  # let the real clock pass the token's expiry
    with pytest.raises(PermissionDeniedError, match="expired"):
        await enroll(
            **kw,
            token=short.token,
            host_key_fingerprint=pin,
            state_dir=tmp_path / "c",
            config_path=tmp_path / "c.toml",
        )


async def test_a_forged_event_is_ignored_and_the_agent_keeps_working(
    controller: Controller, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "web-5", WEB)
    caplog.set_level(logging.WARNING)
    async with running_agent(config) as agent:
        await c.lifecycle.create(
            "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=KEYRING, actor="alice"
        )
        await wait_until(lambda: converged(c, "web/tls", {"web-5"}), what="install")
        forged = encode_event(
            EventType.HOST_REVOKED,
            {"host": "web-5"},
            seq=10**9,
            signing_key=generate_signing_key(),
            at=datetime.now(UTC),
        )
        # Only the controller's certificate may write events: the forger stole it (but not
        # the controller's signing key).
        await publish(c.settings.kafka, c.settings.events_topic, forged)
        await wait_until(lambda: agent.event_stats.get("unknown-signer"), what="forged dropped")
        await c.lifecycle.rotate("web/tls", actor="alice")
        await wait_until(lambda: converged(c, "web/tls", {"web-5"}), what="rotation after forgery")
    assert any("reason=unknown-signer" in r.getMessage() for r in caplog.records)


async def test_a_failing_health_check_restores_the_previous_version(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    gate = tmp_path / "healthy"
    runs = tmp_path / "health-runs"
    check = f"echo run >> {runs}; test -f {gate} || {{ echo 'service rejected the key'; exit 7; }}"
    # The host's own config defines what the hook name runs; the key only names it.
    hooks = {"tls-check": {"health": ["sh", "-c", check]}}
    config = await enroll_agent(c, tmp_path, "web-6", WEB, hooks=hooks)
    root = tmp_path / "web-6" / "root"
    gate.write_text("yes")
    spec = InstallSpec(path="/etc/ckms/{team}/{purpose}.key", health="tls-check")

    def health_runs() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    async def acks(version: int, status: str) -> int:
        assert c.store is not None
        return sum(
            1
            for r in await audit_log.load_records(c.store)
            if r.action == "fleet.ack"
            and r.actor == "host:web-6"
            and (r.details["version"], r.details["status"]) == (version, status)
        )

    async with running_agent(config) as agent:
        await c.lifecycle.create(
            "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=spec, actor="alice"
        )
        await wait_until(lambda: converged(c, "web/tls", {"web-6"}), what="install")
        v1 = await c.vault.material("web/tls", 1)
        gate.unlink()
        await c.lifecycle.rotate("web/tls", actor="alice")
        await wait_until(lambda: acks(2, "failed"), what="failed ack")
        assert (root / "etc/ckms/web/tls.key").read_bytes() == v1
        ran = health_runs()
        # Another key's event makes the agent sync again: the change that just failed is not
        # tried again (the service would flip to the bad key and back on every sync).
        reconciles = agent.reconciles
        await c.lifecycle.create(
            "web/other", "aes-256", targets=Targets(selectors=(WEB,)), actor="alice"
        )
        await wait_until(lambda: converged(c, "web/other", {"web-6"}), what="other key")
        await wait_until(lambda: agent.reconciles > reconciles, what="a later sync")
        assert health_runs() == ran
        assert await acks(2, "failed") == 1
        assert (root / "etc/ckms/web/tls.key").read_bytes() == v1
        # A new version is a different change: tried at once, and it passes once healthy.
        gate.write_text("yes")
        await c.lifecycle.rotate("web/tls", actor="alice")
        await wait_until(lambda: acks(3, "installed"), what="v3 installed")
        v3 = await c.vault.material("web/tls", 3)
        assert (root / "etc/ckms/web/tls.key").read_bytes() == v3
    assert c.store is not None
    failed = [
        r
        for r in await audit_log.load_records(c.store)
        if r.action == "fleet.ack" and r.outcome == "failed"
    ]
    [hook] = failed[-1].details["hooks"]
    assert (hook["command"], hook["name"], hook["exit_code"]) == ("health", "tls-check", 7)
    # What the hook printed stayed on the host: in no audit record, no fleet row.
    every = json.dumps([r.details for r in await audit_log.load_records(c.store)])
    assert "service rejected" not in every


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_openssh_can_call_the_controller_with_a_hosts_key(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "web-7", WEB)
    await c.lifecycle.create("web/tls", "aes-256", targets=Targets(selectors=(WEB,)), actor="alice")
    cfg = agent_config(config)
    keys = load_keys(cfg.identity_key_path, cfg.wrapping_key_path, cfg.wrap_suite)
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(keys.ssh_key().export_private_key("openssh"))
    key_file.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_bytes(f"[127.0.0.1]:{c.port} ".encode() + c.host_key.export_public_key("openssh"))
    argv = [
        "ssh", "-p", str(c.port), "-i", str(key_file), "-F", "/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known}", "web-7@127.0.0.1", "sync",
    ]  # fmt: skip
    proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    reply = json.loads(proc.stdout)
    assert reply["ok"] and [k["key"] for k in reply["result"]["keys"]] == ["web/tls"]
    # Another key for the same host name gets nothing.
    other = tmp_path / "other"
    other.write_bytes(generate_ssh_key().export_private_key("openssh"))
    other.chmod(0o600)
    argv[argv.index(str(key_file))] = str(other)
    denied = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=30)
    assert denied.returncode != 0 and not denied.stdout


async def failed_on(c: Controller, key: str, host: str) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return any(s.host == host and s.failed for s in status)


async def test_a_hook_that_prints_the_key_leaks_it_into_no_controller_table(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    path = tmp_path / "web-8" / "root" / "etc/ckms/web/tls.key"
    dump = f"cat {path}; base64 -w0 {path}; od -An -tx1 {path}; exit 3"
    hooks = {"leaky": {"health": ["sh", "-c", dump]}}
    config = await enroll_agent(c, tmp_path, "web-8", WEB, hooks=hooks)
    async with running_agent(config):
        await c.lifecycle.create(
            "web/tls",
            "aes-256",
            targets=Targets(selectors=(WEB,)),
            install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key", health="leaky"),
            actor="alice",
        )
        await wait_until(lambda: failed_on(c, "web/tls", "web-8"), what="the failed ack applied")
    material = await c.vault.material("web/tls", 1)
    shapes = [material, base64.b64encode(material), material.hex().encode()]
    shapes.append(" ".join(f"{b:02x}" for b in material[:8]).encode())
    # Every table of the controller: the database file, its WAL and shared memory, raw bytes.
    for db_file in c.settings.home.glob("controller.db*"):
        blob = await asyncio.to_thread(db_file.read_bytes)
        for shape in shapes:
            assert shape not in blob, f"key material in {db_file.name}"
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, "web/tls")
    assert [s.error for s in status] == ["health hook 'leaky' failed; previous version restored"]
