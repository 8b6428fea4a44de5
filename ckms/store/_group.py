"""Group commit: many small, independent writes from concurrent requests in one transaction.

Every agent ``sync`` writes a little (the host was seen, and which versions it received, in the
audit log). One transaction each means a BEGIN, a COMMIT and an fsync per request, all queued on
the one writer. :class:`GroupWriter` runs whatever writes arrived while the previous commit
was in flight in a single transaction, and answers each caller only after that commit, so a
caller still never replies before its audit record is durable (fail closed).

A write may name a ``finish`` step: it runs once per transaction, after every write of the group,
however many of them named it (the ack service collects what the group's acks applied and writes
one ``fleet.acked`` event per key for all of them).

A failing write must not fail its neighbours: when a group's transaction fails, it is rolled
back whole and each write is run again alone, so only the bad one raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ckms.errors import StoreError
from ckms.store._store import Store, Transaction

log = logging.getLogger(__name__)

Work = Callable[[Transaction], Awaitable[None]]
_Entry = tuple[Work, "asyncio.Future[None]", Work | None]

MAX_GROUP = 256
"""Most writes in one transaction (bounds how long the writer lock is held)."""


class GroupWriter:
    """``await group.write(work)``: run ``work(tx)`` in a transaction shared with its peers."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None
        self.groups = 0
        """Transactions committed (for tests and metrics)."""

    async def write(self, work: Work, *, finish: Work | None = None) -> None:
        """Run ``work`` in the next group's transaction; return once it is committed.

        ``work`` must only write through the transaction it is given (it may run twice: once
        in a group that fails, then alone). Its exception is raised here, others' are not.
        ``finish`` runs after the group's writes, once per transaction for all that named it.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((work, future, finish))
        if self._flusher is None or self._flusher.done():
            # Its own task: a cancelled caller must not strand the writes queued behind it.
            self._flusher = asyncio.create_task(self._flush(), name="ckms-group-commit")
        await future

    async def _flush(self) -> None:
        try:
            await self._flush_all()
        finally:
            # However the flusher ends (cancelled at shutdown included), nobody waits forever.
            stranded, self._pending = self._pending, []
            for _, future, _ in stranded:
                _settle(future, StoreError("the store stopped before this write was committed"))

    async def _flush_all(self) -> None:
        while self._pending:
            group = self._pending[:MAX_GROUP]
            del self._pending[:MAX_GROUP]
            try:
                await self._run_group(group)
            except BaseException as stop:  # cancelled (the store is closing)
                for _, future, _ in group:
                    _settle(future, stop)
                raise

    async def _run_group(self, group: list[_Entry]) -> None:
        try:
            await self._commit(group)
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0][1], exc)
                return
            log.warning("a group of %d writes failed (%s); running each alone", len(group), exc)
            for entry in group:
                future = entry[1]
                try:
                    await self._commit([entry])
                except Exception as alone:
                    _settle(future, alone)
                else:
                    _settle(future, None)
            return
        self.groups += 1
        for _, future, _ in group:
            _settle(future, None)

    async def _commit(self, group: list[_Entry]) -> None:
        async with self._store.write() as tx:
            for work, _, _ in group:
                await work(tx)
            for finish in dict.fromkeys(f for _, _, f in group if f is not None):
                await finish(tx)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():  # its caller was cancelled; the write itself went in (or not) regardless
        return
    if exc is None:
        future.set_result(None)
    elif isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
