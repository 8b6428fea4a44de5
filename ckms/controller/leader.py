"""Leadership among replicas: who runs the work that must happen once.

Every replica runs :meth:`LeaderLease.run`. Each round (a third of the lease) it records its
heartbeat and takes or renews the lease (:func:`ckms.store.lease.acquire`). While it holds the
lease it runs the leader-only work (``lead``: outbox publisher, scheduler, audit anchor,
rollout driver) as one task bound to the lease's fence, so each of its writes
is refused once another replica took over (:mod:`ckms.store.lease`). It stops that work and
goes on serving SSH as a follower when:

- a round finds another holder (the lease expired while this process was paused, and was
  taken over), or a fenced write found the lease gone (the fence's ``lost`` wakes it at once);
- no round succeeded for a whole lease (the store unreachable): the others may take over now;
- its work failed because the store was unreachable (a database restart): the next round
  that reaches the store leads again (or finds another replica leading).

A sealed replica never takes the lease (leader work needs the KEK); a replica that is sealed
while it leads gives it up. A clean stop releases the lease, so a follower takes it at its
next round rather than after the expiry. Between replicas, expiry is compared on the stored
time written by the holder's clock: clock skew delays or hastens a takeover, it never makes
two leaders' writes both count, because of the fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ckms._aio import stop_if_cancelled
from ckms.errors import CKMSError, NotLeaderError, StoreError
from ckms.store import Clock, Store, utc_now
from ckms.store import lease as leases

log = logging.getLogger(__name__)

__all__ = ["LeaderLease", "LeaderStatus"]


@dataclass(frozen=True)
class LeaderStatus:
    """This replica's view of leadership, for ``ckms status`` and metrics."""

    name: str
    leading: bool
    epoch: int | None
    leader: str | None
    expires_at: datetime | None


