"""One store location per backend, so store tests run against SQLite and PostgreSQL alike.

``store_target`` (tests/conftest.py) is parametrized over :data:`BACKENDS`; a test opens the
store with ``await target.open()`` (as often as it likes: the same database each time) and
attacks it as the owner of the database would with :meth:`StoreTarget.tamper` (raw SQL with
the append-only triggers out of the way: plain sqlite3 on the file, or a superuser
connection to PostgreSQL). ``--store-backend sqlite`` (or ``postgresql``) runs one of them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckms.store import Store
from ckms.store._dialect import numbered_placeholders
from tests.support.postgres import PostgresDatabase, connect, read_password

__all__ = ["BACKENDS", "StoreTarget"]

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
"""The ``store_target`` parameters: PostgreSQL cases carry the ``postgres`` marker."""


@dataclass(frozen=True)
class StoreTarget:
    """Where a test's store lives: a SQLite file, or a PostgreSQL database of its own."""

    engine: str
    location: str
    database: PostgresDatabase | None = None

    @classmethod
    def sqlite(cls, path: Path) -> StoreTarget:
        return cls("sqlite", str(path))

    @classmethod
    def postgresql(cls, database: PostgresDatabase) -> StoreTarget:
        return cls("postgresql", database.url, database)

    @property
    def password(self) -> str | None:
        return None if self.database is None else read_password(self.database.password_file)

    async def open(self, **kwargs: Any) -> Store:
        """Open (migrating) the store, as the controller would."""
        return await Store.open(self.location, password=self.password, **kwargs)

    async def tamper(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run ``sql`` (``?`` placeholders) as the database's owner, append-only triggers off."""
        if self.database is None:
            with sqlite3.connect(self.location) as raw:
                raw.execute("DROP TRIGGER IF EXISTS audit_no_update")
                raw.execute("DROP TRIGGER IF EXISTS audit_no_delete")
                raw.execute(sql, tuple(params))
            raw.close()
            return
        conn = await connect(self.database.url, self.database.password_file)
        try:
            async with conn.transaction():
                await conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
                await conn.execute(numbered_placeholders(sql), *params)
                await conn.execute("ALTER TABLE audit ENABLE TRIGGER USER")
        finally:
            await conn.close()

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read rows with a plain connection of the database's own (not through the store)."""
        if self.database is None:
            with sqlite3.connect(self.location) as raw:
                rows = [tuple(r) for r in raw.execute(sql, tuple(params))]
            raw.close()
            return rows
        conn = await connect(self.database.url, self.database.password_file)
        try:
            return [tuple(r) for r in await conn.fetch(numbered_placeholders(sql), *params)]
        finally:
            await conn.close()
