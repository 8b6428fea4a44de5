"""The fence of leader-only work (see :mod:`ckms.store.lease`), apart so ``Store.write`` can
call :func:`check_fence` without importing the lease module."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckms.errors import NotLeaderError

if TYPE_CHECKING:
    from ckms.store._store import Transaction

LEASE = "leader"
"""The name of the one lease row."""


@dataclass(frozen=True)
class Fence:
    """The lease this task's writes are bound to; ``lost`` is set once a write found it gone."""

    holder: str
    epoch: int
    lost: asyncio.Event = field(default_factory=asyncio.Event, compare=False, repr=False)


_FENCE: ContextVar[Fence | None] = ContextVar("ckms_leader_fence", default=None)


def current_fence() -> Fence | None:
    """The fence of the running task, if it does leader-only work."""
    return _FENCE.get()


def fenced_context(fence: Fence) -> contextvars.Context:
    """A copy of the current context with ``fence`` bound, for a task of leader-only work."""
    context = contextvars.copy_context()
    context.run(_FENCE.set, fence)
    return context


@contextlib.contextmanager
def fenced(fence: Fence) -> Iterator[None]:
    """Bind the writes of the block (and of tasks it creates) to ``fence``."""
    token = _FENCE.set(fence)
    try:
        yield
    finally:
        _FENCE.reset(token)


async def check_fence(tx: Transaction) -> None:
    """Refuse this write transaction if its task is fenced and the lease moved on."""
    fence = _FENCE.get()
    if fence is None:
        return
    changed = await tx.execute(
        "UPDATE leader_lease SET holder = holder WHERE name = ? AND holder = ? AND epoch = ?",
        (LEASE, fence.holder, fence.epoch),
    )
    if changed != 1:
        fence.lost.set()
        raise NotLeaderError(
            f"this replica no longer holds the leader lease (epoch {fence.epoch}): another "
            "replica took it over; leader-only work is refused"
        )
