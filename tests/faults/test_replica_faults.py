"""Replicas under faults: two controller processes on one store, real agents, a real 3-node Kafka.

1. **The leader is killed (kill -9) in the middle of a rotation**: the other replica takes the
   lease within a bound (measured and noted: kill → new lease epoch → the rotation's event
   published), every outbox event is on the topic exactly once and in order, every host
   converges through either replica, and the audit log verifies (the fleet invariants).
2. **Split brain**: the leader freezes (SIGSTOP) holding a batch it read and signed but did not
   send, past its lease; the other takes over and publishes; the old one is continued
   (SIGCONT) and goes on to send its batch: it publishes and signs nothing (the topic holds
   each event once, in order; its log shows no checkpoint and no producer after it woke),
   and it steps down.
3. **PostgreSQL restarted under load** (PostgreSQL only, on a server of the test's own): while
   operators rotate through the CLI against both replicas and agents ack, the server is
   stopped twice (a fast shutdown, then a crash: kill -9 of every server process) until a
   rotation is refused, and started again on its data and port; each replica reconnects by
   itself, every rotation the CLI saw acknowledged is in the store and published once, in
   order, both replicas serve again and one leads, the fleet invariants hold and
   ``ckms audit verify`` passes.

Each replica is ``tests/faults/controller_proc.py`` with the shared store and host key; every
test runs on both store backends (``store_target``: one SQLite file, or one database on the
session's real PostgreSQL), ``--store-backend`` picks one. The leader-kill rotation covers 50
hosts: real agents, run as tasks of the test process (one process, 50 agent daemons, each with
its own state, SSH connections and Kafka consumer), as the 50-host broker fault does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckms.controller.hosts import HostRegistry
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.operators import OperatorRegistry
from ckms.controller.sealing import Vault
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.devpostgres import LocalPostgres
from ckms.protocol import InstallSpec, Targets
from ckms.store import Store, utc_now
from ckms.store import lease as leases
from tests.faults.controller_proc import FREEZE_ENV, REPLICA_ENV
from tests.faults.harness import (
    ControllerProcess,
    ControllerView,
    Expected,
    Host,
    InProcessFleet,
    RevocationWatch,
    assert_fleet_invariants,
    enroll_host,
    envelope,
    finishes_within,
    outbox_empty,
    process_state,
    read_topic,
    wait_converged,
)
from tests.support.cli import CLI_TIMEOUT_S, make_ssh_key, run_cli
from tests.support.controller import PASSPHRASE
from tests.support.fleet import wait_until
from tests.support.postgres import create_database
from tests.support.stores import StoreTarget

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

Note = Callable[[str], None]
Topic = Callable[[str], str]

KEY = "web/tls"
WEB = {"env": "prod", "role": "web"}
TARGETS = Targets(selectors=(WEB,))
KEYRING = InstallSpec(path="/etc/ckms/{team}/{purpose}.json", format="keyring-json")
LEASE_S = 3.0
HOSTS = ("web-1", "web-2", "web-3", "web-4")
FLEET_50 = tuple(f"web-{i:02d}" for i in range(50))
SLOW_50 = {"CKMS_AGENT_HEARTBEAT_INTERVAL_S": "5", "CKMS_AGENT_KAFKA_FETCH_MAX_WAIT_MS": "1000"}
"""50 agents in the test's event loop: heartbeats and long polls slowed down to fit 2 cores."""


@dataclass
class Replicas:
    procs: dict[str, ControllerProcess]
    ports: dict[str, int]
    view: ControllerView
    store: Store
    lifecycle: Lifecycle
    hosts: list[Host]

    async def lease(self) -> leases.LeaseState:
        state = await leases.read_lease(self.store)
        assert state is not None
        return state

    async def leader(self) -> str:
        """The replica holding a lease that has not expired."""

        async def held() -> str | None:
            state = await leases.read_lease(self.store)
            if state is None or state.expires_at <= utc_now():
                return None
            return state.holder_name

        return str(await wait_until(held, 60, "a leader"))


def store_settings(target: StoreTarget) -> dict[str, str]:
    """The replicas' store settings for ``target`` (JSON for the controller process)."""
    return {k: str(v) for k, v in target.settings().items()}


