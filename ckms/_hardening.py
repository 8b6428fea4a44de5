"""Keeping an unsealed process's memory to itself: no core dump, no reading it from outside.

A controller process (and each SSH worker) holds the opened secrets in memory once unsealed.
A crash would write them to a core file, and any process of the same user could read them from
``/proc/<pid>/mem`` or attach a debugger. :func:`protect_memory` sets the core size limit to 0
and, on Linux, clears the process's *dumpable* flag, which does both that and deny other
processes of the same user ``ptrace`` and the ``/proc/<pid>`` files that need it (``mem``,
``environ``, ``maps``); root with ``CAP_SYS_PTRACE`` still can. Called first thing by the
processes that serve (``ckms controller serve``, the SSH workers), never by a library user's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys

try:
    import resource
except ImportError:  # pragma: no cover - Windows: the operator CLI imports this module too
    resource = None  # type: ignore[assignment]

__all__ = ["protect_memory"]

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4


def protect_memory() -> None:
    """No core dumps of this process, and (Linux) no ptrace or /proc/<pid>/mem by others."""
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            return
    log.warning("could not clear the dumpable flag: this process's memory is readable by its user")
