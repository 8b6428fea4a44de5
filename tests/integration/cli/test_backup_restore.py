"""The restore drill: ``ckms backup`` of a running controller while rotations commit, ``ckms
restore`` into a new home, and the restored controller serves the same keys (to the agent that
knew the original, and to a host enrolled afresh) and its audit log verifies; a backup older
than the last published audit anchor is refused; only admins may take one."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.cli._errors import ExitCode
from ckms.controller.fleet import key_fleet_status
from ckms.controller.home import write_settings
from ckms.controller.service import Controller
from ckms.crypto import generate_signing_key
from ckms.errors import NotFoundError, ProtocolError
from ckms.protocol import EventType, InstallSpec, Targets, encode_event
from ckms.ssh import Principal
from tests.support.acks import publish
from tests.support.cli import Operators, audit_records
from tests.support.controller import running_controller
from tests.support.fleet import enroll_agent, running_agent, wait_until

pytestmark = pytest.mark.kafka

APP = {"env": "prod", "role": "app"}


async def converged(c: Controller, key: str, host: str) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return any(s.host == host and s.converged for s in status)


async def people(c: Controller, tmp_path: Path) -> Operators:
    ops = Operators(c, tmp_path)
    await ops.add("alice", "admin")
    await ops.add("dave", "operator")
    await ops.add("erin", "auditor")
    return ops


@pytest.mark.requirement("SP800-130-STORE")
async def test_restore_drill_backup_while_rotating(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    topics = (unique_topic("events"), unique_topic("fleet"))
    backup = tmp_path / "drill" / "ckms.backup"
    backup.parent.mkdir()
    config = tmp_path / "original.toml"
    async with running_controller(tmp_path / "original", controller_kafka, *topics) as c:
        ops = await people(c, tmp_path)
        port = c.port
        write_settings(config, c.settings)
        agent = await enroll_agent(c, tmp_path, "app-1", APP)
        spec = InstallSpec(path="/keys/{purpose}", format="raw")
        await c.lifecycle.create("app/db", "aes-256", targets=Targets(selectors=(APP,)),
                                 install=spec, actor="alice")  # fmt: skip
        await c.lifecycle.create("app/sign", "rsa-4096", actor="alice")
        async with running_agent(agent):
            await wait_until(lambda: converged(c, "app/db", "app-1"), what="app/db installed")

        # Rotations commit one after the other while the backup is taken.
        rotated: list[int] = []
        stop = asyncio.Event()

        async def rotate_until_stopped() -> None:
            while not stop.is_set():
                rotated.append((await c.lifecycle.rotate("app/sign", actor="alice")).version)

        rotating = asyncio.create_task(rotate_until_stopped())
        await wait_until(lambda: len(rotated) >= 1, what="a first rotation")
        before = len(rotated)
        run = await ops.ckms("backup", "--output", str(backup), "--json", who="alice")
        during = len(rotated)
        await wait_until(lambda: len(rotated) > during, what="a rotation after the backup")
        stop.set()
        await rotating
        assert run.rc == 0, run.stderr
        info = run.json()
        assert before >= 1 and len(rotated) > before  # rotations ran before, during and after
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        assert not list((c.settings.home / "backups").iterdir())  # the controller's copy is gone
        assert [p.name for p in backup.parent.iterdir()] == ["ckms.backup"]  # no temp file left
        # After the backup the agent applies one more event of app/db's partition.
        async with running_agent(agent):
            await c.lifecycle.rotate("app/db", actor="alice")
            await wait_until(lambda: converged(c, "app/db", "app-1"), what="app/db v2 installed")
        original = {
            (k.name, v.version): await c.vault.material(k.name, v.version)
            for k in await c.lifecycle.list_keys()
            for v in k.versions
        }
        (record,) = [r for r in await audit_records(c) if r.action == "controller.backup"]
        assert record.details["sha256"] == info["sha256"]
        assert record.details["audit_size"] == info["audit_size"]
    # The original is gone (disaster); restore into a new home with its host key.
    home = tmp_path / "restored"
    run = await ops.ckms(
        "restore", str(backup), "--home", str(home), "--config", str(config),
        "--listen", f"127.0.0.1:{port}",
        "--host-key", str(tmp_path / "original" / "ssh_host_ed25519_key"), "--json",
        who=None,
    )  # fmt: skip
    assert run.rc == 0, run.stderr
    restored = run.json()
    assert restored["audit_ok"] and restored["anchor_checked"]
    assert restored["anchor_size"] is not None  # checked against a real anchor
    assert restored["audit_size"] == info["audit_size"]
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    async with running_controller(home, controller_kafka, *topics, listen_port=port) as c2:
        assert c2.vault.anchor.broken is None
        ops2 = Operators(c2, tmp_path / "again")
        ops2.people = ops.people  # the same operators, restored with their keys
        verified = await ops2.ckms("audit", "verify", "--json", who="erin")
        assert verified.rc == 0, verified.stderr
        assert verified.json()["ok"]
        keys = await c2.lifecycle.list_keys()
        served = {(k.name, v.version) for k in keys for v in k.versions}
        assert served <= set(original)
        signed = sorted(v for (n, v) in served if n == "app/sign")
        assert signed == list(range(1, len(signed) + 1))  # a prefix of the versions, no gap
        assert len(signed) >= 1 + before  # every rotation committed before the copy is in it
        for name, version in served:  # each version whole: committed before the copy or not in it
            assert await c2.vault.material(name, version) == original[(name, version)]
        # The agent that knew the original converges on the restored one (same host key).
        on_disk = tmp_path / "app-1" / "root" / "keys" / "db"
        # No heartbeat within the test (its drift check would converge the host without the
        # event): only the event can bring the rotation below.
        async with running_agent(agent, CKMS_AGENT_HEARTBEAT_INTERVAL_S="600"):
            # It held v2 of the original (made after the backup); the restored one says v1.
            await wait_until(
                lambda: on_disk.read_bytes() == original[("app/db", 1)], what="app-1 back on v1"
            )
            await wait_until(lambda: converged(c2, "app/db", "app-1"), what="app-1 acked")
            # The restored controller's events reach the agent although it applied events
            # after the backup: the restore continued the sequence after the newest published.
            assert restored["event_seq"] is not None
            await c2.lifecycle.rotate("app/db", actor="alice")
            await wait_until(
                lambda: converged(c2, "app/db", "app-1"), timeout_s=20, what="event applied"
            )
            assert on_disk.read_bytes() == await c2.vault.material("app/db", 2)
        # A host enrolled on the restored controller gets what it serves.
        fresh = await enroll_agent(c2, tmp_path, "app-2", APP)
        async with running_agent(fresh):
            await wait_until(lambda: converged(c2, "app/db", "app-2"), what="app-2 installed")
        new_disk = tmp_path / "app-2" / "root" / "keys" / "db"
        assert new_disk.read_bytes() == await c2.vault.material("app/db", 2)


async def test_a_backup_older_than_the_anchor_is_refused_and_leaves_nothing(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    topics = (unique_topic("events"), unique_topic("fleet"))
    backup = tmp_path / "old.backup"
    config = tmp_path / "original.toml"
    async with running_controller(tmp_path / "original", controller_kafka, *topics) as c:
        ops = await people(c, tmp_path)
        write_settings(config, c.settings)
        await c.lifecycle.create("app/db", "aes-256", actor="alice")
        run = await ops.ckms("backup", "-o", str(backup), who="alice")
        assert run.rc == 0, run.stderr
        again = await ops.ckms("backup", "-o", str(backup), who="alice")
        assert again.rc == ExitCode.USAGE and "already exists" in again.stderr
        await c.lifecycle.rotate("app/db", actor="alice")
        verified = await ops.ckms(
            "audit", "verify", who="erin"
        )  # signs and publishes a newer anchor
        assert verified.rc == 0, verified.stderr
    home = tmp_path / "restored"
    run = await ops.ckms("restore", str(backup), "--home", str(home), "--config", str(config),
                         who=None)  # fmt: skip
    assert run.rc != 0
    assert "older than the last published anchor" in run.stderr
    assert not home.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".restored")]  # no staging left
    # A file that is not a backup is refused before anything is written.
    junk = tmp_path / "junk.backup"
    junk.write_bytes(os.urandom(4096))
    run = await ops.ckms("restore", str(junk), "--home", str(home), "--config", str(config),
                         who=None)  # fmt: skip
    assert run.rc == ExitCode.USAGE and "not a" in run.stderr
    assert not home.exists()


async def test_only_admins_take_backups(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    topics = (unique_topic("events"), unique_topic("fleet"))
    async with running_controller(tmp_path / "ctl", controller_kafka, *topics) as c:
        ops = await people(c, tmp_path)
        for who in ("dave", "erin"):
            run = await ops.ckms("backup", "-o", str(tmp_path / f"{who}.backup"), who=who)
            assert run.rc == ExitCode.FAILED
            assert "may not call backup.create" in run.stderr
            assert not (tmp_path / f"{who}.backup").exists()
        refused = [(r.actor, r.action) for r in await audit_records(c) if r.outcome == "refused"]
        assert ("dave", "rpc.backup.create") in refused and ("erin", "rpc.backup.create") in refused
        run = await ops.ckms("backup", "-o", str(tmp_path / "a.backup"), "--json", who="alice")
        assert run.rc == 0, run.stderr
        assert json.loads(run.stdout)["keys"] == 0
        # A backup id names a file in the controller's backups directory and nothing else.
        admin = Principal(name="alice", role="admin", key_fingerprint="SHA256:in-process")
        for bad in ("../controller", "b-../../controller.db", "b-0123456789abcdeg"):
            with pytest.raises(ProtocolError, match="bad parameters"):
                await c.rpc.call(admin, "backup.read", {"id": bad})
        with pytest.raises(NotFoundError, match="no backup"):
            await c.rpc.call(admin, "backup.read", {"id": "b-0123456789abcdef"})


async def test_a_forged_event_does_not_move_the_restored_sequence(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    """The restore continues the event sequence after the newest event *this controller*
    signed; a record on the topic signed by anyone else (here with seq 10**9) counts for
    nothing, or a writer of the topic could push the sequence out of reach."""
    topics = (unique_topic("events"), unique_topic("fleet"))
    backup = tmp_path / "b.backup"
    config = tmp_path / "original.toml"
    async with running_controller(tmp_path / "original", controller_kafka, *topics) as c:
        ops = await people(c, tmp_path)
        write_settings(config, c.settings)
        await c.lifecycle.create("app/db", "aes-256", actor="alice")
        run = await ops.ckms("backup", "-o", str(backup), who="alice")
        assert run.rc == 0, run.stderr
        await c.lifecycle.rotate("app/db", actor="alice")
        await wait_until(lambda: c.publisher.stats.published >= 2, what="both events published")
    forged = encode_event(
        EventType.HOST_REVOKED,
        {"host": "web-5"},
        seq=10**9,
        signing_key=generate_signing_key(),
        at=datetime.now(UTC),
    )
    # A writer of the events topic: with the ACLs, a holder of the controller's Kafka key.
    await publish(controller_kafka, topics[0], forged)
    run = await ops.ckms("restore", str(backup), "--home", str(tmp_path / "restored"),
                         "--config", str(config), "--json", who=None)  # fmt: skip
    assert run.rc == 0, run.stderr
    assert run.json()["event_seq"] == 2  # the rotation published after the backup
