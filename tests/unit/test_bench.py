"""The benchmarks' accounting and reports (bench/): what counts as central cost, the ratios
against the same run's reference, the failover summary; and that each script starts.

The benchmarks themselves are run by hand (README, Performance); these keep their arithmetic
honest and their imports working without starting Kafka, PostgreSQL or a fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """The bench modules, imported as the scripts import them (bench/ on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import _proc
        import _store
        import failover
        import fleet

        yield {"fleet": fleet, "failover": failover, "_proc": _proc, "_store": _store}
    finally:
        sys.path.remove(str(BENCH))
        for name in ("fleet", "failover", "_proc", "_store", "_tls"):
            sys.modules.pop(name, None)


def phase(cpu_s: dict[str, float], done: int = 10, **more: Any) -> dict[str, Any]:
    base = {"done": done, "cpu_s": cpu_s, "total_s": 2.0, "p50_ms": 900.0, "p99_ms": 1500.0}
    return base | {"publish_ms": 20.0, "load": "1.00 1.00 1.00"} | more


def test_central_cost_is_every_replica_postgres_and_kafka_not_the_hosts(
    bench: dict[str, ModuleType],
) -> None:
    cpu = {"controller": 1.0, "replica1": 2.0, "postgres": 3.0, "kafka": 4.0, "worker0": 50.0}
    p = phase(cpu | {"worker1": 50.0})
    assert bench["fleet"].central_cpu_s(p) == 10.0
    assert bench["fleet"].central_ms_per_host(p) == 1000.0
    assert bench["fleet"].controllers_cpu_s(p) == 3.0


def test_the_reference_is_sqlite_with_one_controller_in_the_same_run(
    bench: dict[str, ModuleType],
) -> None:
    fleet = bench["fleet"]
    assert fleet.configurations(fleet.parse_args([])) == [("sqlite", 1)]
    ha = fleet.parse_args(["--store", "postgresql", "--replicas", "2"])
    assert fleet.configurations(ha) == [("sqlite", 1), ("postgresql", 2)]
    alone = fleet.parse_args(["--store", "postgresql", "--replicas", "2", "--no-reference"])
    assert fleet.configurations(alone) == [("postgresql", 2)]


def test_comparison_prints_each_store_against_the_reference(bench: dict[str, ModuleType]) -> None:
    def result(store: str, replicas: int, scale: float) -> dict[str, Any]:
        cpu = {"controller": 1.0 * scale, "kafka": 1.0, "worker0": 9.0}
        if store == "postgresql":
            cpu |= {"replica1": 0.5, "postgres": 0.5}
        p = phase(cpu, total_s=2.0 * scale)
        runs = {"rotate": p, "revoke": p, "warmup": p}
        return {"hosts": 10, "store": store, "replicas": replicas, **runs}

    text = bench["fleet"].compare([result("sqlite", 1, 1.0), result("postgresql", 2, 2.0)])
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "postgresql x2 / sqlite x1" in text
    assert lines["rotate total s"].split() == ["rotate", "total", "s", "2.00", "4.00", "2.00x"]
    # central: sqlite 1 + 1 = 2 s, postgresql 2 + 0.5 + 0.5 + 1 = 4 s, over 10 hosts
    central = lines["rotate central CPU ms/host"].split()[-3:]
    assert central == ["200.00", "400.00", "2.00x"]
    assert bench["fleet"].compare([result("sqlite", 1, 1.0)]) == ""  # nothing to compare


def test_a_servers_cpu_counts_its_ended_and_live_workers_less_the_excluded(
    bench: dict[str, ModuleType],
) -> None:
    proc = bench["_proc"]
    burn = "import time\nwhile time.process_time() < 0.3: pass\n"
    me = os.getpid()
    before, own_before = proc.tree_cpu_seconds(me), proc.cpu_seconds(me)
    subprocess.run([sys.executable, "-c", burn], check=True)  # ended and reaped: cutime
    assert proc.tree_cpu_seconds(me) - before >= 0.25
    assert proc.cpu_seconds(me) - own_before < 0.25
    live = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(60)\n"])
    try:
        deadline = time.monotonic() + 60
        while proc.cpu_seconds(live.pid) < 0.25:
            assert time.monotonic() < deadline, "the child did not burn its CPU"
            time.sleep(0.05)
        counted = proc.tree_cpu_seconds(me)
        excluded = proc.tree_cpu_seconds(me, frozenset({live.pid}))
        assert counted - excluded >= 0.25
    finally:
        live.kill()
        live.wait()


def test_the_store_reader_takes_question_mark_parameters(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    store = bench["_store"].BenchStore("sqlite", tmp_path)
    asyncio.run(store.open())
    conn = sqlite3.connect(store.url)
    conn.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(1, "x"), (2, "y"), (3, "y")])
    conn.commit()
    conn.close()
    assert asyncio.run(store.fetchval("SELECT count(*) FROM t WHERE b = ? AND a > ?", "y", 2)) == 1
    assert store.cpu_s() == 0.0  # SQLite's work is the controller's own
    with pytest.raises(ValueError, match="LocalPostgres"):
        bench["_store"].BenchStore("postgresql", tmp_path)


def test_failover_report_has_percentiles_the_ratio_and_each_delivery(
    bench: dict[str, ModuleType],
) -> None:
    failover = bench["failover"]
    rounds = [
        failover.Round("stop", "ctl-1", "ctl-2", lease_s=0.1, published_s=1.0, restart_s=2.0),
        *(
            failover.Round("kill", "ctl-1", "ctl-2", lease_s=9.0 + i, published_s=10.0 + i)
            for i in range(3)
        ),
        failover.Round("kill", "ctl-2", "", lease_s=math.nan, published_s=math.nan),
    ]
    summaries = [failover.summarize(how, rounds) for how in ("stop", "kill")]
    kill = summaries[1]
    assert kill.rounds == 4 and kill.published_s["n"] == 3  # the unobserved one is not a 0
    assert (kill.published_s["p50"], kill.published_s["max"]) == (11.0, 12.0)
    args = argparse.Namespace(replicas=2, lease=9.0)
    delivered = {"rotations": 5, "once": 4, "repeated": 0, "missing": 1}
    text = failover.report(args, summaries, delivered, ["1.0 1.0 1.0", "2.0 2.0 2.0"])
    assert "kill / clean stop, event on Kafka: p50 11.0x" in text
    assert "bound 12.00 s" in text and "p99 / bound: 1.00x" in text
    assert "4/5 (twice or more: 0, never: 1)" in text
    assert "load at start 1.0 1.0 1.0; at end 2.0 2.0 2.0" in text


@pytest.mark.parametrize("script", ["fleet.py", "failover.py"])
def test_each_benchmark_starts(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert "--replicas" in out.stdout
