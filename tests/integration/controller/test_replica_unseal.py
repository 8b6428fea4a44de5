"""Unsealing a set of replicas: each replica is unsealed by the custodians, on its own.

Two real controllers on one store (real Kafka), the operator CLI as a process naming both.
A sealed replica refuses what needs the KEK with an error that says so, agents that know both
replicas get what they need from the unsealed one, ``ckms status`` shows each replica's seal
state, and ``ckms unseal`` gives the passphrase to every replica named.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from ckms.errors import SealedError
from ckms.protocol import Targets
from ckms.ssh import Endpoint
from ckms.store import lease as leases
from tests.support.cli import Operators, run_cli
from tests.support.controller import PASSPHRASE, running_controller
from tests.support.fleet import enroll_agent, host_rpc, wait_until

pytestmark = pytest.mark.kafka


async def _seal_state(c: Controller) -> dict[str, bool]:
    assert c.store is not None
    return {r.name: r.sealed for r in await leases.read_replicas(c.store)}


async def test_each_replica_keeps_its_own_seal_and_a_sealed_one_refuses_what_needs_the_kek(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    events, acks = unique_topic("events"), unique_topic("acks")
    common = {
        "store": str(tmp_path / "controller.db"),
        "audit_topic": unique_topic("audit"),
        "leader_lease_s": 3.0,
    }
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            running_controller(
                tmp_path / "a", controller_kafka, events, acks, replica_name="ctl-a", **common
            )
        )
        (tmp_path / "b").mkdir(mode=0o700)
        shutil.copy2(a.settings.host_key_path, tmp_path / "b" / a.settings.host_key_path.name)
        b = await stack.enter_async_context(
            running_controller(
                tmp_path / "b", controller_kafka, events, acks, replica_name="ctl-b", **common
            )
        )
        config = await enroll_agent(a, tmp_path / "hosts", "web-1", {"role": "web"})
        await a.lifecycle.create(
            "web/data", "aes-256", actor="alice", targets=Targets(selectors=({"role": "web"},))
        )
        await b.vault.seal(actor="test")
        assert not a.vault.sealed  # sealing one replica seals only that one

        # The sealed replica refuses a fetch (it needs the KEK) and says why.
        async with host_rpc(b, config) as rpc:
            with pytest.raises(SealedError, match=r"controller is sealed: cannot .*unseal it"):
                await rpc.call("fetch", {"key": "web/data", "version": 1})
        # A client that knows both replicas is served by the unsealed one instead (both
        # orders: the client starts at a stable hash of its login name).
        async with host_rpc(b, config, also=[a]) as rpc:
            await rpc.connect()
            if rpc.endpoint.port != b.port:  # it starts at the unsealed one: go to b first
                await rpc.close()
                rpc._current = rpc.endpoints.index(Endpoint("127.0.0.1", b.port))
                await rpc.connect()
            assert rpc.endpoint.port == b.port
            reply = await rpc.call("fetch", {"key": "web/data", "version": 1})
            assert reply["version"] == 1 and rpc.endpoint.port == a.port

        # ckms status, through either replica, lists both with their seal state.
        await wait_until(lambda: _sealed_b(a), 20, "ctl-b's sealed heartbeat")
        ops = Operators(a, tmp_path / "ops")
        await ops.add("alice", "admin")
        env = ops.env("alice")
        env["CKMS_CONTROLLER"] = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
        status = await run_status(ops, env)
        assert "ctl-a" in status and "ctl-b" in status
        lines = {line.split()[0]: line for line in status.splitlines() if line.startswith("  ")}
        assert "unsealed" in lines["ctl-a"] and ": sealed" in lines["ctl-b"]
        assert "lease epoch" in status

        # ckms unseal gives the passphrase to each replica named; each unseals on its own.
        secret = tmp_path / "passphrase"
        secret.write_text(PASSPHRASE)
        secret.chmod(0o600)
        run = await run_cli("unseal", "--passphrase-file", str(secret), env=env)
        assert run.rc == 0, run.stderr
        assert f"controller 127.0.0.1:{b.port}: unsealed" in run.stdout
        assert not b.vault.sealed
        await wait_until(lambda: _all_unsealed(a), 20, "both unsealed heartbeats")


async def _sealed_b(c: Controller) -> bool:
    return (await _seal_state(c)).get("ctl-b") is True


async def _all_unsealed(c: Controller) -> bool:
    state = await _seal_state(c)
    return set(state) == {"ctl-a", "ctl-b"} and not any(state.values())


async def run_status(ops: Operators, env: dict[str, str]) -> str:
    run = await run_cli("status", env=env)
    assert run.rc in (0, 4), run.stderr  # 4: the replica that answered is the sealed one
    return run.stdout
