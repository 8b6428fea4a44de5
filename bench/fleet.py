"""Fleet benchmark: rotate → all acked and revoke → all removed for N real agents, vs a baseline.

    python bench/fleet.py                      # quick: N=100
    python bench/fleet.py --hosts 100,1000,10000 --json results.json
    python bench/fleet.py --store postgresql --replicas 2 --hosts 1000 --baseline ''

What runs (all on this machine, each part a separate process):

- a real Apache Kafka broker (``ckms.devkafka.LocalKafka``), one for the whole run;
- a real controller (``Controller``: SQLite store, asyncssh endpoint, outbox publisher, ack
  service) in its own process, fresh for each N, with its own topics; with ``--store postgresql
  --replicas R``, R controller processes on one PostgreSQL database (a real server from
  ``ckms.devpostgres``, one for the whole run, a fresh database for each N) sharing one SSH host
  key, measured beside the SQLite controller in the same run (same broker, same N): every host
  names every replica, and the SSH client spreads the fleet over them (by login name);
- worker processes, each running many real agents (``ckms_agent.daemon.Agent``): every agent has
  its own enrollment, identity keys, SQLite state DB, SSH connection (which also carries its
  acks) and Kafka consumer, and installs into its own root directory. Agents use the agent's
  default settings (long poll 20 s, heartbeat 60 s); their INFO logging is off (WARNING goes
  to a file per worker).

Measured per N, after a warm-up (the key is created and installed everywhere, so every agent has
its connection and consumer up):

- **rotate → all acked**: from the rotation's commit (its outbox event's ``created_at``) to
  each host's ack being applied to the fleet view (``fleet_state.updated_at``); total = slowest;
- **revoke (keyCompromise) → all removed**: the same for the ``removed`` acks of the old version;
- CPU seconds of every process during each phase (controllers, Kafka, the PostgreSQL server's
  processes, workers), the controller's peak RSS, and worker RSS per simulated agent. The
  central cost is everything but the workers (which stand in for the hosts): every replica and
  its SSH workers, the PostgreSQL server (less the benchmark's own reading connection), Kafka.

**Baseline**, on the same simulated hosts: each host also gets a real asyncssh server (own port,
own host key) that serves ``cat > PATH``; pusher processes open a new SSH connection per host,
authenticate, write the same key file, close — for several (processes x concurrency) settings;
the best one is compared. The floor is docs/architecture.md §8's: 1.9 ms CPU per host on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
from _proc import (
    Child,
    children,
    cpu_seconds,
    load_average,
    open_fds,
    peak_rss_mb,
    percentile,
    raise_fd_limit,
    rss_mb,
    status_kb,
)
from _store import STORES, BenchStore
from _tls import agent_tls_env, tls_settings

from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.devpostgres import LocalPostgres

FLOOR_CPU_MS_PER_HOST = 1.9  # docs/architecture.md §8, everything on one 2-core box
CORES = 2
KEY = "bench/fleet"
LABELS = {"fleet": "bench"}
INSTALL_PATH = "/etc/ckms/keys/{team}/{purpose}.json"
INSTALLED_PATH = "/etc/ckms/keys/bench/fleet.json"
BASELINE_PATH = "/etc/ckms-baseline/bench/fleet.json"
LATE_S = 10.0
"""A host is late past this, or past three times the phase's median if that is longer (at
N=1,000 on 2 cores the whole fleet takes about 10 s)."""


@dataclass
class Phase:
    """One measured phase (ckms rotate, ckms revoke, or a baseline push)."""

    name: str
    hosts: int
    done: int = 0
    total_s: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    cpu_s: dict[str, float] = field(default_factory=dict)
    load: str = ""
    note: str = ""
    wall_s: float = math.nan
    """Seconds between the CPU snapshots of the phase."""
    idle_cpu_s: float = math.nan
    """What the fleet costs doing nothing (the idle window's rate) over ``wall_s``."""
    publish_ms: float = math.nan
    """Commit → the event confirmed by Kafka (outbox ``sent_at``)."""
    agent_p50_ms: float = math.nan
    """Agent-side work per ack (the ack's ``elapsed_ms``: event handled → ack queued)."""
    agent_p99_ms: float = math.nan
    acked_p50_ms: float = math.nan
    """Commit → the agent signed its ack (agent clock; everything runs on one machine)."""
    acked_p99_ms: float = math.nan
    ack_transit_p50_ms: float = math.nan
    """The agent signed its ack → the controller applied it (``ack`` over SSH, group commit)."""
    ack_transit_p99_ms: float = math.nan
    slowest: list[str] = field(default_factory=list)
    late: int = 0
    """Late hosts (see ``LATE_S``): a tail of a few hosts that waited for a later reconcile."""
    on_time_total_s: float = math.nan
    """The slowest of the other hosts (what the tail leaves out)."""
    """The three hosts that took longest (host id, commit → ack applied), for a tail's cause."""

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def cpu_ms_per_host(self) -> float:
        return 1000 * self.cpu_total_s / max(1, self.done)


def _latencies(per_host_s: list[float], phase: Phase) -> None:
    if not per_host_s:
        return
    phase.done = len(per_host_s)
    phase.total_s = max(per_host_s)
    phase.p50_ms = 1000 * percentile(per_host_s, 50)
    phase.p99_ms = 1000 * percentile(per_host_s, 99)
    phase.max_ms = 1000 * max(per_host_s)


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _is_controller(process: str) -> bool:
    """The first replica is ``controller``, the others ``replica1``, ``replica2``..."""
    return process == "controller" or process.startswith("replica")


class FleetBench:
    """One N on one store: controller replicas, workers, agents, phases, baseline."""

    def __init__(
        self,
        n: int,
        args: argparse.Namespace,
        kafka: LocalKafka,
        work: Path,
        store: str = "sqlite",
        replicas: int = 1,
        postgres: LocalPostgres | None = None,
    ) -> None:
        self.n = n
        self.args = args
        self.kafka = kafka
        self.label = f"{store} x{replicas}"
        self.work = work / f"n{n}-{store}-{replicas}"
        self.store = BenchStore(store, self.work, postgres if store == "postgresql" else None)
        self.replica_count = replicas
        self.ctl: Child | None = None
        self.replicas: list[Child] = []
        self.workers: list[Child] = []
        self.slices: list[list[str]] = []
        self.result: dict[str, Any] = {"hosts": n, "store": store, "replicas": replicas}

    def log(self, text: str) -> None:
        print(
            f"[N={self.n} {self.label} load {load_average()}] {text}", file=sys.stderr, flush=True
        )

    def pids(self) -> dict[str, int]:
        assert self.ctl is not None
        out = {"controller": self.ctl.pid, "kafka": self.kafka.pid(0) or 0}
        out.update({f"replica{i}": r.pid for i, r in enumerate(self.replicas) if i})
        out.update({f"worker{i}": w.pid for i, w in enumerate(self.workers)})
        if self.store.server is not None:
            out["postgres"] = self.store.server_pid()
        return out

    @staticmethod
    def _with_ssh_workers(pids: dict[str, int]) -> dict[str, int]:
        """``pids`` and every replica's SSH worker processes (for the profiler)."""
        out = dict(pids)
        for name, pid in pids.items():
            if _is_controller(name) and pid:
                out.update({f"{name}-ssh{i}": c for i, c in enumerate(children(pid))})
        return out

    def cpu(self, pids: dict[str, int]) -> dict[str, float]:
        """CPU seconds by process; each replica's counts its SSH worker processes too
        (``--ssh-workers``; a worker restarted meanwhile loses what it used before), and
        ``postgres`` is the PostgreSQL server's processes."""
        out = {
            name: self.store.cpu_s() if name == "postgres" else cpu_seconds(pid)
            for name, pid in pids.items()
            if pid
        }
        for name, pid in pids.items():
            if _is_controller(name) and pid:
                out[name] += sum(cpu_seconds(c) for c in children(pid))
        return out

    # -- setup -----------------------------------------------------------------------------------

    async def setup(self) -> None:
        n = self.n
        self.work.mkdir(parents=True)
        await self.store.open()
        run = uuid.uuid4().hex[:8]
        infos = []
        for i in range(self.replica_count):
            replica = Child.start(
                f"controller{i}",
                "_ctl",
                "ControllerService",
                log_file=str(self.work / f"controller{i}.log"),
            )
            self.replicas.append(replica)
            infos.append(
                await replica.call(
                    "start",
                    home=str(self.work / f"controller{i}"),
                    bootstrap=self.kafka.bootstrap,
                    # Under the ckms topic names, which the broker's ACLs cover.
                    events_topic=f"ckms.events.bench-{run}",
                    fleet_topic=f"ckms.fleet.bench-{run}",
                    kafka=tls_settings(self.kafka.security(SubjectRole.CONTROLLER, "bench")),
                    partitions=self.args.partitions,
                    events_partitions=self.args.events_partitions,
                    ssh_workers=self.args.ssh_workers,
                    store=self.store.settings(),
                    replica_name=f"ctl-{i + 1}",
                    host_key_from=str(self.work / "controller0") if i else None,
                )
            )
        self.ctl = self.replicas[0]  # operators' calls go here; it took the lease first
        info = infos[0]
        names = [f"h{i:05d}" for i in range(n)]
        tokens: list[str] = []
        for i in range(0, n, 1000):
            tokens += await self.ctl.call("tokens", names=names[i : i + 1000], labels=LABELS)
        workers = self.args.workers or max(2, math.ceil(n / self.args.per_worker))
        workers = min(workers, n)
        self.slices = [names[i::workers] for i in range(workers)]
        by_name = dict(zip(names, tokens, strict=True))
        self.workers = [
            Child.start(
                f"worker{i}",
                "_hosts",
                "HostsService",
                base=str(self.work / "hosts"),
                log_file=str(self.work / f"worker{i}.log"),
            )
            for i in range(workers)
        ]
        empty_rss = sum(rss_mb(w.pid) for w in self.workers)
        self.log(f"{workers} workers; enrolling {n} hosts")
        took = await asyncio.gather(
            *(
                w.call(
                    "enroll",
                    hosts=[(h, by_name[h]) for h in part],
                    ports=[i["port"] for i in infos],
                    fingerprint=info["fingerprint"],
                    # About 32 enrollments in flight in all (each a handshake, a CSR signed and
                    # a write): more only queue at the controller, past the request timeout.
                    concurrency=max(2, 32 // workers),
                )
                for w, part in zip(self.workers, self.slices, strict=True)
            )
        )
        self.log(f"enrolled in {max(took):.1f} s; starting agents")
        # Every agent over mutual TLS; the ACLs go by role, so the fleet shares one certificate.
        env = {"CKMS_AGENT_LOG_LEVEL": "WARNING", **agent_tls_env(self.kafka)}
        took = await asyncio.gather(
            *(
                w.call("start_agents", env=env, batch=max(10, self.args.start_batch // workers))
                for w in self.workers
            )
        )
        self.result["workers"] = workers
        self.result["enroll_start_s"] = max(took)
        self.result["worker_rss_empty_mb"] = empty_rss
        self.log(f"{n} agents running ({max(took):.1f} s to start)")

    # -- measuring -------------------------------------------------------------------------------

    async def _count(self, version: int, status: str) -> int:
        return int(
            await self.store.fetchval(
                "SELECT count(*) FROM fleet_state f JOIN keys k ON k.id = f.key_id "
                "WHERE k.name = ? AND f.version = ? AND f.status = ?",
                KEY,
                version,
                status,
            )
        )

    async def _phase(self, name: str, action: Any, version: int | None, status: str) -> Phase:
        assert self.ctl is not None
        phase = Phase(name, self.n, load=load_average())
        pids = self.pids()
        profilers = self._profile_start(name, self._with_ssh_workers(pids))
        cpu0 = self.cpu(pids)
        started = time.monotonic()
        event = await action()
        if version is None:
            version = int(event["version"])
        deadline = time.monotonic() + self.args.timeout
        done = 0
        while time.monotonic() < deadline:
            done = await self._count(version, status)
            if done >= self.n:
                break
            await asyncio.sleep(0.05)
        cpu1 = self.cpu(pids)
        phase.wall_s = time.monotonic() - started
        await self._profile_stop(profilers)
        phase.cpu_s = {k: cpu1[k] - cpu0[k] for k in cpu0}
        if "idle" in self.result:
            idle_rate = sum(self.result["idle"]["cpu_s_per_s"].values())
            phase.idle_cpu_s = idle_rate * phase.wall_s
        rows = await self.ctl.call("acked", name=KEY, version=version, status=status)
        committed = _parse_time(event["created_at"])
        _latencies([_parse_time(r["updated_at"]) - committed for r in rows], phase)
        by_host = sorted((_parse_time(r["updated_at"]) - committed, r["host_id"]) for r in rows)
        phase.slowest = [f"{host} {1000 * s:.0f} ms" for s, host in by_host[-3:][::-1]]
        late_s = max(LATE_S, 3 * phase.p50_ms / 1000) if by_host else LATE_S
        phase.late = sum(1 for s, _ in by_host if s > late_s)
        phase.on_time_total_s = max((s for s, _ in by_host if s <= late_s), default=math.nan)
        parts = await self.ctl.call("breakdown", event_id=event["event_id"])
        if parts["sent_at"]:
            phase.publish_ms = 1000 * (_parse_time(parts["sent_at"]) - committed)
        if parts["agent_elapsed_ms"]:
            phase.agent_p50_ms = percentile(parts["agent_elapsed_ms"], 50)
            phase.agent_p99_ms = percentile(parts["agent_elapsed_ms"], 99)
        if parts["ack_times"]:
            pairs = [(_parse_time(a), _parse_time(b)) for a, b in parts["ack_times"]]
            acked = [a for a, _ in pairs]
            transit = [1000 * (b - a) for a, b in pairs]
            phase.acked_p50_ms = percentile([1000 * (a - committed) for a in acked], 50)
            phase.acked_p99_ms = percentile([1000 * (a - committed) for a in acked], 99)
            phase.ack_transit_p50_ms = percentile(transit, 50)
            phase.ack_transit_p99_ms = percentile(transit, 99)
        if phase.done < self.n:
            phase.note = f"only {phase.done}/{self.n} within {self.args.timeout:.0f} s"
        self.log(
            f"{name}: {phase.done}/{self.n} in {phase.total_s:.2f} s "
            f"(p50 {phase.p50_ms:.0f} ms, p99 {phase.p99_ms:.0f} ms), "
            f"CPU {phase.cpu_total_s:.1f} s ({phase.cpu_ms_per_host:.2f} ms/host); "
            f"slowest {', '.join(phase.slowest)}"
        )
        return phase

    def _profile_start(self, phase: str, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
        """With --profile DIR: sample every Python process of the phase with py-spy."""
        if not self.args.profile:
            return []
        if self.args.profile_phases and phase.split()[0] not in self.args.profile_phases:
            return []
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        tag = phase.split()[0]
        return [
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--rate",
                    "100",
                    "--gil",
                    "--nonblocking",
                    "-o",
                    str(out / f"n{self.n}-{tag}-{proc}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for proc, pid in pids.items()
            if proc not in ("kafka", "postgres")
        ]

    async def _profile_stop(self, profilers: list[subprocess.Popen[bytes]]) -> None:
        for p in profilers:
            p.send_signal(signal.SIGINT)
        for p in profilers:
            await asyncio.to_thread(p.wait, 30)

    async def _idle(self) -> None:
        """CPU of every process while the enrolled fleet does nothing (``--idle`` seconds)."""
        pids = self.pids()
        profilers = self._profile_start("idle", self._with_ssh_workers(pids))
        cpu0 = self.cpu(pids)
        load = load_average()
        await asyncio.sleep(self.args.idle)
        cpu1 = self.cpu(pids)
        await self._profile_stop(profilers)
        per_s = {k: (cpu1[k] - cpu0[k]) / self.args.idle for k in cpu0}
        workers = sum(v for k, v in per_s.items() if k.startswith("worker"))
        controllers = sum(v for k, v in per_s.items() if _is_controller(k))
        self.result["idle"] = {
            "seconds": self.args.idle,
            "load": load,
            "cpu_s_per_s": per_s,
            "agent_ms_per_s": 1000 * workers / self.n,
            "controller_ms_per_s_per_host": 1000 * controllers / self.n,
            "postgres_ms_per_s_per_host": 1000 * per_s.get("postgres", 0.0) / self.n,
            "kafka_ms_per_s_per_host": 1000 * per_s["kafka"] / self.n,
        }
        self.log(
            f"idle: {sum(per_s.values()):.2f} CPU-s/s in all (controllers "
            f"{controllers:.2f}, postgres {per_s.get('postgres', 0.0):.2f}, kafka "
            f"{per_s['kafka']:.2f}, workers {workers:.2f}); "
            f"{1000 * workers / self.n:.3f} ms/s per agent"
        )

    async def run_ckms(self) -> None:
        assert self.ctl is not None
        ctl = self.ctl

        async def create() -> dict[str, Any]:
            return {
                "version": 1,
                **await ctl.call("create_key", name=KEY, labels=LABELS, path=INSTALL_PATH),
            }

        warm = await self._phase("create (warm-up)", create, 1, "installed")
        await asyncio.sleep(self.args.settle)
        await self._idle()
        rotate = await self._phase(
            "rotate", lambda: ctl.call("rotate", name=KEY), None, "installed"
        )
        fleet = await ctl.call("fleet", name=KEY)
        await asyncio.sleep(self.args.settle)
        revoke = await self._phase(
            "revoke", lambda: ctl.call("revoke", name=KEY, version=1), 1, "removed"
        )
        fleet_after = await ctl.call("fleet", name=KEY)
        stats = await ctl.call("stats")
        replica_stats = [await r.call("stats") for r in self.replicas]
        rss = {f"worker{i}": rss_mb(w.pid) for i, w in enumerate(self.workers)}
        threads = sum(status_kb(w.pid, "Threads") for w in self.workers)
        self.result.update(
            warmup=asdict(warm),
            rotate=asdict(rotate),
            revoke=asdict(revoke),
            fleet_after_rotate=fleet,
            fleet_after_revoke=fleet_after,
            controller=stats,
            replica_stats=replica_stats,
            controller_peak_rss_mb=peak_rss_mb(ctl.pid),
            kafka_rss_mb=rss_mb(self.kafka.pid(0) or 0),
            kafka_fds=open_fds(self.kafka.pid(0) or 0)["total"],
            controller_fds=open_fds(ctl.pid)["total"],
            worker_fds=sum(open_fds(w.pid)["total"] for w in self.workers),
            worker_rss_mb=sum(rss.values()),
            worker_threads=threads,
            mb_per_agent=sum(rss.values()) / self.n,
            mb_per_agent_marginal=(sum(rss.values()) - self.result["worker_rss_empty_mb"]) / self.n,
        )
        self._rotate, self._revoke = rotate, revoke

    async def run_baseline(self) -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        public = key.export_public_key("openssh").decode()
        targets: list[tuple[str, int, str]] = []
        for part in await asyncio.gather(
            *(w.call("start_servers", authorized_key=public) for w in self.workers)
        ):
            targets += [tuple(t) for t in part]
        data = await self.workers[0].call("read_file", host=self.slices[0][0], path=INSTALLED_PATH)
        digest = hashlib.sha256(data).hexdigest()
        private = key.export_private_key("openssh").decode()
        runs = []
        for spec in self.args.baseline:
            procs, concurrency = (int(x) for x in spec.split("x"))
            phase = Phase(f"baseline {procs}x{concurrency}", self.n, load=load_average())
            pushers = [Child.start(f"pusher{i}", "_push", "PushService") for i in range(procs)]
            pids = {**self.pids(), **{f"pusher{i}": p.pid for i, p in enumerate(pushers)}}
            for name in [k for k in pids if _is_controller(k)]:
                pids.pop(name)  # the controllers play no part in the baseline
            pids.pop("postgres", None)  # nor does the store
            await asyncio.sleep(1.0)  # let the pushers import
            cpu0 = self.cpu(pids)
            parts = [targets[i::procs] for i in range(procs)]
            results = await asyncio.gather(
                *(
                    p.call(
                        "push",
                        targets=part,
                        client_key=private,
                        path=BASELINE_PATH,
                        data=data,
                        concurrency=concurrency,
                    )
                    for p, part in zip(pushers, parts, strict=True)
                )
            )
            cpu1 = self.cpu(pids)
            phase.cpu_s = {k: cpu1[k] - cpu0[k] for k in cpu0}
            start = min(r["started"] for r in results)
            ends = [t - start for r in results for t in r["done"].values()]
            errors = sum(len(r["errors"]) for r in results)
            _latencies(ends, phase)
            written = sum(
                await asyncio.gather(
                    *(
                        w.call("count_files", path=BASELINE_PATH, sha256=digest)
                        for w in self.workers
                    )
                )
            )
            phase.note = f"{errors} errors, {written} files verified"
            if errors:
                first = next(iter(e for r in results for e in r["errors"].values()))
                phase.note += f"; first: {first[:200]}"
            for p in pushers:
                await p.stop()
            self.log(
                f"{phase.name}: {phase.done}/{self.n} in {phase.total_s:.2f} s "
                f"(p50 {phase.p50_ms:.0f} ms, p99 {phase.p99_ms:.0f} ms), "
                f"CPU {phase.cpu_total_s:.1f} s ({phase.cpu_ms_per_host:.2f} ms/host); "
                f"{phase.note}"
            )
            runs.append(phase)
            await self._clear_baseline_files()
        await asyncio.gather(*(w.call("stop_servers") for w in self.workers))
        complete = [p for p in runs if p.done == self.n] or runs
        best = min(complete, key=lambda p: p.total_s)
        self.result["baseline_runs"] = [asdict(p) for p in runs]
        self.result["baseline_best"] = asdict(best)
        self._baseline = best

    async def _clear_baseline_files(self) -> None:
        base = self.work / "hosts"
        await asyncio.to_thread(
            lambda: [p.unlink() for p in base.glob("*/root" + BASELINE_PATH) if p.exists()]
        )

    async def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                await w.call("stop_agents")
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)
        await self.store.close()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN check


def central_cpu_s(p: dict[str, Any]) -> float:
    """Every replica (with its SSH workers) + the PostgreSQL server + Kafka: what stays central
    when the agents run on real hosts."""
    return sum(v for k, v in p["cpu_s"].items() if _is_controller(k) or k in ("kafka", "postgres"))


def central_ms_per_host(p: dict[str, Any]) -> float:
    """:func:`central_cpu_s` per host done."""
    return 1000 * central_cpu_s(p) / max(1, p["done"])


def controllers_cpu_s(p: dict[str, Any]) -> float:
    return sum(v for k, v in p["cpu_s"].items() if _is_controller(k))


def pusher_ms_per_host(p: dict[str, Any]) -> float:
    """The baseline's pushers' CPU per host (its central cost)."""
    cpu = sum(v for k, v in p["cpu_s"].items() if k.startswith("pusher"))
    return 1000 * cpu / max(1, p["done"])


def _label(result: dict[str, Any]) -> str:
    return f"{result.get('store', 'sqlite')} x{result.get('replicas', 1)}"


def scaling(results: list[dict[str, Any]]) -> str:
    """For each store: CPU per host (all, central) and the idle cost per agent across N,
    against the first N."""
    labels = dict.fromkeys(_label(r) for r in results)
    parts = [_scaling([r for r in results if _label(r) == label], label) for label in labels]
    return "\n".join(p for p in parts if p)


def _scaling(results: list[dict[str, Any]], label: str) -> str:
    done = [r for r in results if "rotate" in r]
    if len(done) < 2:
        return ""
    lines = [f"scaling across N, {label} (vs the smallest N)"]
    first = done[0]
    for phase in ("rotate", "revoke"):
        a0, c0 = first[phase], central_ms_per_host(first[phase])
        parts = []
        for r in done:
            p = r[phase]
            per = 1000 * sum(p["cpu_s"].values()) / max(1, p["done"])
            per0 = 1000 * sum(a0["cpu_s"].values()) / max(1, a0["done"])
            parts.append(
                f"N={r['hosts']}: {per:.2f} ms/host ({per / per0:.2f}x), central "
                f"{central_ms_per_host(p):.2f} ({central_ms_per_host(p) / c0:.2f}x)"
            )
        lines.append(f"  {phase:7} " + "; ".join(parts))
    idle = [(r["hosts"], r["idle"]) for r in done if "idle" in r]
    if idle:
        lines.append(
            "  idle    "
            + "; ".join(
                f"N={n}: agent {i['agent_ms_per_s']:.4f}, controller "
                f"{i['controller_ms_per_s_per_host']:.4f}, kafka "
                f"{i['kafka_ms_per_s_per_host']:.4f} ms/s per host"
                for n, i in idle
            )
        )
    return "\n".join(lines)


def compare(results: list[dict[str, Any]]) -> str:
    """Each store configuration against the first one (SQLite, one controller) at the same N,
    measured in the same run: totals, per-host p99 and central CPU per host, with ratios."""
    lines: list[str] = []
    for n in dict.fromkeys(r["hosts"] for r in results):
        same = [r for r in results if r["hosts"] == n and "rotate" in r]
        if len(same) >= 2:
            lines += _compare_at(n, same)
    return "\n".join(lines)


def _compare_at(n: int, same: list[dict[str, Any]]) -> list[str]:
    cols = [_label(r) for r in same]
    head = f"{'N = ' + str(n):30}" + "".join(f"{c:>16}" for c in cols)
    head += "".join(f"{c + ' / ' + cols[0]:>26}" for c in cols[1:])
    lines = [f"stores compared at N = {n} (same run, same broker)", head, "-" * len(head)]

    def row(label: str, value: Any, digits: int = 2) -> None:
        values = [value(r) for r in same]
        ratios = [v / values[0] if values[0] else math.nan for v in values[1:]]
        text = f"{label:30}" + "".join(f"{_fmt(v, digits):>16}" for v in values)
        lines.append(text + "".join(f"{_fmt(x) + 'x':>26}" for x in ratios))

    row("create (warm-up) total s", lambda r: r["warmup"]["total_s"])
    row("create late hosts", lambda r: r["warmup"].get("late", 0), 0)
    for phase in ("rotate", "revoke"):
        row(f"{phase} total s", lambda r, ph=phase: r[ph]["total_s"])
        row(f"{phase} per-host p50 ms", lambda r, ph=phase: r[ph]["p50_ms"], 0)
        row(f"{phase} per-host p99 ms", lambda r, ph=phase: r[ph]["p99_ms"], 0)
        row(f"{phase} late hosts", lambda r, ph=phase: r[ph].get("late", 0), 0)
        row(
            f"  {phase} total of the others s",
            lambda r, ph=phase: r[ph].get("on_time_total_s", math.nan),
        )
        row(f"{phase} commit → in Kafka ms", lambda r, ph=phase: r[ph]["publish_ms"], 0)
        row(f"{phase} central CPU ms/host", lambda r, ph=phase: central_ms_per_host(r[ph]))
        row(
            f"  {phase} controllers ms/host",
            lambda r, ph=phase: 1000 * controllers_cpu_s(r[ph]) / max(1, r[ph]["done"]),
        )
        row(
            f"  {phase} postgres ms/host",
            lambda r, ph=phase: 1000 * r[ph]["cpu_s"].get("postgres", 0.0) / max(1, r[ph]["done"]),
        )
    if all("idle" in r for r in same):
        row(
            "idle central ms/s per host",
            lambda r: (
                r["idle"]["controller_ms_per_s_per_host"]
                + r["idle"]["postgres_ms_per_s_per_host"]
                + r["idle"]["kafka_ms_per_s_per_host"]
            ),
            4,
        )
    lines.append(
        "hosts done: "
        + "; ".join(
            f"{_label(r)} {r['rotate']['done']}/{n} rotated, {r['revoke']['done']}/{n} "
            f"removed, load at start {r['rotate']['load'].split()[0]}"
            for r in same
        )
    )
    lines.append("")
    return lines


def table(result: dict[str, Any]) -> str:
    """The ckms / baseline / floor table for one N."""
    n = result["hosts"]
    rot, rev, base = result["rotate"], result["revoke"], result.get("baseline_best")
    floor_s = n * FLOOR_CPU_MS_PER_HOST / 1000 / CORES

    def cpu_total(p: dict[str, Any]) -> float:
        return sum(p["cpu_s"].values())

    def per_host(p: dict[str, Any]) -> float:
        return 1000 * cpu_total(p) / max(1, p["done"])

    cols = [("ckms rotate", rot), ("ckms revoke", rev)]
    if base:
        cols.append((f"baseline {base['name'].split()[-1]}", base))
    head = f"{'':28}" + "".join(f"{c:>16}" for c, _ in cols) + f"{'floor §8':>12}"
    lines = [f"N = {n}, store {_label(result)}", head, "-" * len(head)]

    def row(label: str, values: list[str], floor: str = "") -> None:
        lines.append(f"{label:28}" + "".join(f"{v:>16}" for v in values) + f"{floor:>12}")

    row("hosts done", [f"{p['done']}/{n}" for _, p in cols])
    row("total s", [_fmt(p["total_s"]) for _, p in cols], _fmt(floor_s))
    row("per-host p50 ms", [_fmt(p["p50_ms"], 0) for _, p in cols])
    row("per-host p99 ms", [_fmt(p["p99_ms"], 0) for _, p in cols])
    row("per-host max ms", [_fmt(p["max_ms"], 0) for _, p in cols])
    row("  commit → event in Kafka ms", [_fmt(p["publish_ms"], 0) for _, p in cols[:2]])
    row("  agent work p50 ms", [_fmt(p["agent_p50_ms"], 0) for _, p in cols[:2]])
    row("  agent work p99 ms", [_fmt(p["agent_p99_ms"], 0) for _, p in cols[:2]])
    row("  commit → ack signed p50 ms", [_fmt(p["acked_p50_ms"], 0) for _, p in cols[:2]])
    row("  commit → ack signed p99 ms", [_fmt(p["acked_p99_ms"], 0) for _, p in cols[:2]])
    row("  ack signed → applied p50 ms", [_fmt(p["ack_transit_p50_ms"], 0) for _, p in cols[:2]])
    row("  ack signed → applied p99 ms", [_fmt(p["ack_transit_p99_ms"], 0) for _, p in cols[:2]])
    row(
        "CPU s, all processes",
        [_fmt(cpu_total(p), 1) for _, p in cols],
        _fmt(n * FLOOR_CPU_MS_PER_HOST / 1000, 1),
    )
    row("CPU ms per host", [_fmt(per_host(p)) for _, p in cols], _fmt(FLOOR_CPU_MS_PER_HOST))
    row(
        "  less idle fleet cost",
        [
            _fmt(1000 * (cpu_total(p) - p.get("idle_cpu_s", math.nan)) / max(1, p["done"]))
            for _, p in cols[:2]
        ],
    )
    row("  controller CPU s", [_fmt(controllers_cpu_s(p), 1) for _, p in cols[:2]])
    if result.get("store") == "postgresql":
        row("  postgres CPU s", [_fmt(p["cpu_s"].get("postgres", math.nan), 1) for _, p in cols])
    row("  kafka CPU s", [_fmt(p["cpu_s"].get("kafka", math.nan), 1) for _, p in cols])
    row(
        "  workers CPU s",
        [_fmt(sum(v for k, v in p["cpu_s"].items() if k.startswith("worker")), 1) for _, p in cols],
    )
    if base:
        row(
            "  pushers CPU s",
            ["", "", _fmt(sum(v for k, v in base["cpu_s"].items() if k.startswith("pusher")), 1)],
        )
    central = [central_ms_per_host(p) for _, p in cols[:2]]
    central_label = "(ctl+pg+kafka)" if result.get("store") == "postgresql" else "(ctl+kafka)"
    row(f"central CPU ms/host {central_label}", [_fmt(c) for c in central] + ([""] if base else []))
    if base:
        pushers = pusher_ms_per_host(base)
        row("  pusher CPU ms/host (baseline)", ["", "", _fmt(pushers)])
        row("  pusher / central", [_fmt(pushers / c, 1) + "x" for c in central])
    row("total / floor", [_fmt(p["total_s"] / floor_s, 1) + "x" for _, p in cols])
    if base:
        row(
            "baseline total / ckms total",
            [_fmt(base["total_s"] / p["total_s"], 1) + "x" for _, p in cols[:2]] + ["1.0x"],
        )
    row("load at start", [p["load"].split()[0] for _, p in cols])
    lines.append(
        f"controller: peak RSS {result['controller_peak_rss_mb']:.0f} MB, "
        f"CPU {result['controller']['cpu_s']:.1f} s since start; "
        f"kafka RSS {result['kafka_rss_mb']:.0f} MB; "
        f"workers: {result['workers']} processes, {result['worker_rss_mb']:.0f} MB RSS, "
        f"{result['worker_threads']} threads = {result['mb_per_agent']:.2f} MB per agent "
        f"({result['mb_per_agent_marginal']:.2f} MB marginal)"
    )
    if len(result.get("replica_stats", [])) > 1:
        lines.append(
            "replicas (SSH connections, acks applied, events published, terms led): "
            + "; ".join(
                f"ctl-{i + 1} {r['ssh_connections']}, {r['acks_applied']}, {r['published']}, "
                f"{r.get('leader_terms', 0)}"
                for i, r in enumerate(result["replica_stats"])
            )
        )
    idle = result.get("idle")
    if idle:
        per_s = idle["cpu_s_per_s"]
        lines.append(
            f"idle fleet ({idle['seconds']:.0f} s, load {idle['load'].split()[0]}): "
            f"{sum(per_s.values()):.2f} CPU-s per s in all = controllers "
            f"{sum(v for k, v in per_s.items() if _is_controller(k)):.2f} + postgres "
            f"{per_s.get('postgres', 0.0):.2f} + kafka {per_s['kafka']:.2f} + workers "
            f"{sum(v for k, v in per_s.items() if k.startswith('worker')):.2f}; "
            f"per agent {idle['agent_ms_per_s']:.3f} ms/s"
        )
    lines.append(
        f"open fds: controller {result['controller_fds']}, kafka {result['kafka_fds']}, "
        f"workers {result['worker_fds']}"
    )
    lines.append(
        f"fleet view after rotate: {result['fleet_after_rotate']}; "
        f"after revoke: {result['fleet_after_revoke']}; warm-up create → all installed "
        f"{_fmt(result['warmup']['total_s'])} s"
    )
    for p in result.get("baseline_runs", []):
        lines.append(
            f"  {p['name']:>16}: {p['done']}/{n} in {_fmt(p['total_s'])} s, "
            f"p99 {_fmt(p['p99_ms'], 0)} ms, CPU {_fmt(per_host(p))} ms/host; {p['note']}"
        )
    for p in (rot, rev):
        if p["note"]:
            lines.append(f"  {p['name']}: {p['note']}")
    return "\n".join(lines)


def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """What is measured at each N: SQLite with one controller (the reference), then the store
    and replicas asked for if they differ from it."""
    wanted = (args.store, args.replicas)
    if args.no_reference:
        return [wanted]
    return [("sqlite", 1)] + ([wanted] if wanted != ("sqlite", 1) else [])


async def main_async(args: argparse.Namespace) -> int:
    before = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="ckms-bench-", dir=args.dir))
    results = []
    configs = configurations(args)
    print(
        f"ckms fleet benchmark; load {load_average()} at start; fd limit {before[0]} raised for "
        f"the run; stores {', '.join(f'{s} x{r}' for s, r in configs)}; data in {work}",
        file=sys.stderr,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            kafka = await stack.enter_async_context(LocalKafka(heap=args.kafka_heap))
            postgres = None
            if any(store == "postgresql" for store, _ in configs):
                postgres = await stack.enter_async_context(LocalPostgres())
            for n in args.hosts:
                for i, (store, replicas) in enumerate(configs):
                    bench = FleetBench(n, args, kafka, work, store, replicas, postgres)
                    try:
                        await bench.setup()
                        await bench.run_ckms()
                        if args.baseline and i == 0:  # once per N: it runs no controller
                            await bench.run_baseline()
                    except Exception as exc:
                        bench.result["error"] = f"{type(exc).__name__}: {exc}"
                        print(f"N={n} {bench.label} failed: {exc}", file=sys.stderr)
                    finally:
                        bench.result["load_end"] = load_average()
                        await bench.close()
                    results.append(bench.result)
                    if "rotate" in bench.result:
                        print(table(bench.result) + "\n", flush=True)
                if summary := compare([r for r in results if r["hosts"] == n]):
                    print(summary, flush=True)  # each N's as soon as it is measured
                print(f"[N={n} done; load {load_average()}]", file=sys.stderr, flush=True)
        if summary := scaling(results):
            print(summary, flush=True)
        print(f"load {load_average()} at end", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        text = json.dumps(results, indent=2, default=str)
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0 if all("error" not in r for r in results) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hosts",
        type=lambda s: [int(x.replace("_", "")) for x in s.split(",")],
        default=[100],
        help="comma-separated fleet sizes (default 100)",
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default="sqlite",
        help="the store measured beside SQLite with one controller (default sqlite: only that)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="controller replicas on that store (default 1)"
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="measure only --store/--replicas, not SQLite with one controller beside it",
    )
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: auto)")
    parser.add_argument("--per-worker", type=int, default=1250, help="agents per worker (auto)")
    parser.add_argument(
        "--start-batch", type=int, default=250, help="agents started at once (all workers)"
    )
    parser.add_argument(
        "--ssh-workers", type=int, default=1, help="the controller's ssh_workers setting"
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions of the fleet topic")
    parser.add_argument(
        "--events-partitions", type=int, default=1, help="partitions of the events topic"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--settle", type=float, default=3.0, help="pause between phases, s")
    parser.add_argument(
        "--baseline",
        type=lambda s: [x for x in s.split(",") if x],
        default=["1x16", "1x64", "2x32", "2x128"],
        help="baseline settings PROCESSESxCONCURRENCY, comma-separated ('' to skip)",
    )
    parser.add_argument("--idle", type=float, default=10.0, help="idle window measured, s")
    parser.add_argument("--kafka-heap", default="1g")
    parser.add_argument("--dir", default=None, help="where the temp dirs go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the data and logs")
    parser.add_argument("--profile", default=None, help="py-spy every phase into this dir")
    parser.add_argument(
        "--profile-phases",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="only these phases (idle, create, rotate, revoke), comma-separated",
    )
    parser.add_argument("--json", default=None, help="write every figure to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
