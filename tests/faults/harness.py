"""Fault-suite harness: agents as processes, a watch over revoked material, and the invariants.

Every fault scenario ends with :func:`assert_fleet_invariants`, which checks the same promises
whatever the fault was:

- **convergence**: ``key_fleet_status`` says every targeted host converged, for every key;
- **no lost ack**: each agent's acks carry ``seq`` 1..N (N from its own state DB, whose queue is
  empty); the controller applied each exactly once (one ``fleet.ack`` audit record per seq,
  ``hosts.last_ack_seq`` = N) and republished each exactly once in a controller-signed
  ``fleet.acked`` on the fleet topic (counted over distinct events: a relay retry may repeat
  an event, never an ack), each host's primary version
  has an ``installed`` fleet row with the right digest and the revoked versions ``removed``.
  Agents may still answer late events with more acks, so this compares snapshots taken while
  no agent queued anything (:func:`ack_snapshot`), retried within a bound;
- **no lost event or audit record**: the audit log verifies; every outbox row is marked sent,
  is on the events topic and has its audit record (and no audit record names a missing row);
  ``key.create`` / ``key.rotate`` / ``key.revoke`` records are exactly as many as the changes;
- **revoked stays gone**: :class:`RevocationWatch` runs for the whole test, and from the moment
  a host's ``removed`` ack for a version that may no longer be distributed reaches the fleet
  view, no file under that host's root (temp files included) may hold that version's material.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.client import AIOKafkaClient

from ckms._kafka import partitions_of
from ckms._kafka_security import KafkaLink
from ckms.controller.fleet import key_fleet_status
from ckms.controller.hosts import HostRegistry
from ckms.controller.lifecycle import DISTRIBUTABLE_STATES, Lifecycle
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole, material_digest
from ckms.devkafka import DevCA, LocalKafka
from ckms.errors import StoreError
from ckms.protocol import EventType, trust_keys, verify_message
from ckms.ssh import Endpoint
from ckms.store import Store
from ckms.store import audit as audit_log
from ckms_agent.daemon import Agent
from ckms_agent.enroll import enroll
from tests.faults.controller_proc import KAFKA_SECURITY_ENV
from tests.support.fleet import FAST_AGENT, TEST_ALLOWED_PATHS, agent_config, wait_until
from tests.support.kafka import dev_ca, link_as, use_test_broker_certificate

log = logging.getLogger(__name__)

AGENT_BIN = str(Path(sys.executable).parent / "ckms-agent")
REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")


# -- the controller as the checks see it ---------------------------------------------------------


@dataclass
class ControllerView:
    """What the invariants read: the controller's store and topics (in this process or not)."""

    store: Store
    lifecycle: Lifecycle
    hosts: HostRegistry
    public_key: bytes
    kafka: KafkaLink
    """As the controller."""
    reader: KafkaLink
    """As a subscriber: reads the events and the fleet topic."""
    events_topic: str
    fleet_topic: str

    @classmethod
    async def of(cls, c: Controller) -> ControllerView:
        """The view of an in-process controller."""
        assert c.store is not None
        return cls(
            c.store,
            c.lifecycle,
            c.hosts,
            await c.vault.public_key(),
            c.settings.kafka,
            link_as(c, SubjectRole.SUBSCRIBER, "fault-checks"),
            c.settings.events_topic,
            c.settings.fleet_topic,
        )


@dataclass(frozen=True)
class Host:
    """One enrolled host of the test: its agent config, key root and state DB."""

    name: str
    config: Path

    @property
    def root(self) -> Path:
        return self.config.parent / "root"

    @property
    def state_db(self) -> Path:
        return self.config.parent / "state" / "state.db"

    @property
    def digest_key_path(self) -> Path:
        return self.config.parent / "state" / "digest.key"


FAULT_HOST_POLICY = {
    "allowed_paths": TEST_ALLOWED_PATHS,
    "hooks": {
        "gated": {
            "reload": [
                "sh",
                "-c",
                'if [ -n "$FAULT_GATE" ] && [ -e "$FAULT_GATE" ]; then '
                'echo $$ > "$FAULT_GATE.pid"; exec sleep 120; fi',
            ],
            "timeout_s": 180,
        }
    },
}
"""What each fault-suite host allows, in its own config: the test install roots, and a reload
hook that blocks only for the agent started with FAULT_GATE set while the gate file exists."""


