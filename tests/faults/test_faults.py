"""Fault scenarios against a real 3-node Kafka cluster, real controllers and real agents.

Each test injects one kind of failure in the middle of key lifecycle work and then checks the
same invariants (``harness.assert_fleet_invariants``): every targeted host converges, no ack,
event or audit record is lost, the audit log verifies, and no host holds a revoked version
after it acknowledged the revocation (watched on disk for the whole test).

How each fault is injected:

1. broker: SIGKILL the node leading the key's events partition once the first of 50 in-process
   agents acked the new version; revoke while it is down; restart it; rotate again.
2. controller: a controller *process* whose outbox publisher is held by a fault hook
   (``controller_proc.py``) while a rotation and a revocation are committed through the store
   (the same ``Lifecycle`` code the admin RPC runs); it then reads the committed rows and stops
   itself (SIGSTOP) before sending them; the test SIGKILLs it and starts it again.
3. agent crash: ``ckms-agent run`` processes; one dies with ``CKMS_AGENT_FAULT=
   crash-before-rename`` while installing the rotation, one is SIGKILLed inside a slow reload
   hook (file renamed, nothing recorded or acked); the key is revoked while both are down.
4. agent freeze: SIGSTOP an agent process through a rotation and a revocation, then SIGCONT.
5. Kafka down: SIGKILL all three nodes, make seven lifecycle changes (the outbox fills, agents
   converge over SSH, and their acks are applied while ``fleet.acked`` waits in the outbox),
   then start the nodes again.
6. controller restarted with acks held: the SSH endpoint closes, a revocation reaches eight
   hosts by its signed event, each queues its ack; the controller restarts, and restarts again
   while those acks arrive. Every ack is applied and republished exactly once.
7. revocation with the controller down: the event is on Kafka, the controller stopped; the
   hosts remove the key at once (the time measured from each host's own signed ack), and the
   acks arrive when the controller is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckms._kafka import ensure_topics
from ckms.controller.hosts import HostRegistry
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.sealing import Vault
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.protocol import InstallSpec, RevocationReason, Targets
from ckms.store import Store, parse_time
from ckms_agent.files import TEMP_MARK
from tests.faults.controller_proc import HOLD_ENV
from tests.faults.harness import (
    ControllerProcess,
    ControllerView,
    Expected,
    Host,
    InProcessFleet,
    RevocationWatch,
    agent_processes,
    assert_fleet_invariants,
    converged_hosts,
    enroll_host,
    enroll_hosts,
    envelope,
    finishes_within,
    fleet_acked,
    outbox_empty,
    partition_leader,
    process_state,
    read_topic,
    restart_stopped_nodes,
    wait_converged,
)
from tests.support.controller import PASSPHRASE, running_controller
from tests.support.fleet import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

Note = Callable[[str], None]
Topic = Callable[[str], str]

KEY = "web/tls"
DB_KEY = "db/password"
WEB = {"env": "prod", "role": "web"}
TARGETS = Targets(selectors=(WEB,))
KEYRING = InstallSpec(path="/etc/ckms/{team}/{purpose}.json", format="keyring-json")
RAW = InstallSpec(path="/etc/ckms/{team}/{purpose}.key")
COMPROMISE = RevocationReason.KEY_COMPROMISE


async def acked(view: ControllerView, key: str, version: int, status: str = "installed") -> int:
    """How many hosts acknowledged ``version`` of ``key`` with ``status``."""
    k = await view.lifecycle.get(key)
    return int(
        await view.store.fetchval(
            "SELECT count(*) FROM fleet_state WHERE key_id = ? AND version = ? AND status = ?",
            (k.id, version, status),
        )
    )


async def key_partition(view: ControllerView, key: str) -> int:
    """The events partition that carries ``key`` (found where its events landed)."""
    await wait_until(lambda: outbox_empty(view.store), 30, "the outbox sent")
    for record in await read_topic(view.reader, view.events_topic):
        if envelope(record)["data"].get("key") == key:
            return int(record.partition)
    raise AssertionError(f"no event of {key} on {view.events_topic}")


async def lifecycle_backlog(store: Store) -> int:
    """Unsent outbox rows that announce changes (not the fleet.acked that republish acks)."""
    value = await store.fetchval(
        "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND type != 'fleet.acked'"
    )
    return int(value or 0)


def kill_pid_in(pid_file: Path) -> None:
    """SIGKILL the process whose id the file holds."""
    os.kill(int(pid_file.read_text()), signal.SIGKILL)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"*{TEMP_MARK}*")] if root.exists() else []


# -- 1. a broker dies (kill -9) in the middle of a rotation of 50 hosts ---------------------------


@pytest.mark.timeout(360)
async def test_broker_killed_mid_rotation_of_50_hosts(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    cluster = healthy_cluster
    async with running_controller(
        tmp_path / "controller",
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        unique_topic("events"),
        unique_topic("fleet"),
        replication=3,
    ) as c:
        await ensure_topics(c.settings.kafka, c.settings.topic_specs())
        view = await ControllerView.of(c)
        hosts = await enroll_hosts(c, tmp_path / "hosts", [f"web-{i:02d}" for i in range(50)], WEB)
        await c.lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
        # 50 agents in this event loop: heartbeats and long polls slowed down to fit 2 cores.
        fleet = InProcessFleet(
            hosts,
            CKMS_AGENT_HEARTBEAT_INTERVAL_S="5",
            CKMS_AGENT_KAFKA_FETCH_MAX_WAIT_MS="1000",
        )
        async with fleet, RevocationWatch(c.store, hosts) as watch:
            await wait_converged(view, [KEY], hosts, 120)
            partition = await key_partition(view, KEY)
            node = await partition_leader(view.kafka, view.events_topic, partition) - 1

            # SIGKILL the leader of the key's partition as soon as the rotation commits: waiting
            # for a first ack let a loaded machine see all 50 land in one poll, before the kill.
            await c.lifecycle.rotate(KEY, actor="alice")
            await cluster.stop_node(node, kill=True)
            done = await acked(view, KEY, 2)
            note(f"SIGKILL node {node} (leader of events/{partition}) at {done}/50 acks")
            assert done < 50, "the rotation was over before the broker died"

            await wait_converged(view, [KEY], hosts, 120)  # on the two remaining nodes
            await c.lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")
            await wait_converged(view, [KEY], hosts, 120)
            await cluster.start_node(node)
            await c.lifecycle.rotate(KEY, actor="alice")
            stats = await assert_fleet_invariants(
                view,
                [KEY],
                hosts,
                Expected(creates=1, rotates=2, revokes=1, removed={(KEY, 1)}),
                watch,
            )
    note(f"invariants held: {stats}")


# -- 2. the controller dies (kill -9) between the commit and the publish --------------------------


@pytest.mark.timeout(240)
async def test_controller_killed_between_commit_and_publish(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    cluster = healthy_cluster
    events, fleet = unique_topic("events"), unique_topic("fleet")
    home = tmp_path / "controller"
    hold = tmp_path / "hold-outbox"
    proc = ControllerProcess(
        home,
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        events,
        fleet,
        tmp_path / "controller.log",
        **{HOLD_ENV: str(hold)},
    )
    ready = await proc.start()
    try:
        # The test's own handle on the controller's store: it commits lifecycle changes through
        # the same Lifecycle code (one transaction: version, audit record, outbox row).
        async with await Store.open(home / "controller.db") as store:
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
            hosts = [
                await enroll_host(
                    registry,
                    ready["port"],
                    ready["fingerprint"],
                    tmp_path / "hosts",
                    name,
                    WEB,
                    cluster.ca,
                )
                for name in ("web-1", "web-2", "web-3")
            ]
            await lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
            async with InProcessFleet(hosts), RevocationWatch(store, hosts) as watch:
                await wait_converged(view, [KEY], hosts)
                await wait_until(lambda: outbox_empty(store), 30, "key.created published")

                hold.write_text("2")  # publish nothing until both changes are committed
                await lifecycle.rotate(KEY, actor="alice")
                await lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")
                await wait_until(lambda: process_state(proc.pid) == "T", 30, "controller frozen")
                unsent = await store.fetchall(
                    "SELECT event_id, type FROM outbox WHERE sent_at IS NULL "
                    "AND type != 'fleet.acked' ORDER BY seq"
                )
                assert [r["type"] for r in unsent] == ["key.rotated", "key.revoked"]
                published = {envelope(r)["id"] for r in await read_topic(view.reader, events)}
                assert not published & {r["event_id"] for r in unsent}, "sent before the crash"
                assert await proc.kill() == -signal.SIGKILL
                hold.unlink()
                # No check that nobody acked v2 yet: an agent's periodic sync may learn v2 from
                # the controller before its event is published (sync gives correctness); the
                # topic check above is what proves the events were not sent before the crash.
                note(f"controller SIGKILLed with {len(unsent)} committed events unsent")

                await proc.start()  # same home, same port: agents reconnect by themselves
                stats = await assert_fleet_invariants(
                    view,
                    [KEY],
                    hosts,
                    Expected(creates=1, rotates=1, revokes=1, removed={(KEY, 1)}),
                    watch,
                )
            # Never sent before the crash, so each went out exactly once after the restart.
            on_topic = [envelope(r)["id"] for r in await read_topic(view.reader, events)]
            assert all(on_topic.count(r["event_id"]) == 1 for r in unsent)
    finally:
        await proc.terminate()
    note(f"invariants held: {stats}")


# -- 3. an agent dies (kill -9) in the middle of an install ---------------------------------------

# The reload hook ("gated", which every fault-suite host defines in its own config) blocks
# (and says where) only for the agent started with FAULT_GATE set while the gate file exists;
# for every other agent and run it does nothing.


@pytest.mark.timeout(240)
async def test_agent_killed_mid_install_then_restarted(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    cluster = healthy_cluster
    spec = KEYRING.model_copy(update={"reload": "gated"})
    gate = tmp_path / "gate"
    async with running_controller(
        tmp_path / "controller",
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        unique_topic("events"),
        unique_topic("fleet"),
        replication=3,
    ) as c:
        await ensure_topics(c.settings.kafka, c.settings.topic_specs())
        view = await ControllerView.of(c)
        hosts = await enroll_hosts(c, tmp_path / "hosts", ["web-a", "web-b", "web-c"], WEB)
        await c.lifecycle.create(KEY, "aes-256", targets=TARGETS, install=spec, actor="alice")
        logs = tmp_path / "logs"
        logs.mkdir()
        async with agent_processes(hosts, logs) as procs, RevocationWatch(c.store, hosts) as watch:
            a, b, other = procs["web-a"], procs["web-b"], procs["web-c"]
            await asyncio.gather(a.start(), b.start(FAULT_GATE=str(gate)), other.start())
            await wait_converged(view, [KEY], hosts)
            assert await a.terminate() == 0
            await a.start(CKMS_AGENT_FAULT="crash-before-rename")
            gate.touch()

            await c.lifecycle.rotate(KEY, actor="alice")
            # web-a: dies between writing the new keyring (fsync'd temp file) and the rename.
            assert await a.wait_exit(60) == 137, a.tail()
            assert temp_files(a.host.root), "the crash should leave a temp file behind"
            # web-b: the new keyring is in place, its reload hook hangs: SIGKILL the agent (and
            # the hook, which runs in its own session, as systemd would kill the unit's cgroup).
            pid_file = Path(f"{gate}.pid")
            await wait_until(pid_file.exists, 60, "web-b inside its reload hook")
            assert await b.kill() == -signal.SIGKILL
            kill_pid_in(pid_file)
            gate.unlink()
            # Only web-c acks v2 (its ack may still be on its way: bounded wait, then exact).
            await wait_until(lambda: acked(view, KEY, 2), 30, "web-c acks v2")
            assert await acked(view, KEY, 2) == 1
            note("web-a crashed before rename, web-b SIGKILLed in its reload hook")

            # Revoked while both are down; both restart into it.
            await c.lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")
            await wait_until(lambda: acked(view, KEY, 1, "removed"), 30, "web-c removed v1")
            await asyncio.gather(a.start(), b.start(FAULT_GATE=str(gate)))
            stats = await assert_fleet_invariants(
                view,
                [KEY],
                hosts,
                Expected(creates=1, rotates=1, revokes=1, removed={(KEY, 1)}),
                watch,
            )
            assert temp_files(a.host.root) == []
        assert "removed leftover temp file" in a.log.read_text()
    note(f"invariants held: {stats}")


# -- 4. an agent is frozen (SIGSTOP) through a rotation and a revocation --------------------------


@pytest.mark.timeout(240)
async def test_agent_frozen_through_rotation_and_revocation(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    cluster = healthy_cluster
    async with running_controller(
        tmp_path / "controller",
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        unique_topic("events"),
        unique_topic("fleet"),
        replication=3,
    ) as c:
        await ensure_topics(c.settings.kafka, c.settings.topic_specs())
        view = await ControllerView.of(c)
        hosts = await enroll_hosts(c, tmp_path / "hosts", ["web-0", "web-1", "web-2"], WEB)
        frozen, live = hosts[0], hosts[1:]
        await c.lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
        logs = tmp_path / "logs"
        logs.mkdir()
        async with (
            agent_processes([frozen], logs) as procs,
            InProcessFleet(live),
            RevocationWatch(c.store, hosts) as watch,
        ):
            agent = procs[frozen.name]
            await agent.start()
            await wait_converged(view, [KEY], hosts)
            on_disk = (frozen.root / "etc/ckms/web/tls.json").read_bytes()

            agent.send(signal.SIGSTOP)
            await wait_until(lambda: process_state(agent.pid) == "T", 10, "agent frozen")
            await c.lifecycle.rotate(KEY, actor="alice")
            await wait_converged(view, [KEY], live)
            await c.lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")
            await wait_converged(view, [KEY], live)
            assert frozen.name not in await converged_hosts(view, KEY)
            assert (frozen.root / "etc/ckms/web/tls.json").read_bytes() == on_disk
            note("agent frozen while the others rotated and removed v1")

            agent.send(signal.SIGCONT)
            stats = await assert_fleet_invariants(
                view,
                [KEY],
                hosts,
                Expected(creates=1, rotates=1, revokes=1, removed={(KEY, 1)}),
                watch,
            )
    note(f"invariants held: {stats}")


# -- 5. the outbox fills while Kafka is entirely down -----------------------------------------


@pytest.mark.timeout(300)
async def test_outbox_fills_while_kafka_is_down_then_drains(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    cluster = healthy_cluster
    home = tmp_path / "controller"
    topics = (
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        unique_topic("events"),
        unique_topic("fleet"),
    )
    # Agents keep converging over SSH (sync every 5 s) while Kafka is away.
    settings: dict[str, Any] = {"replication": 3, "reconcile_interval_s": 5}
    first = running_controller(home, *topics, **settings)
    c = await first.__aenter__()
    try:
        await ensure_topics(c.settings.kafka, c.settings.topic_specs())
        port = c.port
        hosts = await enroll_hosts(c, tmp_path / "hosts", ["web-1", "web-2", "web-3"], WEB)
        await c.lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
        async with (
            await Store.open(home / "controller.db") as store,  # outlives the first controller
            InProcessFleet(hosts) as fleet,
            RevocationWatch(store, hosts) as watch,
        ):
            await wait_converged(await ControllerView.of(c), [KEY], hosts)
            await wait_until(lambda: outbox_empty(c.store), 30, "key.created published")

            await asyncio.gather(*(cluster.stop_node(i, kill=True) for i in range(3)))
            await c.lifecycle.rotate(KEY, actor="alice")  # v2
            await c.lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")
            await c.lifecycle.create(DB_KEY, "aes-256", targets=TARGETS, install=RAW, actor="bob")
            await c.lifecycle.rotate(KEY, actor="alice")  # v3
            await c.lifecycle.revoke(
                KEY, RevocationReason.CESSATION_OF_OPERATION, version=2, actor="alice"
            )
            await c.lifecycle.rotate(DB_KEY, actor="bob")  # v2
            await c.lifecycle.rotate(KEY, actor="alice")  # v4
            assert await lifecycle_backlog(c.store) == 7

            async def synced_and_acked() -> bool:
                for agent in fleet.agents.values():
                    held = await agent.state.keys()
                    if KEY not in held or DB_KEY not in held:
                        return False
                    if set(held[KEY].versions) != {3, 4} or set(held[DB_KEY].versions) != {1, 2}:
                        return False
                    if await agent.state.pending_ack_count():
                        return False
                return True

            # Acks ride SSH: the fleet view follows while Kafka is away; only their fleet.acked
            # events wait in the outbox with the seven changes.
            await wait_until(synced_and_acked, 60, "agents synced and acked over SSH")
            await wait_converged(await ControllerView.of(c), [KEY, DB_KEY], hosts, 60)
            assert await c.publisher.backlog() > 7
            stats = c.publisher.stats
            await wait_until(
                lambda: stats.failures and not stats.connected, 60, "the outage reported"
            )
            # Stopping must not wait for Kafka: an agent, then the controller
            # with its outbox full (regression: both hung in aiokafka's flush until Kafka returned).
            agent_stop = await fleet.restart("web-1")
            started = time.monotonic()
            await finishes_within(first.__aexit__(None, None, None), 20, "stopping the controller")
            controller_stop, first = time.monotonic() - started, None
            note(
                f"Kafka down: outbox 7 (+ fleet.acked), {stats.last_error!r}; agent stopped in "
                f"{agent_stop:.1f} s, controller in {controller_stop:.1f} s"
            )

            async with running_controller(home, *topics, listen_port=port, **settings) as c:
                assert await lifecycle_backlog(c.store) == 7
                await restart_stopped_nodes(cluster)
                stats_out = await assert_fleet_invariants(
                    await ControllerView.of(c),
                    [KEY, DB_KEY],
                    hosts,
                    Expected(creates=2, rotates=4, revokes=2, removed={(KEY, 1)}),
                    watch,
                )
    finally:
        if first is not None:
            await finishes_within(first.__aexit__(None, None, None), 30, "stopping the controller")
    note(f"invariants held: {stats_out}")


# -- 6. the controller restarts while every host holds acks it has not delivered --------------


def _queued_acks(host: Host) -> list[dict[str, Any]]:
    """The acks waiting in a host's state DB, as it signed them (read from the DB file)."""
    conn = sqlite3.connect(host.state_db, timeout=10)
    try:
        rows = conn.execute("SELECT value FROM pending_acks ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [json.loads(bytes(r[0])) for r in rows]


@pytest.mark.timeout(300)
async def test_controller_restarted_while_agents_hold_unacked_changes(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    """Acks ride the agents' SSH connections: with the controller unreachable, eight hosts
    remove a revoked version from the signed event and queue their acks. The controller is
    restarted, then restarted again while those acks are arriving (a reply may be lost after
    its commit: the agent sends the batch again). Every ack is applied exactly once, and
    republished exactly once in a controller-signed ``fleet.acked``."""
    cluster = healthy_cluster
    home = tmp_path / "controller"
    topics = (
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        unique_topic("events"),
        unique_topic("fleet"),
    )
    settings: dict[str, Any] = {"replication": 3}
    first: Any = running_controller(home, *topics, **settings)
    c = await first.__aenter__()
    try:
        await ensure_topics(c.settings.kafka, c.settings.topic_specs())
        port = c.port
        hosts = await enroll_hosts(c, tmp_path / "hosts", [f"web-{i}" for i in range(8)], WEB)
        await c.lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
        await c.lifecycle.rotate(KEY, actor="alice")  # v2 primary, v1 kept in the keyring
        async with (
            await Store.open(home / "controller.db") as store,  # outlives each controller
            InProcessFleet(hosts) as fleet,
            RevocationWatch(store, hosts) as watch,
        ):
            await wait_converged(await ControllerView.of(c), [KEY], hosts)
            # The hosts lose the controller's SSH endpoint; its events still reach them.
            await c.rpc.close()
            await wait_until(
                lambda: not any(a.connected for a in fleet.agents.values()), 30, "disconnected"
            )
            await c.lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")

            async def held() -> bool:
                for host in hosts:
                    queued = await asyncio.to_thread(_queued_acks, host)
                    if not any(a["data"]["status"] == "removed" for a in queued):
                        return False
                return True

            await wait_until(held, 60, "every host removed v1 and holds its ack")
            applied_before = await store.fetchval(
                "SELECT count(*) FROM fleet_state WHERE status = 'removed'"
            )
            assert applied_before == 0
            await finishes_within(first.__aexit__(None, None, None), 30, "stopping")
            first = None

            # Restarted; restarted again as soon as the first acks land.
            second: Any = running_controller(home, *topics, listen_port=port, **settings)
            c = await second.__aenter__()
            try:
                await wait_until(lambda: c.acks.stats.applied, 60, "the first acks applied")
                mid = c.acks.stats.applied
            finally:
                await finishes_within(second.__aexit__(None, None, None), 30, "stopping")
            note(f"second controller stopped after applying {mid} acks")

            async with running_controller(home, *topics, listen_port=port, **settings) as c:
                await c.lifecycle.rotate(KEY, actor="alice")  # and the fleet goes on
                stats = await assert_fleet_invariants(
                    await ControllerView.of(c),
                    [KEY],
                    hosts,
                    Expected(creates=1, rotates=2, revokes=1, removed={(KEY, 1)}),
                    watch,
                )
                duplicates = (c.acks.stats.dropped or {}).get("replayed", 0)
    finally:
        if first is not None:
            await finishes_within(first.__aexit__(None, None, None), 30, "stopping")
    note(f"invariants held: {stats}; resent acks confirmed as duplicates: {duplicates}")


# -- 7. a revocation reaches the hosts while the controller is down -------------------------


@pytest.mark.timeout(300)
async def test_revocation_with_the_controller_down_removes_at_once_and_acks_follow(
    healthy_cluster: LocalKafka, unique_topic: Topic, tmp_path: Path, note: Note
) -> None:
    """The signed ``key.revoked`` is on Kafka and the controller is down (its SSH endpoint
    first, then the whole process): each host removes the key from the event alone, and says
    when in the ack it signs (its own clock); the acks are delivered once the controller is
    back, and its ``fleet.acked`` carries the hosts' own times."""
    cluster = healthy_cluster
    home = tmp_path / "controller"
    topics = (
        cluster.link(SubjectRole.CONTROLLER, "controller"),
        unique_topic("events"),
        unique_topic("fleet"),
    )
    settings: dict[str, Any] = {"replication": 3}
    first: Any = running_controller(home, *topics, **settings)
    c = await first.__aenter__()
    try:
        await ensure_topics(c.settings.kafka, c.settings.topic_specs())
        port = c.port
        hosts = await enroll_hosts(c, tmp_path / "hosts", [f"web-{i}" for i in range(5)], WEB)
        await c.lifecycle.create(KEY, "aes-256", targets=TARGETS, install=KEYRING, actor="alice")
        await c.lifecycle.rotate(KEY, actor="alice")  # v2 primary; v1 in every keyring
        rings = [h.root / "etc/ckms/web/tls.json" for h in hosts]

        def held(ring: Path) -> set[int]:
            return {int(e["version"]) for e in json.loads(ring.read_bytes())["versions"]}

        async with (
            await Store.open(home / "controller.db") as store,
            InProcessFleet(hosts) as fleet,
            RevocationWatch(store, hosts) as watch,
        ):
            await wait_converged(await ControllerView.of(c), [KEY], hosts)
            assert all(held(r) == {1, 2} for r in rings)
            await c.rpc.close()
            await wait_until(
                lambda: not any(a.connected for a in fleet.agents.values()), 30, "disconnected"
            )
            await c.lifecycle.revoke(KEY, COMPROMISE, version=1, actor="alice")
            await wait_until(lambda: outbox_empty(store), 30, "key.revoked on Kafka")
            await finishes_within(first.__aexit__(None, None, None), 30, "stopping")
            first = None  # the controller is down: no SSH, no publisher

            await wait_until(lambda: all(held(r) == {2} for r in rings), 30, "v1 removed")
            event_at = parse_time(
                await store.fetchval("SELECT created_at FROM outbox WHERE type = 'key.revoked'")
            )
            removal_ms: dict[str, float] = {}
            for host in hosts:
                [ack] = [
                    a for a in await asyncio.to_thread(_queued_acks, host)
                    if a["data"]["status"] == "removed"
                ]  # fmt: skip
                assert ack["data"]["version"] == 1 and ack["data"]["agent"] == host.name
                removal_ms[host.name] = (parse_time(ack["at"]) - event_at).total_seconds() * 1000
            times = sorted(removal_ms.values())
            note(
                f"commit → removed on the host (host's signed ack time): p50 "
                f"{times[len(times) // 2]:.0f} ms, max {times[-1]:.0f} ms"
            )
            assert (
                await store.fetchval("SELECT count(*) FROM fleet_state WHERE status = 'removed'")
                == 0
            ), "an ack was applied while the controller was down"

            async with running_controller(home, *topics, listen_port=port, **settings) as c:
                view = await ControllerView.of(c)
                stats = await assert_fleet_invariants(
                    view,
                    [KEY],
                    hosts,
                    Expected(creates=1, rotates=1, revokes=1, removed={(KEY, 1)}),
                    watch,
                )
                # The republished acks say when each host removed the key, by its own clock.
                republished = {
                    a["host"]: a["at"]
                    for e in await fleet_acked(view)
                    for a in e["data"]["acks"]
                    if a["status"] == "removed"
                }
                assert {
                    h: round((parse_time(at) - event_at).total_seconds() * 1000, 3)
                    for h, at in republished.items()
                } == {h: round(ms, 3) for h, ms in removal_ms.items()}
    finally:
        if first is not None:
            await finishes_within(first.__aexit__(None, None, None), 30, "stopping")
    note(f"invariants held: {stats}")
