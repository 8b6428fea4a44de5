"""Waiting in a loop without losing a cancel (Python 3.11).

In 3.11 ``asyncio.wait_for`` returns the inner result when a cancel lands in the same turn as
the inner await completes (an event set just as the service stops), and aiokafka's request
timeouts can lose a cancel the same way. The cancel is then gone, a ``while True`` loop goes
on, and the task group of a stopping controller or agent waits for it forever. So service
loops wait with :func:`wait_event` (``asyncio.timeout``, which counts cancels) and call
:func:`stop_if_cancelled` once per turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from ckms.errors import ConfigError

__all__ = ["EventLoop", "run", "stop_if_cancelled", "wait_event"]

T = TypeVar("T")

EventLoop = Literal["auto", "asyncio", "uvloop"]
"""Which event loop a long-running controller process runs on (its ``event_loop`` setting)."""


def run(main: Coroutine[Any, Any, T], *, loop: EventLoop = "auto") -> T:
    """``asyncio.run(main)``, on uvloop's event loop for ``uvloop``, or for ``auto`` when
    uvloop is installed (the ``fast`` extra: ``pip install 'ckms[fast]'``).

    Measured on the SSH request path (``bench/rpc.py --one-process``, same run): 10-15% less
    CPU per request one at a time, about 5% with 50 in flight. The agent does not use it (its
    idle profile shows no event-loop cost worth the memory of another library).
    """
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


def loop_factory(loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when ``loop`` asks for it (None: the standard loop)."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ConfigError(
                "event_loop = uvloop needs uvloop installed (pip install 'ckms[fast]')"
            ) from None
        return None
    return uvloop.new_event_loop


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes; True if it was set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if this task was asked to stop and something swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