async def enroll_host(
    hosts: HostRegistry,
    port: int,
    fingerprint: str,
    base: Path,
    name: str,
    labels: dict[str, str],
    ca: DevCA,
    more_ports: Sequence[int] = (),
) -> Host:
    """Create a token and enroll a real agent with it over SSH (the controller may be remote);
    ``more_ports``: other replicas the agent knows too."""
    token = await hosts.create_token(name, labels, actor="alice")
    config = base / name / "agent.toml"
    await enroll(
        controllers=[Endpoint("127.0.0.1", p) for p in (port, *more_ports)],
        token=token.token,
        host_key_fingerprint=fingerprint,
        state_dir=base / name / "state",
        config_path=config,
        root=base / name / "root",
        policy=FAULT_HOST_POLICY,
    )
    use_test_broker_certificate(ca, config, name)
    return Host(name, config)


async def enroll_hosts(
    c: Controller, base: Path, names: Iterable[str], labels: dict[str, str]
) -> list[Host]:
    """Enroll several hosts with an in-process controller, a few at a time."""
    names = list(names)
    out: list[Host] = []
    for start in range(0, len(names), 10):
        out += await asyncio.gather(
            *(
                enroll_host(c.hosts, c.port, c.host_key_fingerprint, base, n, labels, dev_ca(c))
                for n in names[start : start + 10]
            )
        )
    return out