@asynccontextmanager
async def replicas(
    cluster: LocalKafka,
    unique_topic: Topic,
    tmp_path: Path,
    target: StoreTarget,
    host_names: tuple[str, ...] = HOSTS,
    **env: str,
) -> AsyncIterator[Replicas]:
    """Two replicas on one store and shared host key; the test's own handle on the store;
    hosts that know both replicas (enrolled, not yet running), and a key targeting them."""
    events, fleet, audit = unique_topic("events"), unique_topic("fleet"), unique_topic("audit")
    procs: dict[str, ControllerProcess] = {}
    for name in ("ctl-a", "ctl-b"):
        settings = {
            **store_settings(target),
            "replica_name": name,
            "leader_lease_s": LEASE_S,
            "audit_topic": audit,
        }
        procs[name] = ControllerProcess(
            tmp_path / name,
            cluster.link(SubjectRole.CONTROLLER, "controller"),
            events,
            fleet,
            tmp_path / f"{name}.log",
            **{REPLICA_ENV: json.dumps(settings)},
            **env,
        )
    try:
        ports = {"ctl-a": (await procs["ctl-a"].start())["port"]}
        (tmp_path / "ctl-b").mkdir(mode=0o700)
        key_file = "ssh_host_ed25519_key"
        shutil.copy2(tmp_path / "ctl-a" / key_file, tmp_path / "ctl-b" / key_file)
        ready_b = await procs["ctl-b"].start()
        ports["ctl-b"] = ready_b["port"]
        assert ready_b["fingerprint"] == procs["ctl-a"].ready["fingerprint"]
        async with await target.open() as store:
            vault = Vault(store)
            await vault.unseal_with_passphrase(PASSPHRASE, actor="test")
            lifecycle = Lifecycle(store, vault)
            registry = HostRegistry(store, vault)
            view = ControllerView(
                store,
                lifecycle,
                registry,
                await vault.public_key(),
                cluster.link(SubjectRole.CONTROLLER, "controller"),
                cluster.link(SubjectRole.SUBSCRIBER, "fault-checks"),
                events,
                fleet,
            )
            hosts: list[Host] = []
            for start in range(0, len(host_names), 10):  # a few enrollments at a time
                hosts += await asyncio.gather(
                    *(
                        enroll_host(
                            registry,
                            ports["ctl-a"],
                            ready_b["fingerprint"],
                            tmp_path / "hosts",
                            name,
                            WEB,
                            cluster.ca,
                            more_ports=[ports["ctl-b"]],
                        )
                        for name in host_names[start : start + 10]
                    )
                )
            await lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
            yield Replicas(procs, ports, view, store, lifecycle, hosts)
    finally:
        for proc in procs.values():
            await proc.terminate()


def seqs_on_topic(records: list[Any]) -> list[int]:
    return [envelope(r)["seq"] for r in records]


async def assert_each_event_once_in_order(r: Replicas) -> list[int]:
    """Every outbox row is on its topic once (the events topic, or the fleet topic for
    ``fleet.acked``), and each partition holds its events in seq order."""
    seqs: list[int] = []
    for topic in (r.view.events_topic, r.view.fleet_topic):
        by_partition: dict[int, list[int]] = {}
        for record in await read_topic(r.view.reader, topic):
            by_partition.setdefault(record.partition, []).append(envelope(record)["seq"])
        for on_partition in by_partition.values():
            assert on_partition == sorted(set(on_partition)), (topic, by_partition)
            seqs += on_partition
    rows = [int(x["seq"]) for x in await r.store.fetchall("SELECT seq FROM outbox ORDER BY seq")]
    assert sorted(seqs) == rows, (sorted(seqs), rows)
    return rows


@pytest.mark.timeout(360)
@pytest.mark.requirement("ISO27002-8.14")
async def test_leader_killed_mid_rotation_of_50_hosts_the_other_replica_takes_over(
    healthy_cluster: LocalKafka,
    unique_topic: Topic,
    tmp_path: Path,
    store_target: StoreTarget,
    note: Note,
) -> None:
    async with replicas(healthy_cluster, unique_topic, tmp_path, store_target, FLEET_50) as r:
        fleet = InProcessFleet(r.hosts, **SLOW_50)
        async with fleet, RevocationWatch(r.store, r.hosts) as watch:
            await wait_converged(r.view, [KEY], r.hosts, 120)
            await wait_until(lambda: outbox_empty(r.store), 30, "key.created published")
            leader = await r.leader()
            epoch = (await r.lease()).epoch
            follower = next(n for n in r.procs if n != leader)

            await r.lifecycle.rotate(KEY, actor="alice")  # as an operator on any replica
            killed_at = time.monotonic()
            assert await r.procs[leader].kill() == -signal.SIGKILL
            unsent_at_kill = await r.store.fetchval(
                "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
            )

            async def taken_over() -> bool:
                state = await leases.read_lease(r.store)
                return state is not None and state.epoch > epoch

            await wait_until(taken_over, 3 * LEASE_S + 30, "a new leader")
            took_over_s = time.monotonic() - killed_at
            state = await r.lease()
            assert state.holder_name == follower and state.epoch == epoch + 1
            await wait_until(lambda: outbox_empty(r.store), 60, "the rotation published")
            published_s = time.monotonic() - killed_at
            # The bound: the dead leader's lease runs out (at most LEASE_S after its last
            # renewal) and the follower's next round (every LEASE_S / 3) takes it.
            assert took_over_s <= LEASE_S + LEASE_S / 3 + 5, took_over_s
            note(
                f"[{store_target.engine}] leader {leader} SIGKILLed with {unsent_at_kill} "
                f"event(s) unpublished: {follower} led after {took_over_s:.2f} s "
                f"(lease {LEASE_S:g} s), the rotation published after {published_s:.2f} s"
            )
            stats = await assert_fleet_invariants(
                r.view, [KEY], r.hosts, Expected(creates=1, rotates=1), watch
            )
        rows = await assert_each_event_once_in_order(r)
        note(f"invariants held: {stats}; events on the topic once, in order: {rows}")


