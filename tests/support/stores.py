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
from tests.support.audit import tamper
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

    def settings(self) -> dict[str, Any]:
        """The controller settings that put its store here."""
        if self.database is None:
            return {"store": self.location}
        return {"store": self.location, "store_password_file": self.database.password_file}

    async def open(self, **kwargs: Any) -> Store:
        """Open (migrating) the store, as the controller would."""
        return await Store.open(self.location, password=self.password, **kwargs)

    async def tamper(self, *statements: str, params: Sequence[Any] = ()) -> None:
        """Run ``statements`` as the owner of the database would, append-only triggers out of
        the way; ``params`` go to every statement that has ``?`` placeholders."""
        if self.database is None:
            tamper(Path(self.location), *statements, params=tuple(params))
            return
        conn = await connect(self.database.url, self.database.password_file)
        try:
            async with conn.transaction():
                await conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
                for statement in statements:
                    args = params if "?" in statement else ()
                    await conn.execute(numbered_placeholders(statement), *args)
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


async def refuse_inserts(
    store: Store, table: str, message: str, *, when: str | None = None
) -> None:
    """Make later inserts into ``table`` fail with ``message`` (a full disk, a broken table);
    ``when``: only rows for which this SQL condition on ``NEW`` holds (valid in both engines)."""
    name = f"refuse_{table}"
    async with store.write() as tx:
        if store.dialect.name == "sqlite":
            condition = "" if when is None else f"WHEN {when} "
            await tx.execute(
                f"CREATE TRIGGER {name} BEFORE INSERT ON {table} {condition}"
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
            return
        body = f"RAISE EXCEPTION '{message}';"
        if when is not None:
            body = f"IF {when} THEN {body} END IF; RETURN NEW;"
        quoted = body.replace("'", "''")
        await tx.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
            f"'BEGIN {quoted} END'"
        )
        await tx.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {name}()"
        )


async def refuse_audit_inserts(store: Store, message: str = "audit disk full") -> None:
    """Make every later insert into the audit log fail."""
    await refuse_inserts(store, "audit", message)
