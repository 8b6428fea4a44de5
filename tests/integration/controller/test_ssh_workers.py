"""A controller with two SSH worker processes (``ssh_workers = 2``), real Kafka, a real agent
and the real ``ckms`` CLI: keys reach the host through the workers, seal and unseal reach every
worker before the command returns, a killed worker comes back (audited) in the vault's state,
and no secret is on a worker's command line or in its environment."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.cli._errors import ExitCode
from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from tests.support.cli import Operators, audit_records
from tests.support.controller import PASSPHRASE, running_controller
from tests.support.fleet import enroll_agent, host_rpc, running_agent, wait_until

pytestmark = pytest.mark.kafka


async def _converged(c: Controller, key: str, host: str, version: int) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return any(s.host == host and s.converged and s.primary == version for s in status)


async def _all_sealed(c: Controller, sealed: bool) -> bool:
    assert c.workers is not None
    states = await c.workers.describe()
    return len(states) == 2 and all(s["sealed"] is sealed for s in states.values())


def _command_line_and_environment(pid: int) -> bytes:
    return b"".join(Path(f"/proc/{pid}/{name}").read_bytes() for name in ("cmdline", "environ"))


def _core_size_limits(pid: int) -> list[str]:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line for line in limits if line.startswith("Max core file size")).split()[4:6]


@pytest.mark.requirement("PCI-3.7.3")
@pytest.mark.timeout(300)  # many CLI processes and worker restarts on a busy machine
async def test_two_ssh_workers_serve_agents_and_operators_in_one_vault_state(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        audit_topic=unique_topic("audit"),
        ssh_workers=2,
    ) as c:
        assert c.workers is not None
        pids = c.workers.pids()
        assert len(pids) == 2 and os.getpid() not in pids.values()
        assert await _all_sealed(c, False)  # unsealed before start: the workers began so
        for pid in pids.values():  # secrets cross the socket pair only
            assert PASSPHRASE.encode() not in _command_line_and_environment(pid)
            # ...and stay in the worker's memory: no core file of it (nor ptrace by its user,
            # tests/unit/test_hardening.py).
            assert _core_size_limits(pid) == ["0", "0"]

        ops = Operators(c, tmp_path / "ops")
        await ops.add("alice", "admin")
        config = await enroll_agent(c, tmp_path / "hosts", "web-1", {"role": "web"})
        async with running_agent(config):
            created = await ops.ckms(
                "key", "create", "app/k", "--type", "aes-256", "--target", "role=web",
                who="alice",
            )  # fmt: skip
            assert created.rc == 0, created.stderr
            await wait_until(lambda: _converged(c, "app/k", "web-1", 1), 60, "v1 on web-1")

            # Sealing through one worker seals them all before the command returns.
            sealed = await ops.ckms("seal", who="alice")
            assert sealed.rc == 0, sealed.stderr
            assert await _all_sealed(c, True)
            for _ in range(4):  # new connections, spread over both workers
                refused = await ops.ckms("key", "rotate", "app/k", who="alice")
                assert refused.rc == ExitCode.SEALED, refused.stderr

            (tmp_path / "passphrase").write_text(PASSPHRASE + "\n")
            unsealed = await ops.ckms(
                "unseal", "--passphrase-file", str(tmp_path / "passphrase"), who="alice"
            )
            assert unsealed.rc == 0, unsealed.stderr
            assert await _all_sealed(c, False)

            # A worker killed outright is started again, in the vault's state, and audited.
            os.kill(pids[0], signal.SIGKILL)
            await wait_until(
                lambda: c.workers is not None and c.workers.pids().get(0) not in (None, pids[0]),
                60,
                "worker 0 restarted",
            )
            assert await _all_sealed(c, False)
            records = await audit_records(c)
            exits = [r for r in records if r.action == "controller.worker"]
            assert exits and exits[-1].outcome == "failed"
            assert exits[-1].details["worker"] == 0 and exits[-1].details["exit"] == -9

            # Checkpoints are signed by the parent (it holds the anchor); workers answer with it.
            for _ in range(3):
                verified = await ops.ckms("audit", "verify", "--json", who="alice")
                assert verified.rc == 0, verified.stderr
                assert verified.json()["ok"] and verified.json()["checkpoints_verified"] >= 1

            for _ in range(4):
                rotated = await ops.ckms("key", "rotate", "app/k", who="alice")
                assert rotated.rc == 0, rotated.stderr
            await wait_until(lambda: _converged(c, "app/k", "web-1", 5), 60, "v5 on web-1")


@pytest.mark.timeout(300)  # many CLI processes and worker restarts on a busy machine
async def test_a_host_revoked_through_one_worker_loses_its_connections_on_every_worker(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        audit_topic=unique_topic("audit"),
        ssh_workers=2,
    ) as c:
        ops = Operators(c, tmp_path / "ops")
        await ops.add("alice", "admin")
        config = await enroll_agent(c, tmp_path / "hosts", "web-1", {"role": "web"})
        async with contextlib.AsyncExitStack() as stack:
            # Several connections as the host: the kernel puts them on both workers.
            rpcs = [await stack.enter_async_context(host_rpc(c, config)) for _ in range(6)]
            for rpc in rpcs:
                await rpc.call("sync", {"installed": []})
            revoked = await ops.ckms("host", "revoke", "web-1", who="alice")
            assert revoked.rc == 0, revoked.stderr

            async def all_closed() -> bool:
                return all(not rpc.connected for rpc in rpcs)

            await wait_until(all_closed, 30, "every connection of the revoked host closed")
