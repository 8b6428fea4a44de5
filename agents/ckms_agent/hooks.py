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

What a hook prints stays on this host, never in the ack, Kafka or the controller; the ack
carries the hook's name, exit status and duration. A hook may print what it reads (key files
included), so its output is logged only when the host's config sets ``log_output`` for it, and
then with the key's material scrubbed (:func:`scrub`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import pwd
import re
import secrets
import signal
import time
from collections.abc import Mapping, Sequence
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
    log_output: bool = False
    """The host's choice to keep the output's tail in the local log (scrubbed of the key)."""


async def run_hook(
    hook: Hook, *, env: Mapping[str, str] | None = None, material: Sequence[bytes] = ()
) -> HookResult:
    """Run one hook and report its exit code, whether it timed out, and how long it took.

    The output never leaves the host. It is logged locally only when the host's config asks
    (``log_output``), with every form of ``material`` (the key's material and files) scrubbed.
    """
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
    level = logging.INFO if result.exit_code == 0 else logging.WARNING
    log.log(
        level,
        "%s exit=%s timed_out=%s in %d ms%s",
        label,
        result.exit_code,
        timed_out,
        result.duration_ms,
        _describe_output(hook, buffer, material),
    )
    return result


def _describe_output(hook: Hook, buffer: _Tail, material: Sequence[bytes]) -> str:
    if not buffer.total:
        return ""
    if not hook.log_output:
        return f"; {buffer.total} bytes of output (not logged: this hook's log_output is off)"
    shown = scrub(bytes(buffer.data), material).decode("utf-8", "replace").strip()
    return f"; output (local only, last {MAX_OUTPUT_BYTES} bytes, key scrubbed): {shown}"


_TOKEN = re.compile(rb"[A-Za-z0-9+/=_-]{12,}")
_SPACED_HEX = re.compile(rb"(?:[0-9a-fA-F]{2}[ \t:]{1,2}){6,}[0-9a-fA-F]{2}")
_NOT_HEX = re.compile(rb"[^0-9a-f]")
REDACTED = b"[redacted]"
WINDOW = 8
"""Bytes of a key in a row that give a line away (in raw bytes or in any hex dump of it)."""


def scrub(output: bytes, material: Sequence[bytes]) -> bytes:
    """``output`` with what a hook is likely to print of any of ``material`` taken out.

    Whole raw, hex and base64 forms are replaced; so is every base64/hex-looking run of 12+
    characters found inside one of them (a wrapped line, a JSON field, a cut-off tail). A line
    that still holds :data:`WINDOW` bytes of a secret in a row -- raw, or as hex once every
    non-hex character is dropped, in byte order or as the little-endian words ``od -x`` and
    ``hexdump`` print, behind offsets and ASCII columns (``xxd``, ``hexdump -C``) -- is
    replaced whole. A command can always invent another encoding: this bounds accidents.
    """
    secrets_ = [s for s in material if len(s) >= WINDOW]
    if not secrets_:
        return output
    forms: list[bytes] = []
    raw_windows: set[bytes] = set()
    hex_windows: set[bytes] = set()
    for secret in secrets_:
        forms += [
            secret,
            secret.hex().encode(),
            base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"="),
            base64.b64encode(secret).rstrip(b"="),
        ]
        raw_windows.update(_windows(secret, WINDOW))
        for order in (secret, _swapped(secret, 2), _swapped(secret, 4)):
            hex_windows.update(_windows(order.hex().encode(), 2 * WINDOW, step=2))
    for form in sorted(forms, key=len, reverse=True):
        output = output.replace(form, REDACTED)
    hex_forms = [f for f in forms if f.isalnum() and not f.strip(b"0123456789abcdef")]

    def token(match: re.Match[bytes]) -> bytes:
        run = match.group(0).rstrip(b"=")
        found = any(run in form for form in forms) or any(run.lower() in h for h in hex_forms)
        return REDACTED if found else match.group(0)

    def spaced(match: re.Match[bytes]) -> bytes:
        run = re.sub(rb"[ \t:]", b"", match.group(0)).lower()
        return REDACTED if any(run in h for h in hex_forms) else match.group(0)

    output = _TOKEN.sub(token, _SPACED_HEX.sub(spaced, output))
    lines = output.split(b"\n")
    for i, line in enumerate(lines):
        squeezed = _NOT_HEX.sub(b"", line.lower())
        if not _windows(line, WINDOW).isdisjoint(raw_windows) or not _windows(
            squeezed, 2 * WINDOW
        ).isdisjoint(hex_windows):
            lines[i] = REDACTED
    return b"\n".join(lines)


def _windows(data: bytes, size: int, step: int = 1) -> set[bytes]:
    return {data[i : i + size] for i in range(0, len(data) - size + 1, step)}


def _swapped(data: bytes, width: int) -> bytes:
    """``data`` with each ``width``-byte group reversed (little-endian words; a short tail kept)."""
    whole = len(data) - len(data) % width
    groups = [data[i : i + width][::-1] for i in range(0, whole, width)]
    return b"".join(groups) + data[whole:]


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
        self.data = bytearray()
        self.total = 0

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
        self.total += len(chunk)
        self.data += chunk
        del self.data[: -self._limit]


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
