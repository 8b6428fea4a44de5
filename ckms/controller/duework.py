"""What the rotation scheduler has to do now: a pure function of the keys and the time.

- **rotate**: a key whose primary's cryptoperiod is ending and that has no newer version waiting
  in PreActive. The rotation is due ``activation_delay`` before the cryptoperiod ends, so the new
  version (pre-distributed while PreActive) becomes primary exactly when the old one's
  cryptoperiod is over; with no delay that is the end of the cryptoperiod itself.
- **activate**: a PreActive version whose activation time has passed (a version waiting for
  its rollout has none: the rollout activates it, :mod:`ckms.controller.rollouts`).
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
from ckms.controller.keyview import AnyKey
from ckms.controller.models import Key, KeyState
from ckms.controller.transitions import Op, can
from ckms.store import Store, require_utc

__all__ = [
    "DueItem",
    "DueWork",
    "due_keys",
    "due_work",
    "fill_next_due",
    "next_due",
    "plan_due_work",
    "rotation_due",
]


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


def _candidates(key: AnyKey) -> list[tuple[str, int, datetime]]:
    """Every (bucket, version, due time) of ``key``, due or not: the one rule of what is due."""
    out: list[tuple[str, int, datetime]] = []
    policy = key.policy
    primary = key.primary
    for v in key.versions:
        if can(v.state, Op.ACTIVATE) and v.activation_at is not None:
            out.append(("activate", v.version, v.activation_at))
        if (
            can(v.state, Op.DEACTIVATE)
            and v.version != key.primary_version
            and v.superseded_at is not None
        ):
            out.append(("deactivate", v.version, v.superseded_at + policy.grace))
    if primary is not None and primary.state is KeyState.ACTIVE:
        waiting = any(
            v.state is KeyState.PRE_ACTIVE and v.version > primary.version for v in key.versions
        )
        started = primary.activated_at or primary.created_at
        if not waiting:
            due = max(started, started + policy.cryptoperiod - policy.activation_delay)
            out.append(("rotate", primary.version, due))
    return out


def next_due(key: AnyKey) -> datetime | None:
    """The earliest time anything of ``key`` is due (past or future), None when nothing is.

    Stored with the key (``keys.next_due_at``, indexed) in the transaction of every key change,
    so a scheduler pass reads only the keys due by now instead of every key.
    """
    return min((due for _, _, due in _candidates(key)), default=None)


def rotation_due(key: AnyKey) -> datetime | None:
    """When ``key``'s primary is due to rotate, due or not (None: no Active primary, or a newer
    version waits in PreActive); what ``key list`` shows for each key."""
    return min((due for bucket, _, due in _candidates(key) if bucket == "rotate"), default=None)


def plan_due_work(keys: Iterable[AnyKey], now: datetime) -> DueWork:
    """Return what is due at ``now`` for ``keys`` (pure: no I/O, no clock)."""
    now = require_utc(now)
    buckets: dict[str, list[DueItem]] = {"rotate": [], "activate": [], "deactivate": []}
    future: list[datetime] = []
    for key in keys:
        for bucket, version, due_at in _candidates(key):
            if due_at <= now:
                buckets[bucket].append(DueItem(key=key.name, version=version, due_at=due_at))
            else:
                future.append(due_at)

    def ordered(items: list[DueItem]) -> tuple[DueItem, ...]:
        return tuple(sorted(items, key=lambda i: (i.due_at, i.key, i.version)))

    return DueWork(
        now=now,
        rotate=ordered(buckets["rotate"]),
        activate=ordered(buckets["activate"]),
        deactivate=ordered(buckets["deactivate"]),
        next_at=min(future, default=None),
    )


FILL_BATCH = 1000
"""Keys whose next due time is computed per transaction when filling in (see fill_next_due)."""


async def fill_next_due(store: Store, *, batch: int = FILL_BATCH) -> int:
    """Compute the next due time of every key that has none yet; return how many were filled.

    Keys stored before the indexed column existed have NULL there; they are read by every pass
    (so nothing is missed) until filled, in batches, each its own short transaction. Once all
    are filled this is one indexed lookup that finds nothing.
    """
    filled = 0
    while await store.fetchval("SELECT 1 FROM keys WHERE next_due_at IS NULL LIMIT 1"):
        async with store.write() as tx:
            keys = await _repo.keys_without_next_due(tx, batch)
            for key in keys:
                await _repo.set_next_due(tx, key.id, next_due(key))
        filled += len(keys)
    return filled


async def due_keys(store: Store, now: datetime) -> tuple[list[Key], datetime | None]:
    """The keys with something due by ``now`` (one snapshot, through the next-due index), and
    the earliest next-due time of the others (None: nothing pending)."""
    async with store.read() as r:
        keys = await _repo.keys_due_by(r, now)
        later = await _repo.next_due_after(r, now)
    return keys, later


async def due_work(store: Store, now: datetime) -> DueWork:
    """Return what is due at ``now``: work proportional to the keys due, never a full scan."""
    keys, later = await due_keys(store, now)
    work = plan_due_work(keys, now)
    soonest = min((t for t in (work.next_at, later) if t is not None), default=None)
    return work.model_copy(update={"next_at": soonest})
