"""Test support for the audit log: a log of N records, a signed checkpoint, an attacker's edit."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ckms.crypto import sign
from ckms.store import Store
from ckms.store import audit as audit_log

T0 = datetime(2025, 1, 1, tzinfo=UTC)


async def build_log(store: Store, n: int, *, start: int = 0) -> None:
    """Append records ``start``..``start+n-1``, one transaction each."""
    for i in range(start, start + n):
        async with store.write() as tx:
            await audit_log.append(
                tx,
                now=T0 + timedelta(minutes=i),
                actor="alice",
                action="key.rotate",
                object=f"key:team/k{i}",
                details={"version": i},
            )


async def checkpoint(
    store: Store, pair: tuple[bytes, bytes], anchor: audit_log.Anchor | None = None
) -> audit_log.AuditCheckpoint:
    """Sign a checkpoint over the whole log with ``pair`` (private, public), after ``anchor``."""
    private, public = pair
    return await audit_log.checkpoint(
        store, sign=lambda data: sign(private, data), public_key=public, now=T0, anchor=anchor
    )


def tamper(db_path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Edit the database file like an attacker would: with plain sqlite3, triggers dropped.

    ``params`` go to every statement that has placeholders."""
    # A long busy timeout: the running controller may hold the write lock for a while on a
    # loaded machine; the attacker simply waits for it.
    with sqlite3.connect(db_path, timeout=60) as raw:
        raw.execute("DROP TRIGGER IF EXISTS audit_no_update")
        raw.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for statement in statements:
            raw.execute(statement, params if "?" in statement else ())
