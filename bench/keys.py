"""Scale in keys and audit records: the controller's costs at 10k, 30k and 100k keys, 1M records.

    python bench/keys.py                                   # 10k, 30k, 100k keys; 1M records
    python bench/keys.py --keys 500,1500,5000 --records 50000   # quick

Everything runs in this process, on a real controller's store (SQLite files, WAL,
synchronous=FULL) through the real paths: keys are created with ``Lifecycle.create_many``
(each sealed under the data KEK, audited and evented) in the requests ``ckms key create
--from-file`` sends, audit records with ``audit.append``. No Kafka; SSH only for the CLI phase.

Per key count, in one run:

- **create**: keys/s through the batched create path (onboarding);
- **scheduler pass**: ``due_work`` when nothing is due (the next-due index);
- **key view fill**: ``Lifecycle.current_keys`` from empty (the agents' view), and RSS after;
  again as a controller start does it, in a process of its own that opened and unsealed the
  store (``view fill at start``: the heap holds nothing else);
- **key change**: one rotation, then ``current_keys`` again (refreshes that key only);
- **key.list**: every page of the admin handler, each reply encoded as JSON (what the CLI
  receives, minus SSH), and the bytes of the largest page.

For the audit log (a store of its own): appends one per transaction (beside plain sqlite3's rate
on the same disk, which bounds it: one fsync each) and group-committed (1,000 per
transaction), a full ``audit verify`` (streamed, in a worker thread) with the RSS it adds, and
one incremental checkpoint over 1,000 new records.

Per key count the CLI phase also runs the real ``ckms key list`` and ``ckms key list --json``
in a process of their own against this controller's SSH endpoint (``--no-ssh`` skips it), with
ckms's bytecode compiled as an installed ckms has it (``PYTHONDONTWRITEBYTECODE`` is dropped for
it and the cache goes to the run's directory).

A loop-lag probe (a task asking to wake every 5 ms) records the worst event-loop stall of each
phase, and beside it the most CPU (``time.thread_time``) one step of the loop used: the part of
a stall the code decides, where the rest is the loop's thread waiting for a core; the CPU
seconds of the main phases are shown too (this process's threads, and the CLI's process once it
exited), which depend far less than wall time on what else the machine runs; for the listings,
the longest garbage collection in this process (a full one is a stall of its own).
Ratios 100k/10k are printed at the end. The machine may be shared: figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from _proc import rss_mb

from ckms import _gc
from ckms.cli.key import request_batches
from ckms.controller import replies
from ckms.controller.duework import due_work
from ckms.controller.lifecycle import Lifecycle, NewKey
from ckms.controller.sealing import Vault, init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.crypto import generate_signing_key, sign, signing_public_key
from ckms.protocol import admin as api
from ckms.ssh import generate_ssh_key, public_key_text
from ckms.ssh._keys import write_private_key
from ckms.store import Store, utc_now
from ckms.store import audit as audit_log

PASSPHRASE = "benchmark passphrase, not a secret"
PAGE = api.KEY_PAGE_DEFAULT


class StepCpu:
    """The most CPU one step of the event loop (one callback, one task step) used: the part of a
    stall the code decides. The rest of a stall is the loop's thread waiting for a core or the
    GIL, which depends on what else runs (``time.thread_time`` does not count it)."""

    worst = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        cls._installed = True
        run = asyncio.events.Handle._run

        def timed(handle: asyncio.events.Handle) -> None:
            start = time.thread_time()
            try:
                run(handle)
            finally:
                cls.worst = max(cls.worst, time.thread_time() - start)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]


class GcPause:
    """The longest garbage collection (any generation) in a phase (``LoopLag.phase`` resets
    it): a full one walks every object not frozen, on the loop's thread, a stall of its own."""

    worst = 0.0
    _started = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        cls._installed = True

        def watch(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                cls._started = time.perf_counter()
            else:
                cls.worst = max(cls.worst, time.perf_counter() - cls._started)

        gc.callbacks.append(watch)


class LoopLag:
    """The worst delay past its deadline of a task that asks to wake every ``period``."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None
        StepCpu.install()
        GcPause.install()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, loop.time() - due)

    @asynccontextmanager
    async def phase(self) -> AsyncIterator[dict[str, float]]:
        """Measure one phase: yields a dict that gets ``seconds`` and ``stall_ms``."""
        self.worst = 0.0
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(self.period * 2)  # the probe is running before the phase starts
        self.worst = 0.0
        StepCpu.worst = 0.0
        GcPause.worst = 0.0
        out: dict[str, float] = {}
        start, cpu = time.perf_counter(), _cpu_s()
        try:
            yield out
        finally:
            out["seconds"] = time.perf_counter() - start
            out["cpu_s"] = _cpu_s() - cpu
            out["step_cpu_ms"] = StepCpu.worst * 1000
            out["gc_ms"] = GcPause.worst * 1000
            await asyncio.sleep(self.period * 2)
            self._task.cancel()
            out["stall_ms"] = self.worst * 1000


def _cpu_s() -> float:
    """CPU seconds of this process (every thread) and of its children that have exited: on a
    shared machine the CPU a phase used says more than the wall time it took."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class PeakRss:
    """This process's highest RSS (MB) while the block runs, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self.base = rss_mb(os.getpid())
        self.peak = self.base

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, rss_mb(os.getpid()))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _open(path: Path) -> tuple[Store, Vault, Lifecycle]:
    store = await Store.open(path)
    await init_controller(store, passphrase=PASSPHRASE)
    vault = Vault(store)
    await vault.unseal_with_passphrase(PASSPHRASE)
    return store, vault, Lifecycle(store, vault)


async def _open_controller(home: Path) -> Controller:
    """A controller on a home of its own, unsealed; its SSH endpoint is started later, and no
    Kafka is needed (nothing here publishes)."""
    controller = Controller(ControllerSettings(home=home, listen_port=0))
    await controller.open()
    assert controller.store is not None
    await init_controller(controller.store, passphrase=PASSPHRASE)
    await controller.vault.unseal_with_passphrase(PASSPHRASE)
    return controller


async def keys_phase(root: Path, count: int, lag: LoopLag, *, ssh: bool) -> dict[str, float]:
    """Every key figure at ``count`` keys, on a controller (and store) of its own."""
    controller = await _open_controller(root / f"keys-{count}")
    store, lifecycle = controller.store, controller.lifecycle
    assert store is not None
    out: dict[str, float] = {}
    try:
        per_request = _keys_per_request()
        _gc.settle()  # as the controller does when it starts
        async with lag.phase() as p:
            # As ``ckms key create --from-file`` sends them: requests as large as the request
            # bound allows, each one ``key.create_many`` of the specs it carries.
            for start in range(0, count, per_request):
                specs = [_spec(i) for i in range(start, min(start + per_request, count))]
                await lifecycle.create_many(specs, actor="bench")
        out["create keys/s"] = count / p["seconds"]
        out["create CPU ms/key"] = p["cpu_s"] * 1000 / count
        out["create stall ms"] = p["stall_ms"]
        out["create longest step CPU ms"] = p["step_cpu_ms"]
        del specs
        gc.collect()

        async with lag.phase() as p:
            work = await due_work(store, utc_now())
        assert work.empty, "nothing should be due right after creation"
        out["scheduler pass s"], out["scheduler stall ms"] = p["seconds"], p["stall_ms"]

        async with lag.phase() as p:
            view = await lifecycle.current_keys()
        assert len(view) == count
        out["view fill s"], out["view fill stall ms"] = p["seconds"], p["stall_ms"]
        out["view fill CPU s"] = p["cpu_s"]
        out["view fill longest step CPU ms"] = p["step_cpu_ms"]
        gc.collect()
        out["RSS with view MB"] = rss_mb(os.getpid())

        async with lag.phase() as p:
            await lifecycle.rotate("team00/key-000000", actor="bench")
            view = await lifecycle.current_keys()
        assert view["team00/key-000000"].latest_version == 2
        out["key change s"], out["key change stall ms"] = p["seconds"], p["stall_ms"]
        out["key change longest step CPU ms"] = p["step_cpu_ms"]

        async with lag.phase() as p:
            listed, largest = await _list_all(lifecycle)
        assert listed == count
        out["key.list all pages s"], out["key.list stall ms"] = p["seconds"], p["stall_ms"]
        out["key.list all pages CPU s"] = p["cpu_s"]
        out["key.list longest step CPU ms"] = p["step_cpu_ms"]
        out["key.list longest GC pause ms"] = p["gc_ms"]
        out["key.list largest page KB"] = largest / 1024
        if ssh:
            out.update(await _cli_phase(controller, root, count, lag))
    finally:
        del lifecycle
        await controller.close()
    out.update(await _fill_at_start(root / f"keys-{count}", count))
    return out


async def _fill_at_start(home: Path, count: int) -> dict[str, float]:
    """The key view fill as a controller start does it: in a process of its own that opened
    and unsealed this store, on a heap holding nothing else (the fill above runs in this
    process after the keys were created, on a heap the earlier key counts left behind)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--fill-only",
        str(home),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0, "the fill at start failed"
    figures = json.loads(stdout)
    assert figures.pop("keys") == count
    return figures


async def _fill_only(home: Path) -> None:
    """``--fill-only HOME``: open and unseal the controller at HOME, fill its key view from
    empty, print the figures as JSON."""
    controller = Controller(ControllerSettings(home=home, listen_port=0))
    await controller.open()
    try:
        await controller.vault.unseal_with_passphrase(PASSPHRASE)
        _gc.settle()  # as the controller does when it starts
        lag = LoopLag()
        async with lag.phase() as p:
            view = await controller.lifecycle.current_keys()
        figures = {
            "keys": len(view),
            "view fill at start s": p["seconds"],
            "view fill at start CPU s": p["cpu_s"],
            "view fill at start stall ms": p["stall_ms"],
        }
    finally:
        await controller.close()
    print(json.dumps(figures))


async def _cli_phase(
    controller: Controller, root: Path, count: int, lag: LoopLag
) -> dict[str, float]:
    """``ckms key list`` (table) and ``ckms key list --json``, the real CLI in a process of its
    own over SSH to this controller's endpoint: start to exit, every key listed."""
    await controller.rpc.start("127.0.0.1", 0)
    identity = root / f"operator-{count}"
    key = generate_ssh_key()
    write_private_key(identity, key)
    await controller.admin.operators.add("bench", "auditor", public_key_text(key), actor="bench")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CKMS_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env |= {
        "CKMS_CONTROLLER": f"127.0.0.1:{controller.port}",
        "CKMS_CONTROLLER_FINGERPRINT": controller.host_key_fingerprint,
        "CKMS_USER": "bench",
        "CKMS_IDENTITY": str(identity),
        "COLUMNS": "200",
        # As an installed ckms runs: with its modules' bytecode compiled (pip compiles it at
        # install), here into a cache of the run's own; compiled once before the timed runs.
        "PYTHONPYCACHEPREFIX": str(root / "pycache"),
    }
    warm = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import ckms.cli._app, ckms.cli.key",  # the app imports a command's module on use
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert await warm.wait() == 0
    out: dict[str, float] = {}
    for label, args in (("key list --json", ["--json"]), ("key list (table)", [])):
        async with lag.phase() as p:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ckms.cli",
                "key",
                "list",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        if args:
            assert len(json.loads(stdout)["keys"]) == count
        else:
            assert stdout.count(b"hmac-sha256") == count, "the table lists every key"
        out[f"CLI {label} over SSH s"] = p["seconds"]
        out[f"CLI {label} CPU s (CLI + controller)"] = p["cpu_s"]
        out[f"CLI {label} stall ms"] = p["stall_ms"]
        out[f"CLI {label} longest step CPU ms"] = p["step_cpu_ms"]
        out[f"CLI {label} longest GC pause ms"] = p["gc_ms"]
    return out


def _spec(i: int) -> NewKey:
    return NewKey(name=f"team{i % 100:02}/key-{i:06}", type="hmac-sha256")


def _keys_per_request() -> int:
    """How many of the bench's keys the CLI puts in one ``key.create_many`` request."""
    sample = [
        api.KeyCreateParams(name=s.name, type=str(s.type))
        for s in map(_spec, range(api.CREATE_MANY_MAX + 1))
    ]
    return len(request_batches(sample)[0])


async def _list_all(lifecycle: Lifecycle) -> tuple[int, int]:
    """What the admin ``key.list`` handler does for every page (the same steps, in the same
    slices), each reply JSON-encoded."""
    after: str | None = None
    listed = largest = 0
    while True:
        now = utc_now()
        keys = await lifecycle.page(after, PAGE + 1)
        more = len(keys) > PAGE
        keys = keys[:PAGE]
        summaries = []
        for i, key in enumerate(keys, 1):
            summaries.append(replies.key_summary(key, now=now))
            if i % 100 == 0:
                await asyncio.sleep(0)
        reply = api.KeyListReply(
            keys=tuple(summaries),
            next=keys[-1].name if more else None,
        )
        body = reply.model_dump_json()
        largest = max(largest, len(body))
        listed += len(reply.keys)
        await asyncio.sleep(0)
        if reply.next is None:
            return listed, largest
        after = reply.next


async def _append(store: Store, n: int, *, per_tx: int, start: int = 0) -> None:
    now = utc_now()
    for first in range(start, start + n, per_tx):
        async with store.write() as tx:
            for i in range(first, min(first + per_tx, start + n)):
                await audit_log.append(
                    tx,
                    now=now,
                    actor="bench",
                    action="key.rotate",
                    object=f"key:team{i % 100:02}/key-{i:06}",
                    details={"version": 2, "event_id": f"{i:032x}", "event_seq": i},
                )


def _raw_commits(path: Path, n: int) -> float:
    """Transactions/s of plain sqlite3 (no ckms) inserting one audit-sized row each, with the
    store's pragmas (WAL, synchronous=FULL): what the disk allows one per transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        start = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 300))
            conn.execute("COMMIT")
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


async def audit_phase(root: Path, records: int, lag: LoopLag) -> dict[str, float]:
    """Append rates, a full streamed verify and one incremental checkpoint."""
    store = await Store.open(root / "audit.db")
    private = generate_signing_key()
    public = signing_public_key(private)
    out: dict[str, float] = {}

    async def checkpoint() -> audit_log.AuditCheckpoint:
        return await audit_log.checkpoint(
            store, sign=lambda data: sign(private, data), public_key=public, now=utc_now()
        )

    try:
        single = min(3000, records)
        out["raw sqlite3 1 insert/tx (this disk) /s"] = await asyncio.to_thread(
            _raw_commits, root / "raw.db", single
        )
        async with lag.phase() as p:
            await _append(store, single, per_tx=1)
        out["append 1/tx records/s"] = single / p["seconds"]
        rest = records - single
        async with lag.phase() as p:
            await _append(store, rest, per_tx=1000, start=single)
        out["append grouped records/s"] = rest / p["seconds"]
        out["append grouped stall ms"] = p["stall_ms"]
        out["append grouped longest step CPU ms"] = p["step_cpu_ms"]
        await checkpoint()
        gc.collect()
        with PeakRss() as rss:
            async with lag.phase() as p:
                report = await audit_log.verify_store(store, public)
        assert report.ok and report.size == records, report
        out["verify full s"], out["verify stall ms"] = p["seconds"], p["stall_ms"]
        out["verify RSS added MB"] = rss.peak - rss.base
        out["verify longest step CPU ms"] = p["step_cpu_ms"]
        await _append(store, 1000, per_tx=1000, start=records)
        async with lag.phase() as p:
            cp = await checkpoint()
        assert cp.size == records + 1000
        out["incremental checkpoint (1,000 new) s"] = p["seconds"]
        out["incremental checkpoint stall ms"] = p["stall_ms"]
    finally:
        await store.close()
    return out


def _show(results: dict[int, dict[str, float]]) -> None:
    counts = sorted(results)
    names = list(results[counts[0]])
    header = ["figure", *(f"{c:,} keys" for c in counts)]
    if len(counts) > 1:
        header.append(f"{counts[-1] // counts[0]}x keys: ratio")
    rows = []
    for name in names:
        values = [results[c][name] for c in counts]
        row = [name, *(f"{v:,.3f}" if v < 100 else f"{v:,.0f}" for v in values)]
        if len(counts) > 1:
            row.append(f"{values[-1] / values[0]:.2f}" if values[0] else "-")
        rows.append(row)
    _table(header, rows)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


async def main(args: argparse.Namespace) -> None:
    lag = LoopLag()
    counts = [int(c) for c in args.keys.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="ckms-bench-keys-", dir=args.dir) as tmp:
        root = Path(tmp)
        results: dict[int, dict[str, Any]] = {}
        for count in counts:
            started = time.perf_counter()
            results[count] = await keys_phase(root, count, lag, ssh=args.ssh)
            print(f"# {count:,} keys measured in {time.perf_counter() - started:.0f} s", flush=True)
            gc.collect()
        _show(results)
        if args.records:
            print()
            audit = await audit_phase(root, args.records, lag)
            _table(
                ["figure", f"{args.records:,} records"],
                [[k, f"{v:,.3f}" if v < 100 else f"{v:,.0f}"] for k, v in audit.items()],
            )
    print(f"\n(one run, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="10000,30000,100000", help="key counts, comma-separated")
    parser.add_argument("--records", type=int, default=1_000_000, help="audit records (0: skip)")
    parser.add_argument(
        "--no-ssh",
        dest="ssh",
        action="store_false",
        help="skip the CLI phase (``ckms key list`` over SSH in a process of its own)",
    )
    parser.add_argument("--dir", default=None, help="where the SQLite files go (default: tmp)")
    parser.add_argument("--fill-only", type=Path, help=argparse.SUPPRESS)  # see _fill_at_start
    arguments = parser.parse_args()
    asyncio.run(_fill_only(arguments.fill_only) if arguments.fill_only else main(arguments))
