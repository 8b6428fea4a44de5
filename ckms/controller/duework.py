"""What the rotation scheduler has to do now: a pure function of the keys and the time.

- **rotate**: a key whose primary's cryptoperiod is ending and that has no newer version waiting
  in PreActive. The rotation is due ``activation_delay`` before the cryptoperiod ends, so the new
  version (pre-distributed while PreActive) becomes primary exactly when the old one's
  cryptoperiod is over; with no delay that is the end of the cryptoperiod itself.
- **activate**: a PreActive version whose activation time has passed.
- **deactivate**: an Active or Suspended version that is no longer primary and whose grace (from
  the moment it was superseded) has ended.

The scheduler (:mod:`ckms.controller.scheduler`) applies the items through
:class:`~ckms.controller.lifecycle.Lifecycle` and sleeps until :attr:`DueWork.next_at`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from ckms.controller import _repo
from ckms.controller.models import Key, KeyState
from ckms.controller.transitions import Op, can
from ckms.store import Store, require_utc

__all__ = ["DueItem", "DueWork", "due_work", "plan_due_work"]


class DueItem(BaseModel):
    """One thing to do: ``action`` on ``key`` ``version`` since ``due_at``."""

    model_config = ConfigDict(frozen=True)

    key: str
    version: int
    due_at: datetime


class DueWork(BaseModel):
    """The scheduler's work list at one instant, each list oldest-due first."""

    model_config = ConfigDict(frozen=True)

    now: datetime
    rotate: tuple[DueItem, ...] = ()
    activate: tuple[DueItem, ...] = ()
    deactivate: tuple[DueItem, ...] = ()
    next_at: datetime | None = None
    """The earliest time after ``now`` at which more work becomes due (None: nothing pending)."""

    @property
    def empty(self) -> bool:
        """True when nothing is due now."""
        return not (self.rotate or self.activate or self.deactivate)


def plan_due_work(keys: Iterable[Key], now: datetime) -> DueWork:
    """Return what is due at ``now`` for ``keys`` (pure: no I/O, no clock)."""
    now = require_utc(now)
    rotate: list[DueItem] = []
    activate: list[DueItem] = []
    deactivate: list[DueItem] = []
    future: list[datetime] = []

    def consider(bucket: list[DueItem], key: Key, version: int, due_at: datetime) -> None:
        if due_at <= now:
            bucket.append(DueItem(key=key.name, version=version, due_at=due_at))
        else:
            future.append(due_at)

    for key in keys:
        policy = key.policy
        primary = key.primary
        for v in key.versions:
            if can(v.state, Op.ACTIVATE) and v.activation_at is not None:
                consider(activate, key, v.version, v.activation_at)
            if (
                can(v.state, Op.DEACTIVATE)
                and v.version != key.primary_version
                and v.superseded_at is not None
            ):
                consider(deactivate, key, v.version, v.superseded_at + policy.grace)
        if primary is not None and primary.state is KeyState.ACTIVE:
            waiting = any(
                v.state is KeyState.PRE_ACTIVE and v.version > primary.version for v in key.versions
            )
            started = primary.activated_at or primary.created_at
            if not waiting:
                due = max(started, started + policy.cryptoperiod - policy.activation_delay)
                consider(rotate, key, primary.version, due)

    def ordered(items: list[DueItem]) -> tuple[DueItem, ...]:
        return tuple(sorted(items, key=lambda i: (i.due_at, i.key, i.version)))

    return DueWork(
        now=now,
        rotate=ordered(rotate),
        activate=ordered(activate),
        deactivate=ordered(deactivate),
        next_at=min(future, default=None),
    )


async def due_work(store: Store, now: datetime) -> DueWork:
    """Load every key from ``store`` (one snapshot) and return what is due at ``now``."""
    async with store.read() as r:
        keys = await _repo.list_keys(r)
    return plan_due_work(keys, now)