@pytest.mark.timeout(360)
@pytest.mark.requirement("ISO27002-8.14")
async def test_split_brain_a_frozen_leader_publishes_and_signs_nothing_and_steps_down(
    healthy_cluster: LocalKafka,
    unique_topic: Topic,
    tmp_path: Path,
    store_target: StoreTarget,
    note: Note,
) -> None:
    freeze = tmp_path / "freeze-with-batch"
    env = {FREEZE_ENV: str(freeze)}
    async with replicas(healthy_cluster, unique_topic, tmp_path, store_target, **env) as r:
        async with InProcessFleet(r.hosts), RevocationWatch(r.store, r.hosts) as watch:
            await wait_converged(r.view, [KEY], r.hosts)
            await wait_until(lambda: outbox_empty(r.store), 30, "key.created published")
            leader = await r.leader()
            epoch = (await r.lease()).epoch
            follower = next(n for n in r.procs if n != leader)
            old = r.procs[leader]

            # A change committed; the leader freezes with its event signed, in hand, not sent.
            freeze.write_text("")
            await r.lifecycle.rotate(KEY, actor="alice")
            await wait_until(lambda: process_state(old.pid) == "T", 30, "leader frozen")
            assert '"frozen_with"' in old.tail()

            async def taken_over() -> bool:
                state = await leases.read_lease(r.store)
                return state is not None and state.epoch > epoch

            await wait_until(taken_over, 3 * LEASE_S + 30, "the follower takes over")
            await wait_until(lambda: outbox_empty(r.store), 60, "the new leader publishes")
            await r.lifecycle.rotate(KEY, actor="alice")  # a change under the new leader
            await wait_until(lambda: outbox_empty(r.store), 60, "published by the new leader")
            before = seqs_on_topic(await read_topic(r.view.reader, r.view.events_topic))
            checkpoints = await r.store.fetchval("SELECT count(*) FROM audit_checkpoints")

            with old.log.open("ab") as log:
                log.write(b"--- test: SIGCONT ---\n")
            os.kill(old.pid, signal.SIGCONT)

            def woke_log() -> str:
                return old.log.read_text(errors="replace").split("--- test: SIGCONT ---")[-1]

            await wait_until(
                lambda: "no longer leads" in woke_log(), 30, "the old leader steps down"
            )
            # Stepping down cancels the leader work before it logs: whatever it held when it
            # froze was refused (fenced commit, lease check) or is gone by now.
            after_log = woke_log()
            assert "audit checkpoint signed" not in after_log, after_log
            assert "relay to" not in after_log, after_log  # no producer started after waking
            state = await r.lease()
            assert state.holder_name == follower and state.epoch == epoch + 1
            after = seqs_on_topic(await read_topic(r.view.reader, r.view.events_topic))
            assert after[: len(before)] == before
            stats = await assert_fleet_invariants(
                r.view, [KEY], r.hosts, Expected(creates=1, rotates=2), watch
            )
            # The checkpoints signed since the freeze are the new leader's (its log says so).
            new_cps = await r.store.fetchval("SELECT count(*) FROM audit_checkpoints")
            signed = (
                r.procs[follower]
                .log.read_text(errors="replace")
                .count(f"(leader epoch {epoch + 1})")
            )
            assert new_cps - checkpoints <= signed
        rows = await assert_each_event_once_in_order(r)
        note(
            f"[{store_target.engine}] old leader {leader} woke and stepped down; "
            f"invariants held: {stats}; {rows}"
        )


@dataclass
class RotationLoad:
    """Operators rotating a key through the real CLI, one rotation after another, each call
    given both replicas (alternately first); what each call answered is kept."""

    env: dict[str, str]
    ports: list[int]
    acknowledged: list[int] = field(default_factory=list)
    """The version each successful ``ckms key rotate`` reported (the change it acknowledged)."""
    refused: list[str] = field(default_factory=list)
    """What the failed calls said (the store was unreachable)."""

    stopping: bool = False

    async def run(self) -> None:
        """Rotate until :attr:`stopping` is set (a call under way finishes: its answer counts)."""
        for turn in itertools.count():
            if self.stopping:
                return
            order = self.ports if turn % 2 == 0 else self.ports[::-1]
            await self.rotate(",".join(f"127.0.0.1:{p}" for p in order))

    async def rotate(self, controllers: str) -> int | None:
        run = await run_cli(
            "key", "rotate", KEY, "--json", env={**self.env, "CKMS_CONTROLLER": controllers}
        )
        if run.rc != 0:
            self.refused.append(run.stderr.strip()[-300:])
            return None
        version = int(run.json()["key"]["versions"][-1]["version"])
        self.acknowledged.append(version)
        return version


