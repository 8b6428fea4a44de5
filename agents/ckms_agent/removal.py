"""Taking a key off this host: its files, its record and its material, acked ``removed``.

Also the two rules every change of key files keeps: one key's files change under that key's
lock (:class:`KeyLocks`), and a change runs as a critical section (:func:`critical`), so a stop
lands after the state DB and the acks match the files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from ckms.protocol import AckStatus
from ckms_agent.acks import AckWriter
from ckms_agent.installer import Installer
from ckms_agent.materials import Materials
from ckms_agent.state import AgentState, KeyRecord

__all__ = ["KeyLocks", "Remover", "critical"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def critical(work: Awaitable[T]) -> T:
    """Finish ``work`` even if this task is cancelled meanwhile, then honour the cancel.

    Files are replaced atomically either way; this keeps the state DB and the acks in step with
    the files when a stop lands between writing a key and recording it.
    """
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:  # again and again: still wait for the work
            cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved; the stop wins
        raise cancelled
    return task.result()


class KeyLocks:
    """One lock per key name: one key's files are never written concurrently."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, name: str) -> asyncio.Lock:
        """The lock held while one key's files change."""
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock


class Remover:
    """Removes every file of a key, forgets its record and material, and acks the versions."""

    def __init__(
        self,
        *,
        state: AgentState,
        installer: Installer,
        acks: AckWriter,
        materials: Materials,
        host_id: str,
    ) -> None:
        self._state = state
        self._installer = installer
        self._acks = acks
        self._materials = materials
        self._host = host_id

    async def remove_all(
        self,
        record: KeyRecord,
        started: float,
        event_id: str | None,
        reason: str,
        *,
        note: str | None = None,
    ) -> set[int]:
        """Remove every file of a key and forget it; the caller holds the key's lock.

        A removal that fails acks ``failed`` and keeps the record, so it is tried again.
        """
        outcome = await self._installer.remove(record.spec, record.paths)
        versions = sorted(record.versions)
        if outcome.status is AckStatus.FAILED:
            log.error("key=%s host=%s removal failed: %s", record.name, self._host, outcome.error)
            return await self._acks.ack_all(
                record.name,
                versions,
                AckStatus.FAILED,
                started=started,
                event_id=event_id,
                error=outcome.error,
            )
        await self._state.forget_key(record.name)
        self._materials.forget(record.name)
        log.info(
            "removed key=%s versions=%s host=%s (%s)",
            record.name,
            versions,
            self._host,
            reason,
        )
        return await self._acks.ack_all(
            record.name,
            versions,
            AckStatus.REMOVED,
            started=started,
            hooks=outcome.hooks,
            event_id=event_id,
            error=note,
        )
