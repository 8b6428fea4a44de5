"""Reload and health-check commands: argv lists run with a timeout, output kept short.

Commands never go through a shell. On timeout the whole process group is killed, so a hook that
forks cannot outlive its bound. Output is cut to the last 4 KiB for the ack and the log; hooks
are expected never to print key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Literal

from ckms.protocol import HookResult

log = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 4096


async def run_hook(
    kind: Literal["reload", "health"],
    argv: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> HookResult:
    """Run one hook command and report its exit code, timeout and (bounded) output."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    except OSError as exc:
        log.warning("%s hook could not start: %s", kind, exc.strerror)
        return HookResult(command=kind, exit_code=None, output=f"cannot run: {exc.strerror}")
    timed_out = False
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = (output or b"").decode("utf-8", "replace")[-MAX_OUTPUT_CHARS:]
    result = HookResult(
        command=kind,
        exit_code=None if timed_out else proc.returncode,
        timed_out=timed_out,
        output=text,
    )
    log.info("%s hook exit=%s timed_out=%s", kind, result.exit_code, timed_out)
    return result


def hook_ok(result: HookResult) -> bool:
    """True when the hook ran to completion with exit code 0."""
    return not result.timed_out and result.exit_code == 0
