"""Benchmark plumbing: child processes with an asyncio RPC over a pipe, /proc metrics, stats.

Each child (the controller, a worker full of agents, a baseline pusher) runs its own event loop
and serves method calls sent by the orchestrator over a ``multiprocessing`` pipe; results are
plain Python values. Nothing here is part of ckms: it only starts, drives and measures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import resource
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- /proc metrics -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as src:
        fields = src.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int, exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds of a server and its worker processes: its own, what its children that ended
    used (``cutime``/``cstime``, counted once it reaped them) and its live children's, less
    ``exclude`` (the benchmark's own connections). A child that ends between two readings
    moves from the live sum into the reaped one, so differences stay true."""
    with open(f"/proc/{pid}/stat") as src:
        fields = src.read().rsplit(")", 1)[1].split()
    own = sum(int(f) for f in fields[11:15]) / _TICK
    live = 0.0
    for child in children(pid):
        if child in exclude:
            continue
        with contextlib.suppress(OSError):  # ended (and not yet reaped) meanwhile
            live += cpu_seconds(child)
    return own + live


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as src:
            return [int(p) for p in src.read().split()]
    except OSError:
        return []


def status_kb(pid: int, name: str) -> int:
    """A ``/proc/<pid>/status`` figure in kB (VmRSS, VmHWM, Threads...)."""
    with open(f"/proc/{pid}/status") as src:
        for line in src:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    """Resident set size now, MB."""
    return status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM), MB."""
    return status_kb(pid, "VmHWM") / 1024


def open_fds(pid: int) -> dict[str, int]:
    """Open file descriptors of a process by kind (socket, file, pipe, other) and in total."""
    kinds = {"socket": 0, "file": 0, "pipe": 0, "other": 0}
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("/"):
            kinds["file"] += 1
        else:
            kinds["other"] += 1
    kinds["total"] = sum(kinds.values())
    return kinds


def load_average() -> str:
    """``uptime``'s three load averages."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def raise_fd_limit(wanted: int = 262_144) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE as far as allowed (children inherit it); return the limit before."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        ceiling = hard
    target = min(wanted, ceiling)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


# -- child processes ---------------------------------------------------------------------------


def _child_entry(conn: Any, module: str, cls: str, kwargs: dict[str, Any]) -> None:
    """Run ``module.cls(**kwargs)`` in a fresh event loop and serve calls until told to stop."""
    logging.basicConfig(
        level=logging.WARNING,
        filename=kwargs.pop("log_file", None),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    service = getattr(importlib.import_module(module), cls)(**kwargs)
    asyncio.run(_serve(conn, service))


async def _serve(conn: Any, service: Any) -> None:
    loop = asyncio.get_running_loop()
    pipe = ThreadPoolExecutor(1, thread_name_prefix="bench-pipe")  # keep the default pool free
    try:
        while True:
            try:
                message = await loop.run_in_executor(pipe, conn.recv)
            except EOFError:  # the orchestrator is gone
                break
            if message is None:
                break
            method, kwargs = message
            try:
                result = await getattr(service, method)(**kwargs)
                reply: tuple[str, Any] = ("ok", result)
            except Exception as exc:
                reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            await loop.run_in_executor(pipe, conn.send, reply)
        close = getattr(service, "close", None)
        if close is not None:
            await close()
    finally:
        pipe.shutdown(wait=False)


class ChildError(RuntimeError):
    """Raised when a child's method failed (the message carries its traceback)."""


@dataclass
class Child:
    """A benchmark child process serving one service object; ``await child.call(...)``."""

    name: str
    process: Any
    conn: Any
    lock: asyncio.Lock

    @classmethod
    def start(cls, name: str, module: str, service: str, **kwargs: Any) -> Child:
        """Spawn a fresh interpreter (no state inherited from the orchestrator)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=_child_entry, args=(child, module, service, kwargs), name=name, daemon=True
        )
        process.start()
        child.close()
        return cls(name, process, parent, asyncio.Lock())

    @property
    def pid(self) -> int:
        """The child's process id."""
        return int(self.process.pid)

    async def call(self, method: str, **kwargs: Any) -> Any:
        """Call ``method(**kwargs)`` in the child and return its result."""
        async with self.lock:
            await asyncio.to_thread(self.conn.send, (method, kwargs))
            status, value = await asyncio.to_thread(self.conn.recv)
        if status != "ok":
            raise ChildError(f"{self.name}.{method} failed: {value}")
        return value

    async def stop(self, timeout_s: float = 60.0) -> None:
        """Ask the child to close its service and exit; kill it if it does not."""
        with contextlib.suppress(OSError, EOFError, BrokenPipeError):
            async with self.lock:
                await asyncio.to_thread(self.conn.send, None)
        await asyncio.to_thread(self.process.join, timeout_s)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 10)
