"""``ckms-agent`` as a process: crash safety, clean SIGTERM, acks across a Kafka outage, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agent_harness import ALLOWED, World, wait_until

from ckms.protocol import InstallSpec
from ckms_agent.daemon import Agent
from ckms_agent.files import TEMP_MARK

pytestmark = pytest.mark.kafka

KEY = "payments/db"
RAW = InstallSpec(path="/etc/ckms/{team}/{purpose}.key")
AGENT_BIN = str(Path(sys.executable).parent / "ckms-agent")


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if TEMP_MARK in p.name] if directory.exists() else []


async def start(world: World, log: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    out = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            AGENT_BIN, *args, env=world.env(**env), stdout=out, stderr=out
        )
    finally:
        out.close()


@contextlib.asynccontextmanager
async def agent_process(
    world: World, log: Path, **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await start(world, log, "run", **env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_crash_before_rename_then_restart_converges_and_sigterm_is_clean(
    world: World,
) -> None:
    ctl = world.controller
    key = ctl.add_key(KEY, install=RAW)
    path = world.host_path("/etc/ckms/payments/db.key")
    log = world.tmp / "agent.log"

    crashed = await start(world, log, "run", CKMS_AGENT_FAULT="crash-before-rename")
    assert await asyncio.wait_for(crashed.wait(), 60) == 137
    assert temp_files(path.parent), "the fault should leave a temp file behind"
    assert not path.exists()

    async with agent_process(world, log) as proc:
        await wait_until(path.exists, 30, "the key file after restart")
        assert path.read_bytes() == key.versions[1].material
        assert path.stat().st_mode & 0o777 == 0o600
        assert temp_files(path.parent) == []
        ack = await world.ack_reader.wait_for(
            world.agent_public(), lambda a: a.data.status == "installed"
        )
        assert ack.data.digest == key.versions[1].digest
        # A rotation while running, then SIGTERM: exit 0, no partial files, state consistent.
        v2 = ctl.rotate(KEY)
        await ctl.publish(ctl.rotated_event(KEY, v2))
        await wait_until(lambda: path.read_bytes() == key.versions[v2].material, 30, "v2")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()[-3000:]
    assert temp_files(path.parent) == []
    assert "removed leftover temp file" in log.read_text()

    status = await start(world, world.tmp / "status.out", "status", "--json")
    assert await asyncio.wait_for(status.wait(), 30) == 0
    report = json.loads((world.tmp / "status.out").read_text())
    [held] = report["keys"]
    assert held["key"] == KEY and held["paths"] == [str(path)] and held["intact"]
    assert [(v["version"], v["primary"]) for v in held["versions"]] == [(1, False), (2, True)]
    assert report["any_stale"] is False and report["last_contact"] is not None


async def test_acks_wait_in_the_state_db_until_the_controller_takes_them_across_a_restart(
    world: World,
) -> None:
    ctl = world.controller
    ctl.add_key(KEY, install=RAW)
    ctl.refuse_acks = True  # the controller answers sync and fetch, but takes no ack
    path = world.host_path("/etc/ckms/payments/db.key")
    agent = Agent(world.config())
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(path.exists, 30, "install")
        await wait_until(lambda: ("ack", "web-1") in ctl.calls, 10, "an ack refused")

        async def pending() -> int:
            return await agent.state.pending_ack_count()

        await wait_until(pending, 10, "a pending ack")
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
    assert ctl.received_acks == []

    out = world.tmp / "status.txt"
    proc = await start(world, out, "status")
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    text = out.read_text()
    assert "1 pending" in text and KEY in text

    # The controller takes acks again: after a restart of the agent, the queued ack goes out.
    ctl.refuse_acks = False
    agent = Agent(world.config())
    task = asyncio.create_task(agent.run())
    try:
        ack = await world.ack_reader.wait_for(
            world.agent_public(), lambda a: a.data.status == "installed"
        )
        assert ack.seq == 1 and ack.data.key == KEY

        async def drained() -> bool:
            return await agent.state.pending_ack_count() == 0

        await wait_until(drained, 20, "the queue to drain")
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


async def test_reconnects_after_the_controller_restarts_and_converges(world: World) -> None:
    ctl = world.controller
    key = ctl.add_key(KEY, install=RAW)
    path = world.host_path("/etc/ckms/payments/db.key")
    agent = Agent(world.config())
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(path.exists, 30, "the key file")
        await ctl.stop()
        await wait_until(lambda: not agent.connected, 20, "disconnect")
        v2 = ctl.rotate(KEY)  # changed while the agent could not hear about it
        syncs_before = ctl.calls.count(("web-1", "sync"))
        await ctl.start()  # same port, same host key
        await wait_until(
            lambda: path.read_bytes() == key.versions[v2].material, 30, "v2 after reconnect"
        )
        assert ctl.calls.count(("web-1", "sync")) > syncs_before
        # Heartbeats report what is on disk.
        await wait_until(
            lambda: any(
                {(i.key, i.version) for i in hb.installed} == {(KEY, 1), (KEY, v2)}
                for hb in ctl.heartbeats
            ),
            20,
            "a heartbeat with both versions",
        )
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


async def test_a_wrong_host_key_is_refused_and_retried_without_busy_looping(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    ctl = world.controller
    ctl.add_key(KEY, install=RAW)
    cfg = world.config(CKMS_AGENT_HOST_KEY_FINGERPRINT="SHA256:" + "B" * 43)
    agent = Agent(cfg)
    caplog.set_level(logging.WARNING, logger="ckms_agent.daemon")
    task = asyncio.create_task(agent.run())

    def refusals() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "controller unreachable" in r.getMessage()
        ]

    try:
        await wait_until(lambda: len(refusals()) >= 3, 20, "three refused attempts")
        first = caplog.records[0].created
        await wait_until(lambda: len(refusals()) >= 5, 20, "five refused attempts")
        # Backoff 0.1 s doubling to 0.5 s (jittered >= half): 4 waits take well over 0.4 s.
        assert caplog.records[-1].created - first >= 0.4
        assert "not the pinned SHA256:BBB" in refusals()[0]
        assert ctl.calls == []  # nothing was said to a controller with another host key
        assert not world.host_path("/etc/ckms/payments/db.key").exists()
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


def run_cli(world: World, *args: str, **env: str) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run(
        [AGENT_BIN, *args],
        env=world.env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


async def test_cli_enroll_refuses_to_overwrite_and_errors_are_one_line(world: World) -> None:
    ctl = world.controller
    args = [
        "enroll",
        "--controller",
        f"127.0.0.1:{ctl.port}",
        "--token",
        "enroll-token-0123456789",
        "--host-key-fingerprint",
        ctl.fingerprint,
        "--state-dir",
        str(world.tmp / "state"),
        "--config",
        str(world.config_path),
    ]
    code, out = await asyncio.to_thread(run_cli, world, *args)
    assert code == 1 and "already enrolled" in out and "--force" in out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out

    # A wrong token: refused by the controller, one line, and nothing is left behind.
    fresh = world.tmp / "fresh"
    bad = [*args[:-4], "--state-dir", str(fresh), "--config", str(fresh / "agent.toml")]
    bad[bad.index("--token") + 1] = "not-the-right-token-123"
    code, out = await asyncio.to_thread(run_cli, world, *bad)
    assert code == 1 and "token is not valid" in out and "Traceback" not in out
    assert not (fresh / "agent.toml").exists() and not (fresh / "identity.key").exists()

    # --force re-enrolls with new keys; the new identity is what the controller now knows.
    old_identity = (world.tmp / "state" / "identity.key").read_bytes()
    code, out = await asyncio.to_thread(run_cli, world, *args, "--force")
    assert code == 0, out
    assert "enrolled as host web-1" in out
    new_identity = (world.tmp / "state" / "identity.key").read_bytes()
    assert new_identity != old_identity
    assert (world.tmp / "state" / "identity.key").stat().st_mode & 0o777 == 0o600
    assert world.config_path.stat().st_mode & 0o777 == 0o600
    # The host's own policy survives the re-enrollment (it never comes from the controller).
    assert world.config().allowed_paths == tuple(Path(p) for p in ALLOWED)

    code, out = await asyncio.to_thread(run_cli, world, "status", "--bogus")
    assert code == 2
    code, out = await asyncio.to_thread(
        run_cli, world, "run", "--config", str(world.tmp / "missing.toml")
    )
    assert code == 1 and out.count("\n") == 1 and "does not exist" in out
