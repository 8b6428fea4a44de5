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

__all__ = ["stop_if_cancelled", "wait_event"]


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
