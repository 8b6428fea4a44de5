"""Two real controllers on one store (replicas) and a real agent that knows both (real Kafka).

The replicas share the store (a SQLite file, or a PostgreSQL database) and the SSH host key
(docs/architecture.md §8):
the agent's config names both, pins the one host key, and when the replica it uses stops, its
sync, fetch and acks go on through the other.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from ckms.protocol import InstallSpec, Targets
from ckms.ssh import Endpoint
from ckms.store import Store
from ckms.store import lease as leases
from ckms_agent.enroll import enroll
from tests.support.controller import running_controller
from tests.support.fleet import TEST_ALLOWED_PATHS, agent_config, running_agent, wait_until
from tests.support.kafka import dev_ca, use_test_broker_certificate
from tests.support.replicas import target_settings
from tests.support.stores import StoreTarget

pytestmark = pytest.mark.kafka


def store_of(c: Controller) -> Store:
    assert c.store is not None
    return c.store


async def _converged(c: Controller, key: str, host: str, version: int) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return any(s.host == host and s.converged and s.primary == version for s in status)


@pytest.mark.requirement("ISO27002-8.14")
async def test_an_agent_fails_over_to_the_other_replica_and_keeps_converging(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    store_target: StoreTarget,
) -> None:
    topics: dict[str, object] = {
        "audit_topic": unique_topic("audit"),
        **target_settings(store_target),  # one SQLite file, or one PostgreSQL database
    }
    events, fleet = unique_topic("events"), unique_topic("fleet")
    async with contextlib.AsyncExitStack() as first_stack:
        a = await first_stack.enter_async_context(
            running_controller(tmp_path / "a", controller_kafka, events, fleet, **topics)
        )
        # One host key for every replica: copied to the second's home before it starts.
        (tmp_path / "b").mkdir(mode=0o700)
        shutil.copy2(a.settings.host_key_path, tmp_path / "b" / a.settings.host_key_path.name)
        second_stack = contextlib.AsyncExitStack()
        await second_stack.__aenter__()
        try:
            b = await second_stack.enter_async_context(
                running_controller(tmp_path / "b", controller_kafka, events, fleet, **topics)
            )
            assert b.host_key_fingerprint == a.host_key_fingerprint
            # exactly one of them leads; both beat
            await wait_until(lambda: a.leader.leading or b.leader.leading, 30, "a leader")
            assert not (a.leader.leading and b.leader.leading)

            async def beating() -> bool:
                names = {r.name for r in await leases.read_replicas(store_of(a))}
                return names == {a.leader.name, b.leader.name}

            await wait_until(beating, 30, "both heartbeats")
            stacks = {a.port: first_stack, b.port: second_stack}
            replicas = {a.port: a, b.port: b}

            token = await a.hosts.create_token("web-1", {"role": "web"}, actor="alice")
            config = tmp_path / "web-1" / "agent.toml"
            await enroll(
                controllers=(Endpoint("127.0.0.1", a.port), Endpoint("127.0.0.1", b.port)),
                token=token.token,
                host_key_fingerprint=a.host_key_fingerprint,
                state_dir=tmp_path / "web-1" / "state",
                config_path=config,
                root=tmp_path / "web-1" / "root",
                policy={"allowed_paths": TEST_ALLOWED_PATHS},
            )
            use_test_broker_certificate(dev_ca(a), config, "web-1")
            cfg = agent_config(config)
            assert cfg.controller == (f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}")
            assert cfg.controller_host is None

            await a.lifecycle.create(
                "web/tls",
                "aes-256",
                actor="alice",
                targets=Targets(selectors=({"role": "web"},)),
                install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key"),
            )
            key_file = tmp_path / "web-1" / "root" / "etc" / "ckms" / "web" / "tls.key"
            async with running_agent(config) as agent:
                await wait_until(lambda: _converged(a, "web/tls", "web-1", 1), 60, "v1 on web-1")
                rpc = agent._rpc
                assert rpc is not None
                used = rpc.endpoint.port
                other = replicas[b.port if used == a.port else a.port]
                v1 = key_file.read_bytes()

                await stacks[used].aclose()  # the replica the agent talks to stops
                await other.lifecycle.rotate("web/tls", actor="alice")
                # sync and fetch through the other replica; its ack reaches the fleet view
                await wait_until(
                    lambda: _converged(other, "web/tls", "web-1", 2), 60, "v2 through the other"
                )
                assert key_file.read_bytes() != v1
                assert rpc.endpoint.port == other.port
                assert rpc.failovers >= 1
                # Acks are applied by the replica the host talks to, leader or not; the lease
                # the stopped one released is taken at the other's next round.
                await wait_until(lambda: other.leader.leading, 30, "the other leads")
        finally:
            await second_stack.aclose()
