"""Process helpers shared by the local servers for tests and demos (Kafka, PostgreSQL).

Both launchers start a real server as a child process on a free loopback port and must never
leave it running when the Python process that owns it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket

__all__ = ["die_with_parent", "free_port", "pid_alive"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Ask Linux to kill this child if the thread that started it dies (no orphan servers).

    Used as a ``preexec_fn``: it runs after the child switched to another user, so the change of
    user (which clears the parent-death signal) cannot undo it. The child must be started from
    a long-lived thread (the event loop's), not a worker thread that ends first.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user counts; a zombie does not:
    it has exited and released its memory, and in a container nobody may ever reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to ask: kill() said it exists
    return state != b"Z"
