"""Failover benchmark: the leader replica killed (kill -9) → another leads and publishes.

    python bench/failover.py                   # quick: 3 kills, 1 clean stop
    python bench/failover.py --kills 20 --json failover.json

What runs (all on this machine, each part a separate process): a real Kafka broker
(``ckms.devkafka``), a real PostgreSQL server (``ckms.devpostgres``) and ``--replicas``
controller processes on one database of it (the fleet benchmark's ``bench/_ctl.py``: real
``Controller``, shared SSH host key, the product's lease length unless ``--lease``), and a real
ckms ``Subscriber`` (signature-checked, read-committed) on the events topic, in the
orchestrator.

Each round, with every replica up and the restarted one done with its first lease round, after
a random part of a renewal interval (so the kill falls anywhere in the lease's cycle): the
leader is killed with SIGKILL, and a key is rotated at once through a surviving replica (as an
operator would: any replica takes writes). Measured from the kill:

- **lease taken**: the lease row names a surviving replica with a new epoch (its
  ``acquired_at``, written by the new leader; same machine, same clock);
- **event on Kafka**: the rotation's event delivered to the subscriber (it was committed right
  after the kill, so only the new leader can have published it).

Then the killed replica is started again (its home, its name: a new incarnation) and the next
round kills whoever leads. The same is measured for ``--stops`` clean stops (SIGTERM-like: the
leader releases its lease), the baseline printed beside the kills: what a kill costs over a
planned restart is the lease's expiry. At the end every rotation's event must have reached the
subscriber exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _proc import Child, load_average, percentile
from _store import BenchStore
from _tls import tls_settings

from ckms.consumer import Subscriber
from ckms.controller.service import ControllerSettings
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.devpostgres import LocalPostgres

KEY = "bench/failover"
INSTALL_PATH = "/etc/ckms/keys/{team}/{purpose}.json"
DEFAULT_LEASE_S = float(ControllerSettings.model_fields["leader_lease_s"].default)


@dataclass
class Round:
    """One leader taken down (killed, or stopped cleanly) and what followed."""

    how: str
    old_leader: str
    new_leader: str = ""
    lease_s: float = math.nan
    """Down → the lease row names the new leader (its ``acquired_at``)."""
    published_s: float = math.nan
    """Down → the rotation committed right after it delivered to the subscriber."""
    sent_s: float = math.nan
    """Down → the new leader marked the event sent (outbox ``sent_at``: Kafka confirmed it)."""
    restart_s: float = math.nan
    """The taken-down replica started again → serving SSH and done with a lease round."""
    load: str = ""


@dataclass
class Summary:
    how: str
    rounds: int
    lease_s: dict[str, float] = field(default_factory=dict)
    published_s: dict[str, float] = field(default_factory=dict)
    sent_s: dict[str, float] = field(default_factory=dict)
    restart_s: dict[str, float] = field(default_factory=dict)


def _stats(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v == v]  # NaN: not observed within the timeout
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class FailoverBench:
    """Replicas on one PostgreSQL database, taken down one leader at a time."""

    def __init__(
        self, args: argparse.Namespace, kafka: LocalKafka, postgres: LocalPostgres, work: Path
    ) -> None:
        self.args = args
        self.kafka = kafka
        self.work = work
        self.store = BenchStore("postgresql", work, postgres)
        run = uuid.uuid4().hex[:8]
        self.events_topic = f"ckms.events.bench-{run}"
        self.fleet_topic = f"ckms.fleet.bench-{run}"
        self.names = [f"ctl-{i + 1}" for i in range(args.replicas)]
        self.replicas: dict[str, Child] = {}
        self.arrived: dict[str, list[float]] = {}
        self.rotations: list[str] = []
        self.subscriber: Subscriber | None = None
        self._reader: asyncio.Task[None] | None = None

    def log(self, text: str) -> None:
        print(f"[load {load_average()}] {text}", file=sys.stderr, flush=True)

    async def start_replica(self, name: str) -> float:
        """Start (or start again) one replica; seconds until it serves and has seen the lease."""
        started = time.monotonic()
        first = self.names[0]
        child = Child.start(
            name, "_ctl", "ControllerService", log_file=str(self.work / f"{name}.log")
        )
        self.replicas[name] = child
        await child.call(
            "start",
            home=str(self.work / name),
            bootstrap=self.kafka.bootstrap,
            events_topic=self.events_topic,
            fleet_topic=self.fleet_topic,
            kafka=tls_settings(self.kafka.security(SubjectRole.CONTROLLER, "bench")),
            partitions=1,
            events_partitions=1,
            store=self.store.settings(),
            replica_name=name,
            leader_lease_s=self.args.lease,
            host_key_from=str(self.work / first) if name != first else None,
        )
        deadline = time.monotonic() + self.args.timeout
        while (await child.call("leader"))["epoch"] is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did no lease round in {self.args.timeout:.0f} s")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def setup(self) -> None:
        await self.store.open()
        for name in self.names:
            await self.start_replica(name)
        first = self.replicas[self.names[0]]
        trust = await first.call("signing_key")
        self.subscriber = Subscriber(
            bootstrap=self.kafka.bootstrap,
            security=self.kafka.security(SubjectRole.SUBSCRIBER, "bench-failover"),
            trust=trust,
            topic=self.events_topic,
            fetch_max_wait_ms=100,
            client_id="bench-failover",
        )
        await self.subscriber.start()
        self._reader = asyncio.create_task(self._read())
        event = await first.call(
            "create_key", name=KEY, labels={"fleet": "none"}, path=INSTALL_PATH
        )
        await self._wait_delivered(event["event_id"], time.monotonic() + self.args.timeout)

    async def _read(self) -> None:
        assert self.subscriber is not None
        async for event in self.subscriber:
            self.arrived.setdefault(event.id, []).append(time.monotonic())

    async def _wait_delivered(self, event_id: str, deadline: float) -> float:
        """The monotonic time ``event_id`` reached the subscriber (NaN past ``deadline``)."""
        while event_id not in self.arrived:
            if time.monotonic() > deadline:
                return math.nan
            await asyncio.sleep(0.01)
        return self.arrived[event_id][0]

    async def lease(self) -> dict[str, Any]:
        rows = await self.store.fetchall(
            "SELECT holder_name, epoch, acquired_at, expires_at FROM leader_lease"
        )
        if len(rows) != 1:
            raise RuntimeError(f"expected one lease row, found {len(rows)}")
        return rows[0]

    async def leader(self) -> str:
        """The replica that leads now (it says so, and the lease row agrees)."""
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            row = await self.lease()
            child = self.replicas.get(row["holder_name"])
            if child is not None and (await child.call("leader"))["leading"]:
                return str(row["holder_name"])
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no replica leads after {self.args.timeout:.0f} s")

    async def one_round(self, how: str, rng: random.Random) -> Round:
        old = await self.leader()
        await asyncio.sleep(rng.uniform(0, self.args.lease / 3))  # anywhere in a renewal
        before = await self.lease()
        survivor = next(n for n in self.names if n != old)
        r = Round(how, old, load=load_average())
        child = self.replicas.pop(old)
        down_wall, down = time.time(), time.monotonic()
        if how == "kill":
            child.process.kill()  # SIGKILL: no release, no goodbye
            await asyncio.to_thread(child.process.join, 10)
        else:
            await child.stop()  # the controller's clean stop releases the lease
        event = await self.replicas[survivor].call("rotate", name=KEY)
        self.rotations.append(event["event_id"])
        deadline = down + self.args.timeout
        while time.monotonic() < deadline:
            row = await self.lease()
            if row["epoch"] > before["epoch"] and row["holder_name"] != old:
                r.new_leader = str(row["holder_name"])
                r.lease_s = _parse_time(row["acquired_at"]) - down_wall
                break
            await asyncio.sleep(0.02)
        r.published_s = await self._wait_delivered(event["event_id"], deadline) - down
        sent = await self.store.fetchval(
            "SELECT sent_at FROM outbox WHERE event_id = ?", event["event_id"]
        )
        if sent is not None:
            r.sent_s = _parse_time(sent) - down_wall
        r.restart_s = await self.start_replica(old)
        self.log(
            f"{how} {old}: {r.new_leader or 'nobody'} leads after {r.lease_s:.2f} s, event on "
            f"Kafka after {r.published_s:.2f} s (marked sent {r.sent_s:.2f} s); {old} back in "
            f"{r.restart_s:.1f} s"
        )
        return r

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self.subscriber is not None:
            await self.subscriber.aclose()
        await asyncio.gather(*(c.stop() for c in self.replicas.values()), return_exceptions=True)
        await self.store.close()


def summarize(how: str, rounds: list[Round]) -> Summary:
    mine = [r for r in rounds if r.how == how]
    return Summary(
        how,
        len(mine),
        lease_s=_stats([r.lease_s for r in mine]),
        published_s=_stats([r.published_s for r in mine]),
        sent_s=_stats([r.sent_s for r in mine]),
        restart_s=_stats([r.restart_s for r in mine]),
    )


def report(
    args: argparse.Namespace, summaries: list[Summary], delivered: dict[str, int], loads: list[str]
) -> str:
    """The table: kills and clean stops, and kills over clean stops (same run)."""
    renew = args.lease / 3
    lines = [
        f"failover: {args.replicas} replicas on PostgreSQL, lease {args.lease:g} s (renewed "
        f"every {renew:.2f} s; a killed leader's lease expires within {args.lease:g} s and is "
        f"taken at a follower's next round: bound {args.lease + renew:.2f} s)",
        f"{'seconds':32}{'n':>4}{'min':>8}{'p50':>8}{'p99':>8}{'max':>8}",
    ]
    for s in summaries:
        for label, stats in (
            ("lease taken", s.lease_s),
            ("event on Kafka", s.published_s),
            ("  event marked sent", s.sent_s),
            ("restarted → serving", s.restart_s),
        ):
            if not stats.get("n"):
                lines.append(f"{s.how + ' → ' + label:32}{0:>4}   (none observed)")
                continue
            lines.append(
                f"{s.how + ' → ' + label:32}{stats['n']:>4}"
                + "".join(f"{stats[k]:>8.2f}" for k in ("min", "p50", "p99", "max"))
            )
    kills = next((s for s in summaries if s.how == "kill"), None)
    stops = next((s for s in summaries if s.how == "stop"), None)
    if kills and stops and kills.published_s.get("n") and stops.published_s.get("n"):
        lines.append(
            f"kill / clean stop, event on Kafka: p50 "
            f"{kills.published_s['p50'] / stops.published_s['p50']:.1f}x, p99 "
            f"{kills.published_s['p99'] / stops.published_s['p99']:.1f}x"
        )
    if kills and kills.published_s.get("n"):
        lines.append(
            f"kill → event on Kafka p99 / bound: "
            f"{kills.published_s['p99'] / (args.lease + renew):.2f}x"
        )
    lines.append(
        "p99 is nearest-rank: with 20 rounds it is the slowest one. Every rotation's event "
        f"reached the subscriber once: {delivered['once']}/{delivered['rotations']} "
        f"(twice or more: {delivered['repeated']}, never: {delivered['missing']})"
    )
    lines.append(f"load at start {loads[0]}; at end {loads[-1]}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    loads = [load_average()]
    work = Path(tempfile.mkdtemp(prefix="ckms-failover-", dir=args.dir))
    print(f"ckms failover benchmark; load {loads[0]} at start; data in {work}", file=sys.stderr)
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    arrived: dict[str, list[float]] = {}
    rotations: list[str] = []
    status = 0
    try:
        async with LocalKafka(heap=args.kafka_heap) as kafka, LocalPostgres() as postgres:
            bench = FailoverBench(args, kafka, postgres, work)
            try:
                await bench.setup()
                for how, count in (("stop", args.stops), ("kill", args.kills)):
                    for _ in range(count):
                        rounds.append(await bench.one_round(how, rng))
                await asyncio.sleep(1.0)  # a duplicate, if any, arrives now
            except Exception as exc:
                print(f"failover benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                status = 1
            finally:
                arrived, rotations = dict(bench.arrived), list(bench.rotations)
                await bench.close()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    loads.append(load_average())
    counts = [len(arrived.get(e, [])) for e in rotations]
    delivered = {
        "rotations": len(counts),
        "once": sum(1 for c in counts if c == 1),
        "repeated": sum(1 for c in counts if c > 1),
        "missing": sum(1 for c in counts if c == 0),
    }
    summaries = [
        summarize(how, rounds) for how in ("stop", "kill") if any(r.how == how for r in rounds)
    ]
    print(report(args, summaries, delivered, loads), flush=True)
    if args.json:
        data = {
            "args": vars(args),
            "rounds": [asdict(r) for r in rounds],
            "summaries": [asdict(s) for s in summaries],
            "delivered": delivered,
            "load": loads,
        }
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(data, indent=2))
    if delivered["repeated"] or delivered["missing"]:
        status = 1
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="leaders killed (default 3)")
    parser.add_argument(
        "--stops", type=int, default=1, help="leaders stopped cleanly first, the baseline"
    )
    parser.add_argument("--replicas", type=int, default=2, help="controller replicas (>= 2)")
    parser.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_S,
        help=f"leader_lease_s (default {DEFAULT_LEASE_S:g}, the product's)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per round")
    parser.add_argument("--seed", type=int, default=17, help="where in the lease kills fall")
    parser.add_argument("--kafka-heap", default="512m")
    parser.add_argument("--dir", default=None, help="where the temp dir goes (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the data and logs")
    parser.add_argument("--json", default=None, help="write every round to this file")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2: one to take down, one to take over")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
