"""Copying a whole store into a new one: how a SQLite store moves to PostgreSQL (or back).

:func:`copy_rows` reads the source in one snapshot and writes every row of every table into
the target in one write transaction (parents before children), so the target holds all of it
or nothing. The target must be empty: a copy into a store that holds anything would mix two
histories (two audit chains, two outbox sequences). The rows are copied as stored, row MACs
and hashes included, so the audit chain and every row MAC verify on the target under the same
root KEK; the outbox's sequence continues where the source's was, never lower.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckms.errors import StoreError
from ckms.store import outbox
from ckms.store._store import Reader, Store, Transaction

COPY_SLICE = 2000
"""Rows read and written per statement."""

_NOT_COPIED = {"schema_version", "counters", "sqlite_sequence"}
"""Tables the target keeps its own of: which migrations it has, and its own counters."""


@dataclass(frozen=True)
class CopyReport:
    """What a copy moved: rows per table, and the schema version both stores are at."""

    rows: dict[str, int]
    schema_version: int
    last_event_seq: int


async def copy_rows(source: Store, target: Store) -> CopyReport:
    """Copy every row of ``source`` into the empty ``target`` in one transaction."""
    version = await source.schema_version()
    if await target.schema_version() != version:
        raise StoreError(
            f"the stores are at different schema versions ({version} and "
            f"{await target.schema_version()}): run ckms store migrate on both"
        )
    counts: dict[str, int] = {}
    async with source.read() as r:
        tables = _in_dependency_order(await _tables(r))
        async with target.write() as tx:
            for table in tables:
                if await tx.fetchval(f"SELECT 1 FROM {table} LIMIT 1") is not None:  # noqa: S608
                    raise StoreError(
                        f"the target store is not empty (table {table} holds rows): copy only "
                        "into a new, empty database"
                    )
            for table in tables:
                counts[table] = await _copy_table(r, tx, table, tables[table])
            last = await outbox.last_seq(r)  # type: ignore[arg-type]
            await outbox.continue_seq(tx, last)
            await _after_copy(tx)
    return CopyReport(rows=counts, schema_version=version, last_event_seq=last)


async def _copy_table(r: Reader, tx: Transaction, table: str, key: list[str]) -> int:
    """Copy one table in slices ordered by its primary key (one snapshot throughout)."""
    total = 0
    order = ", ".join(key)
    offset = 0
    while True:
        rows = await r.fetchall(
            f"SELECT * FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608
            (COPY_SLICE, offset),
        )
        if not rows:
            return total
        columns = list(rows[0].keys())
        marks = ", ".join("?" for _ in columns)
        await tx.executemany(
            f"INSERT INTO {table}({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
            [tuple(row) for row in rows],
        )
        total += len(rows)
        offset += len(rows)


async def _tables(r: Reader) -> dict[str, tuple[list[str], set[str]]]:
    """Every table to copy: its primary key columns and the tables its foreign keys name."""
    out: dict[str, tuple[list[str], set[str]]] = {}
    if r.dialect.name == "sqlite":
        names = [
            str(row[0])
            for row in await r.fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        for name in names:
            if name in _NOT_COPIED or name.startswith("sqlite_"):
                continue
            info = await r.fetchall(f"SELECT name, pk FROM pragma_table_info('{name}')")  # noqa: S608
            key = [str(c[0]) for c in sorted((c for c in info if c[1]), key=lambda c: c[1])]
            parents = {
                str(f[0])
                for f in await r.fetchall(
                    f"SELECT \"table\" FROM pragma_foreign_key_list('{name}')"  # noqa: S608
                )
            }
            out[name] = (key or [str(info[0][0])], parents - {name})
        return out
    names = [
        str(row[0])
        for row in await r.fetchall(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        )
    ]
    for name in names:
        if name in _NOT_COPIED:
            continue
        key = [
            str(row[0])
            for row in await r.fetchall(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = ?::regclass AND i.indisprimary "
                "ORDER BY array_position(i.indkey::smallint[], a.attnum)",
                (name,),
            )
        ]
        parents = {
            str(row[0])
            for row in await r.fetchall(
                "SELECT confrelid::regclass::text FROM pg_constraint "
                "WHERE conrelid = ?::regclass AND contype = 'f'",
                (name,),
            )
        }
        out[name] = (key or ["1"], parents - {name})
    return out


def _in_dependency_order(tables: dict[str, tuple[list[str], set[str]]]) -> dict[str, list[str]]:
    """The tables (name → key columns), each after every table its foreign keys name."""
    ordered: dict[str, list[str]] = {}
    pending = dict(tables)
    while pending:
        ready = sorted(n for n, (_, parents) in pending.items() if parents <= set(ordered))
        if not ready:
            raise StoreError(f"the tables' foreign keys form a cycle: {sorted(pending)}")
        for name in ready:
            ordered[name] = pending.pop(name)[0]
    return ordered


async def _after_copy(tx: Transaction) -> None:
    """PostgreSQL: identity columns continue after the rows copied in with their values, and
    every other replica's caches reload (the change counter moves)."""
    if tx.dialect.name != "postgresql":
        return
    for row in await tx.fetchall(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ):
        table, column = str(row[0]), str(row[1])
        await tx.fetchval(
            f"SELECT setval(pg_get_serial_sequence(?, ?), "  # noqa: S608
            f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)",
            (table, column),
        )
    await tx.execute("UPDATE counters SET value = value + 1 WHERE name = 'changes'")