class LeaderLease:
    """``await lease.run(lead)``: run ``lead()`` only while this replica holds the lease."""

    def __init__(
        self,
        store: Store,
        *,
        name: str,
        address: Callable[[], str],
        version: str,
        sealed: Callable[[], bool],
        ttl: timedelta = timedelta(seconds=10),
        clock: Clock = utc_now,
        on_step_down: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self.name = name
        self.incarnation = uuid.uuid4().hex
        """This process's holder id: never the same across restarts, so a restarted replica
        never mistakes the lease of its previous life for its own."""
        self._address = address
        self._version = version
        self._sealed = sealed
        self.ttl = ttl
        self._clock = clock
        self._on_step_down = on_step_down
        self._started_at = clock()
        self.fence: leases.Fence | None = None
        self.leads = asyncio.Event()
        """Set while this replica leads (for a task that waits to be able to sign)."""
        self._task: asyncio.Task[None] | None = None
        self._valid_until = 0.0
        self._wake = asyncio.Event()
        self.last: leases.LeaseState | None = None
        self.terms = 0
        """How many times this replica became leader."""

    @property
    def leading(self) -> bool:
        """True while the leader-only work runs here."""
        return self.fence is not None

    def status(self) -> LeaderStatus:
        """Leadership as this replica last saw it."""
        last = self.last
        return LeaderStatus(
            name=self.name,
            leading=self.leading,
            epoch=None if last is None else last.epoch,
            leader=None if last is None else last.holder_name,
            expires_at=None if last is None else last.expires_at,
        )

    def led_elsewhere(self) -> bool:
        """True if the last round saw another replica's lease, not expired by its stored time."""
        last = self.last
        return last is not None and not last.mine and last.expires_at > self._clock()

    def wake(self) -> None:
        """Run a round now (after an unseal or a seal)."""
        self._wake.set()

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Take part in leadership until cancelled; ``lead`` is the leader-only work."""
        renew_s = self.ttl.total_seconds() / 3
        try:
            while True:
                stop_if_cancelled()
                self._wake.clear()
                started = time.monotonic()
                state = await self._round()
                if state is not None and state.mine:
                    self._valid_until = started + self.ttl.total_seconds()
                    if self.fence is None or self.fence.epoch != state.epoch:
                        await self._step_down("a new term began")
                        self._start(state, lead)
                elif self.fence is not None:
                    if state is not None and state.holder == self.incarnation:
                        await self._step_down("this replica was sealed (lease given up)")
                    elif state is not None:
                        await self._step_down(
                            f"replica {state.holder_name} holds the lease (epoch {state.epoch})"
                        )
                    elif time.monotonic() >= self._valid_until:
                        await self._step_down("the lease could not be renewed in time")
                await self._check_task()
                fence = self.fence
                waits = [self._wake.wait()]
                if fence is not None:
                    waits.append(fence.lost.wait())
                    assert self._task is not None
                    waits.append(asyncio.shield(self._task))
                await _first(waits, renew_s)
                if fence is not None and fence.lost.is_set():
                    await self._step_down(f"a write found epoch {fence.epoch} taken over")
        finally:
            await self._stop_and_release()

    async def _round(self) -> leases.LeaseState | None:
        beat = leases.ReplicaBeat(
            name=self.name,
            incarnation=self.incarnation,
            address=self._address(),
            version=self._version,
            sealed=self._sealed(),
            started_at=self._started_at,
        )
        try:
            state = await leases.acquire(
                self._store, beat, now=self._clock(), ttl=self.ttl, want=not beat.sealed
            )
        except CKMSError as exc:
            log.warning("leader lease round failed: %s", exc)
            return None
        if state is None:
            return None
        if state.mine and self.fence is None:
            log.info("replica %s takes the leader lease (epoch %d)", self.name, state.epoch)
        self.last = state
        return state

    def _start(self, state: leases.LeaseState, lead: Callable[[], Awaitable[None]]) -> None:
        fence = leases.Fence(self.incarnation, state.epoch)
        context = leases.fenced_context(fence)  # every write of the work is fenced
        self.fence = fence
        self.leads.set()
        self.terms += 1
        self._task = asyncio.create_task(lead(), name="leader-work", context=context)
        log.info("replica %s leads (epoch %d): leader-only work started", self.name, fence.epoch)

    async def _check_task(self) -> None:
        """A leader task that ended by itself: a lost lease, or a store that could not be
        reached (a database restart), steps down; any other error is the service's failure
        (raised, as a TaskGroup would)."""
        task = self._task
        if task is None or not task.done():
            return
        self._task = None
        if task.cancelled():
            return
        exc = original = task.exception()
        if isinstance(exc, BaseExceptionGroup):  # the work's TaskGroup: one task refused
            exc = exc.subgroup(lambda e: not (_steps_down(e) or isinstance(e, BaseExceptionGroup)))
        if exc is None or _steps_down(exc):
            why = "" if original is None else f": {_first_leaf(original)}"
            await self._step_down(f"the leader-only work stopped{why}")
            return
        self.fence = None
        self.leads.clear()
        raise exc

    async def _step_down(self, why: str) -> None:
        fence, task = self.fence, self._task
        self.fence, self._task = None, None
        self.leads.clear()
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, CKMSError):
                pass
            except BaseExceptionGroup as group:
                # The work's TaskGroup: a task that found the lease gone while being stopped
                # (the fence is cleared first) is part of the step-down; anything else is not.
                rest = group.subgroup(
                    lambda e: not (_stopping(e) or isinstance(e, BaseExceptionGroup))
                )
                if rest is not None:
                    raise
        if fence is not None:
            log.warning(
                "replica %s no longer leads (epoch %d): %s; leader-only work stopped, "
                "serving as a follower",
                self.name,
                fence.epoch,
                why,
            )
            if self._on_step_down is not None:
                await self._on_step_down()

    async def _stop_and_release(self) -> None:
        fence = self.fence
        await self._step_down("the replica stops")
        if fence is not None:
            with contextlib.suppress(CKMSError):
                await leases.release(self._store, fence.holder, fence.epoch, now=self._clock())


def _stopping(exc: BaseException) -> bool:
    """Whether ``exc``, raised by leader work being stopped, belongs to the stop (a cancel, or
    any ckms error, as for the work's own task; a group only if all of it does)."""
    return isinstance(exc, asyncio.CancelledError | CKMSError)


def _steps_down(exc: BaseException) -> bool:
    """Whether leader work that failed with ``exc`` only stops this term: the fence refused it,
    or the store was unreachable (a retriable StoreError; the next round leads again once it
    answers). An audit failure is not retriable and stays the service's failure."""
    if isinstance(exc, NotLeaderError):
        return True
    return isinstance(exc, StoreError) and exc.retriable


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _first(waits: list[Awaitable[object]], timeout_s: float) -> None:
    """Wait until the first of ``waits`` ends, or ``timeout_s``."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