async def cli_as_operator(r: Replicas, home: Path) -> dict[str, str]:
    """Add the operator ``alice`` (admin) to the shared store; the CLI's environment as her."""
    identity, public = make_ssh_key(home / "alice")
    await OperatorRegistry(r.store).add("alice", "admin", public, actor="test-setup")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    env.update(
        CKMS_CONTROLLER_FINGERPRINT=r.procs["ctl-a"].ready["fingerprint"],
        CKMS_USER="alice",
        CKMS_IDENTITY=str(identity),
        COLUMNS="200",
    )
    return env


@pytest.mark.timeout(300)
@pytest.mark.postgres
@pytest.mark.requirement("ISO27002-8.14")
async def test_postgresql_restarted_under_load_replicas_reconnect_and_lose_nothing_acknowledged(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    # A server of the test's own: the session's is shared by tests that must not see it go.
    async with LocalPostgres() as server:
        target = StoreTarget.postgresql(await create_database(server))
        async with replicas(healthy_cluster, unique_topic, tmp_path, target) as r:
            load = RotationLoad(await cli_as_operator(r, tmp_path / "keys"), list(r.ports.values()))
            async with InProcessFleet(r.hosts), RevocationWatch(r.store, r.hosts) as watch:
                await wait_converged(r.view, [KEY], r.hosts)
                rotating = asyncio.create_task(load.run(), name="rotation-load")
                restarts = []
                try:
                    for crash in (False, True):  # a fast shutdown, then a crash (kill -9)
                        before = len(load.acknowledged)
                        await wait_until(
                            lambda n=before: len(load.acknowledged) > n, 60, "a rotation acked"
                        )
                        # Down until the CLI was refused at least once, then up on the same
                        # data and port.
                        refused = len(load.refused)
                        stopped = time.monotonic()
                        await server.stop_server(kill=crash)
                        await wait_until(
                            lambda n=refused: len(load.refused) > n, 60, "a rotation refused"
                        )
                        await server.start_server()
                        down_s = time.monotonic() - stopped
                        during = len(load.acknowledged)
                        await wait_until(
                            lambda n=during: len(load.acknowledged) > n,
                            90,
                            "a rotation acknowledged after the restart",
                        )
                        restarts.append(
                            f"{'crash' if crash else 'fast shutdown'}: down {down_s:.1f} s, "
                            f"a rotation acknowledged {time.monotonic() - stopped:.1f} s "
                            "after the stop"
                        )
                finally:
                    load.stopping = True
                    await finishes_within(rotating, 2 * CLI_TIMEOUT_S, "the rotation load")
                # Each replica serves operators again on its own, and one of them leads.
                leader = await r.leader()
                for name, port in r.ports.items():
                    assert await load.rotate(f"127.0.0.1:{port}") is not None, load.refused[-1:]
                    status = await run_cli(
                        "status",
                        "--json",
                        env={**load.env, "CKMS_CONTROLLER": f"127.0.0.1:{port}"},
                    )
                    assert status.rc == 0, status.stderr
                    lead = status.json()["leadership"]
                    assert lead["replica"] == name and lead["leader"] == leader, lead
                    assert lead["leading"] == (name == leader), lead

                # Every rotation the CLI saw acknowledged is in the store, published, audited.
                key = await r.lifecycle.get(KEY)
                versions = [v.version for v in key.versions]
                assert set(load.acknowledged) <= set(versions), (load.acknowledged, versions)
                assert len(set(load.acknowledged)) == len(load.acknowledged)
                stats = await assert_fleet_invariants(
                    r.view, [KEY], r.hosts, Expected(creates=1, rotates=len(versions) - 1), watch
                )
            rows = await assert_each_event_once_in_order(r)
            verify = await run_cli(
                "audit",
                "verify",
                env={**load.env, "CKMS_CONTROLLER": f"127.0.0.1:{r.ports[leader]}"},
            )
            assert verify.rc == 0, verify.stdout + verify.stderr
        note(
            f"{'; '.join(restarts)}; acknowledged versions {load.acknowledged}, "
            f"{len(load.refused)} call(s) refused while the server was down, key at "
            f"v{max(versions)}; {leader} leads; invariants held: {stats}; "
            f"{len(rows)} events on the topics once, in order"
        )
