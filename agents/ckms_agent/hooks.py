"""Reload and health-check hooks: argv run with a timeout that holds, output kept on the host.

Commands never go through a shell. A hook runs in its own session with a marker in its
environment, stdout and stderr on a pipe the agent reads into a bounded buffer. On timeout the
whole tree is killed: the session, every process still carrying the marker (a ``setsid`` or
double-forked daemon keeps it), and their descendants, until none is left; the agent then
closes its end of the pipe, so a survivor holding the pipe cannot hold the agent either. After
a normal exit, the pipe is read for a moment more and closed. (A process that leaves the
session, clears its environment and loses its parent is beyond this reach; under systemd the
unit's cgroup still ends it when the agent stops. A hook is the host admin's own command, so
this bounds accidents such as a daemonizing reload, not a hostile hook.)

What a hook prints stays on this host: it goes to the agent's local log (truncated), never into
the ack, Kafka or the controller; the ack carries the hook's name, exit status and duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ckms.protocol import HookResult

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 4096
"""The tail of a hook's output kept for the local log."""
MARKER_ENV = "CKMS_HOOK_RUN"
_DRAIN_AFTER_EXIT_S = 0.2
_KILL_ROUNDS = 20


@dataclass(frozen=True)
class Hook:
    """One command to run: which hook (name from the host config; None for legacy argv)."""

    kind: Literal["reload", "health"]
    name: str | None
    argv: tuple[str, ...]
    timeout_s: float
    user: str | None = None


async def run_hook(hook: Hook, *, env: Mapping[str, str] | None = None) -> HookResult:
    """Run one hook and report its exit code, whether it timed out, and how long it took."""
    started = time.monotonic()
    marker = secrets.token_hex(8)
    label = f"{hook.kind} hook {hook.name or hook.argv[0]!r}"
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    buffer = _Tail(MAX_OUTPUT_BYTES)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *hook.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,
                env={**os.environ, **(env or {}), MARKER_ENV: marker},
                **_identity(hook.user),
            )
        except (OSError, KeyError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else f"unknown user {hook.user!r}"
            log.warning("%s could not start: %s", label, why)
            return _result(hook, None, False, started)
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        eof = asyncio.Event()
        loop.add_reader(read_fd, buffer.read_from, read_fd, eof)
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), hook.timeout_s)
        except TimeoutError:
            timed_out = True
            await kill_tree(proc.pid, marker)
            await proc.wait()
        except asyncio.CancelledError:
            await kill_tree(proc.pid, marker)
            raise
        finally:
            if not timed_out:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(eof.wait(), _DRAIN_AFTER_EXIT_S)
            loop.remove_reader(read_fd)
    finally:
        os.close(read_fd)
    result = _result(hook, None if timed_out else proc.returncode, timed_out, started)
    output = buffer.text()
    level = logging.INFO if result.exit_code == 0 else logging.WARNING
    log.log(
        level,
        "%s exit=%s timed_out=%s in %d ms%s",
        label,
        result.exit_code,
        timed_out,
        result.duration_ms,
        f"; output (local only, last {MAX_OUTPUT_BYTES} bytes): {output}" if output else "",
    )
    return result


def hook_ok(result: HookResult) -> bool:
    """True when the hook ran to completion with exit code 0."""
    return not result.timed_out and result.exit_code == 0


def _result(hook: Hook, exit_code: int | None, timed_out: bool, started: float) -> HookResult:
    return HookResult(
        command=hook.kind,
        name=hook.name,
        exit_code=exit_code,
        timed_out=timed_out,
        duration_ms=int(1000 * (time.monotonic() - started)),
    )


def _identity(user: str | None) -> dict[str, Any]:
    """Popen arguments that run as ``user`` (its uid, primary group, no supplementary groups)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class _Tail:
    """The last ``limit`` bytes read from a pipe (the rest is dropped as it comes)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()

    def read_from(self, fd: int, eof: asyncio.Event) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            eof.set()
            asyncio.get_running_loop().remove_reader(fd)
            return
        self._data += chunk
        del self._data[: -self._limit]

    def text(self) -> str:
        return self._data.decode("utf-8", "replace").strip()


async def kill_tree(pid: int, marker: str) -> int:
    """SIGKILL the hook ``pid``, its session, marked processes and descendants; return count.

    Repeated until a scan finds none, so a process forked during the kill goes too.
    """
    killed: set[int] = set()
    for _ in range(_KILL_ROUNDS):
        victims = _tree(pid, marker) - killed
        alive = [p for p in victims if _alive(p)]
        if not alive:
            break
        for victim in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        await asyncio.sleep(0.02)
        killed = {p for p in killed if _alive(p)}  # a reused pid is looked at again
    return len(killed)


def _alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as src:
            state = src.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def _tree(root: int, marker: str) -> set[int]:
    """Processes of the hook: its session, those carrying the marker, and their descendants."""
    me = os.getpid()
    parents: dict[int, int] = {}
    chosen: set[int] = {root}
    needle = f"{MARKER_ENV}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as src:
                fields = src.read().rpartition(b")")[2].split()
            ppid, session = int(fields[1]), int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        parents[pid] = ppid
        if session == root:
            chosen.add(pid)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as src:
                if needle in src.read().split(b"\0"):
                    chosen.add(pid)
        except OSError:
            continue
    grown = True
    while grown:
        grown = False
        for pid, ppid in parents.items():
            if ppid in chosen and pid not in chosen:
                chosen.add(pid)
                grown = True
    chosen.discard(me)
    return chosen