async def finishes_within(aw: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await ``aw`` for at most ``timeout_s``, else fail the test at once.

    Unlike ``asyncio.wait_for``, which waits for the cancelled work to wind down (forever, if
    the work hangs in its cleanup), a hang here is reported as what it is.
    """
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        raise AssertionError(f"{what} did not finish within {timeout_s:.0f} s")
    return task.result()


# -- agents ---------------------------------------------------------------------------------------


class InProcessFleet:
    """Real agents run as tasks in the test's event loop; started together, stopped together."""

    def __init__(self, hosts: Iterable[Host], **env: str) -> None:
        self.hosts = list(hosts)
        self._env = env
        self.agents: dict[str, Agent] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> InProcessFleet:
        for host in self.hosts:
            agent = Agent(agent_config(host.config, **self._env))
            self.agents[host.name] = agent
            self._tasks[host.name] = asyncio.create_task(agent.run(), name=f"agent-{host.name}")
        return self

    async def restart(self, name: str, stop_within_s: float = 15.0) -> float:
        """Stop one agent cleanly, which must take under ``stop_within_s``; start it again.

        Returns how long the stop took.
        """
        started = time.monotonic()
        self.agents[name].stop()
        await finishes_within(self._tasks[name], stop_within_s, f"stopping agent {name}")
        took = time.monotonic() - started
        host = next(h for h in self.hosts if h.name == name)
        agent = Agent(agent_config(host.config, **self._env))
        self.agents[name] = agent
        self._tasks[name] = asyncio.create_task(agent.run(), name=f"agent-{name}")
        return took

    async def __aexit__(self, *exc: object) -> None:
        for agent in self.agents.values():
            agent.stop()
        done, pending = await asyncio.wait(self._tasks.values(), timeout=60)
        for task in pending:
            task.cancel()
        failures = [t.exception() for t in done if not t.cancelled() and t.exception()]
        if failures and exc[0] is None:
            raise AssertionError(f"agents failed: {failures!r}")
        for failure in failures:  # beside the test's own failure: an agent that died says why
            log.error("an agent failed: %r", failure)


def _die_with_parent() -> None:
    """Kill the agent if the test process dies (no orphan agents after a crashed run)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class AgentProcess:
    """``ckms-agent run --config`` as its own OS process, so SIGKILL and SIGSTOP are real."""

    def __init__(self, host: Host, log_dir: Path, **env: str) -> None:
        self.host = host
        self.log = log_dir / f"{host.name}.log"
        self._env = {**os.environ, **FAST_AGENT, **env}
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, **env: str) -> None:
        """Start the agent (once more), with extra environment for this run only."""
        assert self.proc is None or self.proc.returncode is not None
        with self.log.open("ab") as out:
            out.write(f"--- start {' '.join(f'{k}={v}' for k, v in env.items())}\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                AGENT_BIN,
                "run",
                "--config",
                str(self.host.config),
                env={**self._env, **env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent,
            )

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.returncode is None
        self.proc.send_signal(sig)

    async def kill(self) -> int:
        """SIGKILL (a crash) and reap."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process dies just as well
            self.proc.kill()
        return await self.wait_exit()

    async def terminate(self) -> int:
        """SIGTERM (a clean stop, bounded), then SIGKILL if it did not stop."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            return await self.wait_exit(30)
        except TimeoutError:
            return await self.kill()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextlib.asynccontextmanager
async def agent_processes(
    hosts: Iterable[Host], log_dir: Path, **env: str
) -> AsyncIterator[dict[str, AgentProcess]]:
    """Agents as processes, keyed by host name; every one is stopped at the end."""
    procs = {h.name: AgentProcess(h, log_dir, **env) for h in hosts}
    try:
        yield procs
    finally:
        await asyncio.gather(*(p.terminate() for p in procs.values()))


def process_state(pid: int) -> str:
    """The one-letter state of a process in /proc (``T``: stopped by a signal)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


# -- Kafka ----------------------------------------------------------------------------------------


async def _high_watermarks(kafka: KafkaLink, tps: list[TopicPartition]) -> dict[Any, int]:
    """The partitions' ends as written, committed or not (a reader of committed records is told
    the last stable offset instead, which lags a commit until its markers are written)."""
    consumer = AIOKafkaConsumer(**kafka.client_args(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def read_topic(kafka: KafkaLink, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` up to its current end (bounded), as readers of committed
    records see it (the controller publishes in Kafka transactions; agents read so).

    "Its end" is what was written before the call, transactions whose commit returned
    included: the read goes on until their markers let a committed reader past them."""

    async def read() -> list[ConsumerRecord[bytes, bytes]]:
        parts = await partitions_of(kafka, topic)
        consumer = AIOKafkaConsumer(
            **kafka.client_args(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # assign() resets too: never to the end
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in parts]
            consumer.assign(tps)
            ends = await _high_watermarks(kafka, tps)
            await consumer.seek_to_beginning(*tps)
            records: list[ConsumerRecord[bytes, bytes]] = []
            while True:
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= ends[tp] for tp in tps):
                    return records
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    records.extend(
                        r for r in batch if r.offset < ends[TopicPartition(topic, r.partition)]
                    )
        finally:
            await consumer.stop()

    return await asyncio.wait_for(read(), 60)


async def partition_leader(kafka: KafkaLink, topic: str, partition: int) -> int:
    """The node id that leads one partition now."""
    client = AIOKafkaClient(**kafka.client_args())
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
        leader = cluster.leader_for_partition(TopicPartition(topic, partition))
        assert leader is not None and leader >= 0, f"no leader for {topic}/{partition}"
        return int(leader)
    finally:
        await client.close()


async def restart_stopped_nodes(cluster: LocalKafka) -> None:
    """Start every node that is down (together: alone, a node has no KRaft quorum to join)."""
    down = [i for i in range(cluster.node_count) if cluster.pid(i) is None]
    await asyncio.gather(*(cluster.start_node(i) for i in down))


def envelope(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    value = json.loads(record.value)
    assert isinstance(value, dict)
    return value


# -- the revocation watch ------------------------------------------------------------------------


_REMOVED_SQL = (
    "SELECT f.host_id, k.name, f.version, v.digest, v.state FROM fleet_state f "
    "JOIN keys k ON k.id = f.key_id "
    "JOIN key_versions v ON v.key_id = f.key_id AND v.version = f.version "
    "WHERE f.status = 'removed'"
)


def digests_on_disk(root: Path, digest_key: bytes) -> dict[str, list[Path]]:
    """Digest of every key material found in any file under ``root`` (keyrings: each entry),
    keyed with the fleet's digest key as the host holds it."""
    found: dict[str, list[Path]] = defaultdict(list)
    if not root.exists():
        return found
    for path in root.rglob("*"):
        try:
            if not path.is_file():
                continue
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # replaced or removed while we looked
        found[material_digest(digest_key, data)].append(path)
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            ring = json.loads(data)
            for entry in ring["versions"]:
                material = base64.b64decode(entry["material"])
                found[material_digest(digest_key, material)].append(path)
    return found


class RevocationWatch:
    """Checks, until the test ends, that no host holds a version after it acked its removal.

    Polls the fleet view for ``removed`` rows of versions no longer distributable (revoked,
    deactivated, destroyed) and scans that host's root for their material each time.
    """

    def __init__(self, store: Store, hosts: Iterable[Host], interval_s: float = 0.1) -> None:
        self._store = store
        self._roots = {h.name: h.root for h in hosts}
        self._digest_keys = {h.name: h.digest_key_path for h in hosts}
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self.scans: Counter[tuple[str, str, int]] = Counter()
        self.violations: list[str] = []
        self.unreadable = 0
        """Scans that could not read the fleet view (the store was unreachable)."""

    async def __aenter__(self) -> RevocationWatch:
        self._task = asyncio.create_task(self._loop(), name="revocation-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.scan()  # one last look at the very end

    async def _loop(self) -> None:
        while True:
            try:
                await self.scan()
            except StoreError:
                self.unreadable += 1  # the store is down (a database restart): look again
            await asyncio.sleep(self._interval)

    async def scan(self) -> None:
        rows = await self._store.fetchall(_REMOVED_SQL)
        gone: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
        distributable = {str(s) for s in DISTRIBUTABLE_STATES}
        for row in rows:
            if row["state"] in distributable or row["host_id"] not in self._roots:
                continue
            gone[row["host_id"]][row["digest"]] = (row["name"], int(row["version"]))
        for host, digests in gone.items():
            digest_key = self._digest_keys[host].read_bytes()
            found = await asyncio.to_thread(digests_on_disk, self._roots[host], digest_key)
            for digest, (key, version) in digests.items():
                self.scans[(host, key, version)] += 1
                if digest in found:
                    self.violations.append(
                        f"{host} holds {key} v{version} after acking its removal: "
                        f"{[str(p) for p in found[digest]]}"
                    )

    def assert_clean(self, expected: Iterable[tuple[str, str, int]]) -> None:
        """No violation, and every (host, key, version) expected was actually checked."""
        assert not self.violations, self.violations[:5]
        missing = sorted(set(expected) - set(self.scans))
        assert not missing, f"removal never seen for {missing[:5]}"


# -- settling and the invariants -----------------------------------------------------------------


@dataclass
class AckSnapshot:
    """The audit records and the number of acks, read while no agent queued a new ack."""

    records: list[audit_log.AuditRecord]
    total: int


async def ack_snapshot(view: ControllerView, hosts: list[Host]) -> tuple[AckSnapshot | None, str]:
    """Compare every agent's acks (seq 1..N, queue empty) with the fleet topic and the audit log.

    Returns the snapshot when they agree, else None and what disagreed. The agents' state is
    read before and after the topic and the audit log; if it moved, the snapshot is retried.
    """
    before = [await asyncio.to_thread(agent_ack_state, h) for h in hosts]
    busy = [(h.name, q) for h, (_, q) in zip(hosts, before, strict=True) if q]
    if busy:
        return None, f"acks still queued on the hosts: {busy}"
    on_topic: dict[str, list[int]] = defaultdict(list)
    for env in await fleet_acked(view):
        for ack in env["data"]["acks"]:
            on_topic[ack["host"]].append(int(ack["ack_seq"]))
    records = await audit_log.load_records(view.store)
    in_audit: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if r.action == "fleet.ack":
            assert r.outcome == "ok", f"a failed ack: {r.details}"
            in_audit[r.actor.removeprefix("host:")].append(int(r.details["ack_seq"]))
    last = {
        r["id"]: r["last_ack_seq"] or 0
        for r in await view.store.fetchall("SELECT id, last_ack_seq FROM hosts")
    }
    after = [await asyncio.to_thread(agent_ack_state, h) for h in hosts]
    if after != before:
        return None, "agents queued acks while the snapshot was read"
    for host, (seq, _) in zip(hosts, before, strict=True):
        want = list(range(1, seq + 1))
        if seq == 0 or sorted(on_topic[host.name]) != want:
            return None, (
                f"{host.name} took ack seqs 1..{seq}; fleet.acked on the fleet topic names "
                f"{sorted(on_topic[host.name])}"
            )
        if sorted(in_audit[host.name]) != want or last.get(host.name) != seq:
            return None, (
                f"{host.name} sent acks 1..{seq}; the controller applied "
                f"{sorted(in_audit[host.name])} (last_ack_seq {last.get(host.name)})"
            )
    return AckSnapshot(records, sum(seq for seq, _ in before)), ""


async def fleet_acked(view: ControllerView) -> list[dict[str, Any]]:
    """Every distinct ``fleet.acked`` on the fleet topic, each verified under the controller's
    key as a subscriber would (a copy sent twice by a relay retry counts once)."""
    trust = trust_keys([view.public_key])
    seen: dict[str, dict[str, Any]] = {}
    for record in await read_topic(view.reader, view.fleet_topic):
        checked = verify_message(record.value, record.headers, trust, types={EventType.FLEET_ACKED})
        seen.setdefault(checked.id, envelope(record))
    return list(seen.values())


def agent_ack_state(host: Host) -> tuple[int, int]:
    """(last ack seq taken, acks still queued) from the agent's own state DB."""
    conn = sqlite3.connect(host.state_db, timeout=10)
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'ack_seq'").fetchone()
        queued = conn.execute("SELECT count(*) FROM pending_acks").fetchone()[0]
    finally:
        conn.close()
    return (int(row[0]) if row else 0), int(queued)


async def converged_hosts(view: ControllerView, key: str) -> set[str]:
    status = await key_fleet_status(view.store, view.lifecycle, view.hosts, key)
    return {s.host for s in status if s.converged}


async def wait_converged(
    view: ControllerView, keys: Iterable[str], hosts: Iterable[Host], timeout_s: float = 60.0
) -> None:
    """Bounded wait until every host converged on every key."""
    names = {h.name for h in hosts}
    for key in keys:

        async def done(key: str = key) -> bool:
            return await converged_hosts(view, key) >= names

        try:
            await wait_until(done, timeout_s, f"{len(names)} hosts converged on {key}")
        except TimeoutError as exc:
            # Say where each straggler stands (what it acked against what it should hold).
            k = await view.lifecycle.get(key)
            status = await key_fleet_status(view.store, view.lifecycle, view.hosts, key)
            behind = [
                f"{s.host}: primary v{s.primary}, acked {s.versions}"
                for s in status
                if s.host in names and not s.converged
            ]
            versions = {v.version: str(v.state) for v in k.versions}
            raise TimeoutError(f"{exc}; key versions {versions}; not converged: {behind}") from None


async def wait_acks_settled(
    view: ControllerView, hosts: Iterable[Host], timeout_s: float = 60.0
) -> None:
    """Bounded wait until every agent's ack queue is empty and the controller applied them all."""
    hosts = list(hosts)

    async def settled() -> bool:
        rows = await view.store.fetchall("SELECT id, last_ack_seq FROM hosts")
        applied = {r["id"]: r["last_ack_seq"] or 0 for r in rows}
        for host in hosts:
            seq, queued = await asyncio.to_thread(agent_ack_state, host)
            if queued or applied.get(host.name) != seq:
                return False
        return True

    await wait_until(settled, timeout_s, "every ack sent and applied")


@dataclass
class Expected:
    """What the scenario did, for the exact audit counts."""

    creates: int = 0
    rotates: int = 0
    revokes: int = 0
    removed: set[tuple[str, int]] = field(default_factory=set)
    """(key, version) every host must have acked ``removed``."""


async def assert_fleet_invariants(
    view: ControllerView,
    keys: Iterable[str],
    hosts: Iterable[Host],
    expected: Expected,
    watch: RevocationWatch,
) -> dict[str, int]:
    """Settle (bounded), then check every invariant in the module docstring; return stats."""
    hosts = list(hosts)
    keys = list(keys)
    names = {h.name for h in hosts}
    await wait_converged(view, keys, hosts)
    await wait_acks_settled(view, hosts)
    await wait_until(lambda: outbox_empty(view.store), 60, "the outbox drained")
    store = view.store

    # Convergence, and the fleet rows behind it.
    for key in keys:
        status = await key_fleet_status(store, view.lifecycle, view.hosts, key)
        assert {s.host for s in status} == names, f"{key}: targeted hosts differ"
        assert all(s.converged and not s.failed for s in status), [
            s for s in status if not s.converged
        ]
        k = await view.lifecycle.get(key)
        rows = await store.fetchall(
            "SELECT host_id, version, status, digest FROM fleet_state WHERE key_id = ?", (k.id,)
        )
        got = {(r["host_id"], int(r["version"])): r for r in rows}
        assert k.primary_version is not None
        primary = k.version(k.primary_version)
        for host in names:
            row = got.get((host, primary.version))
            assert row is not None and row["status"] == "installed", (host, key, primary.version)
            assert row["digest"] == primary.digest
        for v in k.versions:
            if v.state in DISTRIBUTABLE_STATES:
                continue
            for host in names:
                row = got.get((host, v.version))
                if (key, v.version) in expected.removed:
                    assert row is not None, f"{host} never acked the removal of {key} v{v.version}"
                if row is not None:
                    assert row["status"] == "removed", (host, key, v.version, row["status"])

    # No ack lost: agent seqs 1..N, each applied and republished exactly once. Agents may
    # still answer late events with more acks, so compare consistent snapshots (bounded).
    problem: list[str] = []

    async def consistent() -> AckSnapshot | None:
        snapshot, why = await ack_snapshot(view, hosts)
        problem[:] = [why]
        return snapshot

    try:
        snapshot = await wait_until(consistent, 60, "a consistent snapshot of the acks")
    except TimeoutError:
        raise AssertionError(problem[0]) from None
    records, total_acks = snapshot.records, snapshot.total

    # No event or audit record lost; the log verifies.
    report = await audit_log.verify_store(store, view.public_key)
    assert report.ok, report.reason
    actions = Counter(r.action for r in records if r.outcome == "ok")
    assert actions["key.create"] == expected.creates, actions
    assert actions["key.rotate"] == expected.rotates, actions
    assert actions["key.revoke"] == expected.revokes, actions
    assert actions["fleet.ack"] == total_acks
    all_rows = await store.fetchall("SELECT seq, event_id, type, sent_at FROM outbox")
    assert all(r["sent_at"] is not None for r in all_rows)
    # fleet.acked rows republish applied acks (their fleet.ack records are counted above);
    # every other row announces a change, with an audit record naming it.
    outbox_rows = [r for r in all_rows if r["type"] != "fleet.acked"]
    audited = {int(r.details["event_seq"]) for r in records if "event_seq" in r.details}
    assert audited == {int(r["seq"]) for r in outbox_rows}, "outbox rows and audit disagree"
    on_topic = Counter(envelope(r)["id"] for r in await read_topic(view.reader, view.events_topic))
    missing = [r["seq"] for r in outbox_rows if on_topic[r["event_id"]] == 0]
    assert not missing, f"outbox rows {missing} never reached {view.events_topic}"
    fleet_ids = {e["id"] for e in await fleet_acked(view)}
    unsent = [r["seq"] for r in all_rows if r["type"] == "fleet.acked"
              and r["event_id"] not in fleet_ids]  # fmt: skip
    assert not unsent, f"fleet.acked rows {unsent} never reached {view.fleet_topic}"

    # Revoked versions stayed gone on every host, from its removal ack to now. One scan of our
    # own first: the last removal ack may have landed after the watch's latest poll.
    await watch.scan()
    watch.assert_clean((h, key, v) for h in names for key, v in expected.removed)
    return {
        "acks": total_acks,
        "audit_records": len(records),
        "events": len(outbox_rows),
        "event_copies": sum(on_topic[r["event_id"]] for r in outbox_rows),
        "watch_scans": sum(watch.scans.values()),
    }


async def outbox_empty(store: Store) -> bool:
    return await store.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0


# -- the controller as a process -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ControllerProcess:
    """``tests/faults/controller_proc.py`` as its own OS process (same home and port each start)."""

    def __init__(
        self, home: Path, kafka: KafkaLink, events: str, fleet: str, log: Path, **env: str
    ) -> None:
        self.argv = [
            sys.executable,
            str(Path(__file__).with_name("controller_proc.py")),
            str(home),
            kafka.bootstrap,
            events,
            fleet,
            str(free_port()),
        ]
        self.log = log
        self._env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            KAFKA_SECURITY_ENV: kafka.security.model_dump_json(),
            **env,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> dict[str, Any]:
        """Start it and wait (bounded) for its ready line: ``{"port", "fingerprint"}``."""
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self._env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        if not line:
            await self.kill()
            raise AssertionError(f"the controller did not start:\n{self.tail()}")
        self.ready = json.loads(line)
        return self.ready

    async def kill(self) -> int | None:
        """SIGKILL (works on a stopped process too) and reap."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def terminate(self) -> None:
        """SIGTERM (clean stop, bounded), else SIGKILL."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            await self.kill()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
