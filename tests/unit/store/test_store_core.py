"""The store: migrations, the one-writer transaction, WAL, error translation."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from ckms.errors import ConfigError, StoreError
from ckms.store import MIGRATIONS, Migration, Store, apply_migrations
from ckms.store import audit as audit_log


async def test_file_store_uses_wal_and_records_migrations(db_path: Path) -> None:
    async with await Store.open(db_path) as file_store:
        assert await file_store.schema_version() == len(MIGRATIONS)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    expected = {
        "meta", "keys", "key_versions", "version_transitions", "hosts", "enrollment_tokens",
        "operators", "approvals", "fleet_state", "outbox", "audit", "audit_checkpoints",
        "schema_version",
    }  # fmt: skip
    assert expected <= tables


async def test_applying_migrations_twice_is_a_no_op(db_path: Path) -> None:
    async with await Store.open(db_path) as store, store.write() as tx:
        await tx.set_meta("marker", b"kept")
    async with await Store.open(db_path) as store:  # second open re-runs apply: nothing to do
        assert await store.get_meta("marker") == b"kept"
        assert await store.schema_version() == len(MIGRATIONS)
    async with aiosqlite.connect(db_path, isolation_level=None) as conn:
        assert await apply_migrations(conn) == []
        rows = await conn.execute_fetchall("SELECT version FROM schema_version")
    assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]


async def test_new_migration_applies_once_in_order(db_path: Path) -> None:
    extra = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "add t", "CREATE TABLE t (x INTEGER);"))
    async with await Store.open(db_path, migrations=extra) as store:
        assert await store.schema_version() == len(extra)
    async with await Store.open(db_path, migrations=extra) as store:
        assert await store.schema_version() == len(extra)


async def test_failed_migration_leaves_previous_version(db_path: Path) -> None:
    broken = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "broken", "CREATE TABLE t (; nonsense"))
    with pytest.raises(StoreError, match="migration"):
        await Store.open(db_path, migrations=broken)
    async with await Store.open(db_path) as store:
        assert await store.schema_version() == len(MIGRATIONS)


async def test_newer_database_is_refused(db_path: Path) -> None:
    extra = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "future", "CREATE TABLE f (x);"))
    async with await Store.open(db_path, migrations=extra):
        pass
    with pytest.raises(StoreError, match="newer"):
        await Store.open(db_path)


async def test_write_commits_on_success(mem_store: Store) -> None:
    async with mem_store.write() as tx:
        await tx.set_meta("a", b"1")
    assert await mem_store.get_meta("a") == b"1"


async def test_write_rolls_back_on_exception(mem_store: Store) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with mem_store.write() as tx:
            await tx.set_meta("a", b"1")
            raise Boom
    assert await mem_store.get_meta("a") is None


async def test_write_rolls_back_on_cancellation(file_store: Store) -> None:
    started = asyncio.Event()

    async def writer() -> None:
        async with file_store.write() as tx:
            await tx.set_meta("a", b"1")
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(writer())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await file_store.get_meta("a") is None
    async with file_store.write() as tx:  # the lock was released and the connection is usable
        await tx.set_meta("b", b"2")
    assert await file_store.get_meta("b") == b"2"


async def test_a_cancel_while_deferred_work_fails_at_commit_leaves_no_lock_held(
    file_store: Store,
) -> None:
    # The commit's trip runs the deferred work first: failing there, the transaction is
    # still open, and a cancel meanwhile must not leave it so (the file's write lock with it:
    # every other process would get "database is locked").
    if file_store.dialect.name != "sqlite":
        pytest.skip("only SQLite defers work to the commit")
    running = threading.Event()

    def slow_failure(sql: object) -> None:
        running.set()
        time.sleep(0.3)
        raise StoreError("refused")

    async def writer() -> None:
        async with file_store.write() as tx:
            await tx.set_meta("a", b"1")
            await tx.defer(slow_failure)

    task = asyncio.create_task(writer())
    assert await asyncio.to_thread(running.wait, 10)
    task.cancel()
    with pytest.raises((asyncio.CancelledError, StoreError)):
        await task
    with sqlite3.connect(file_store.path, timeout=0.1) as other:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free
        other.execute("ROLLBACK")
    assert await file_store.get_meta("a") is None


async def test_a_statement_run_later_is_seen_by_the_next_and_fails_its_transaction(
    file_store: Store,
) -> None:
    async with file_store.write() as tx:
        await tx.execute_later("INSERT INTO meta(name, value) VALUES (?, ?)", ("a", b"\x01"))
        assert await tx.fetchval("SELECT count(*) FROM meta WHERE name = 'a'") == 1
        await tx.execute_later("INSERT INTO meta(name, value) VALUES (?, ?)", ("b", b"\x02"))
    assert await file_store.get_meta("b") == b"\x02"
    with pytest.raises(StoreError, match="write failed"):
        async with file_store.write() as tx:
            await tx.set_meta("c", b"3")
            taken = ("a", b"\x03")
            await tx.execute_later("INSERT INTO meta(name, value) VALUES (?, ?)", taken)
    assert await file_store.get_meta("c") is None
    assert await file_store.get_meta("a") == b"\x01"


async def test_transaction_object_is_dead_after_the_block(mem_store: Store) -> None:
    async with mem_store.write() as tx:
        pass
    with pytest.raises(StoreError, match="no longer active"):
        await tx.set_meta("late", b"x")


async def test_nested_write_is_refused_instead_of_deadlocking(mem_store: Store) -> None:
    with pytest.raises(StoreError, match="nested"):
        async with mem_store.write(), mem_store.write():
            pass


async def test_writes_are_serialised(file_store: Store) -> None:
    async with file_store.write() as tx:
        await tx.set_meta("n", b"0")

    async def increment() -> None:
        async with file_store.write() as tx:
            n = int((await tx.get_meta("n")) or b"0")
            await asyncio.sleep(0)  # give the other writers every chance to interleave
            await tx.set_meta("n", str(n + 1).encode())

    await asyncio.gather(*(increment() for _ in range(20)))
    assert await file_store.get_meta("n") == b"20"


async def test_reader_sees_committed_snapshot_beside_the_writer(file_store: Store) -> None:
    async with file_store.write() as tx:
        await tx.set_meta("v", b"old")
        # The file store's reader is a second connection: uncommitted data is invisible to it.
        assert await file_store.get_meta("v") is None
    assert await file_store.get_meta("v") == b"old"


def _count_trips(conn: aiosqlite.Connection, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls queued to ``conn``'s thread (each one a round trip from the loop)."""
    trips = [0]
    queue = conn._execute

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return await queue(fn, *args, **kwargs)

    monkeypatch.setattr(conn, "_execute", counted)
    return trips


async def test_a_one_statement_transaction_is_two_trips_to_the_connection_thread(
    sqlite_file_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BEGIN goes with the first statement: a one-record audit append was three trips (BEGIN,
    # INSERT, COMMIT), each two thread wake-ups, most of its cost on a busy machine.
    writes = _count_trips(sqlite_file_store._writer, monkeypatch)
    async with sqlite_file_store.write() as tx:
        await tx.set_meta("a", b"1")
    assert writes[0] == 2
    assert sqlite_file_store._reader is not None
    reads = _count_trips(sqlite_file_store._reader, monkeypatch)
    async with sqlite_file_store.read() as r:
        assert await r.get_meta("a") == b"1"
        assert await r.get_meta("b") is None
    assert reads[0] == 3  # BEGIN + the first query, the second query, ROLLBACK
    writes[0] = 0
    async with sqlite_file_store.write():
        pass  # nothing ran: nothing to begin or commit
    assert writes[0] == 0
    assert not sqlite_file_store._writer.in_transaction


async def test_a_one_record_audit_append_is_one_trip_to_the_connection_thread(
    sqlite_file_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the log's head in memory the INSERT goes with the COMMIT (Transaction.defer).
    now = datetime.now(UTC)
    async with sqlite_file_store.write() as tx:  # the head is read from the table once
        await audit_log.append(tx, now=now, actor="a", action="x", object="first")
    writes = _count_trips(sqlite_file_store._writer, monkeypatch)
    async with sqlite_file_store.write() as tx:
        await audit_log.append(tx, now=now, actor="a", action="x", object="second")
    assert writes[0] == 1
    assert [r.object for r in await audit_log.load_records(sqlite_file_store)] == [
        "first",
        "second",
    ]


async def test_a_snapshot_starts_at_its_first_statement_and_holds(file_store: Store) -> None:
    async with file_store.write() as tx:
        await tx.set_meta("v", b"1")
    async with file_store.read() as r:
        assert await r.get_meta("v") == b"1"
        async with file_store.write() as tx:
            await tx.set_meta("v", b"2")
        assert await r.get_meta("v") == b"1"  # the same snapshot, after another commit
    assert await file_store.get_meta("v") == b"2"


async def test_a_begin_that_fails_is_a_store_error_and_leaves_the_store_usable(
    sqlite_file_store: Store, db_path: Path
) -> None:
    await sqlite_file_store._writer.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreError, match=r"cannot start a transaction.*locked"):
            async with sqlite_file_store.write() as tx:
                await tx.set_meta("a", b"1")
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert not sqlite_file_store._writer.in_transaction
    async with sqlite_file_store.write() as tx:
        await tx.set_meta("a", b"2")
    assert await sqlite_file_store.get_meta("a") == b"2"


async def test_a_failed_first_statement_rolls_its_begin_back(sqlite_mem_store: Store) -> None:
    with pytest.raises(StoreError, match="write failed"):
        async with sqlite_mem_store.write() as tx:
            await tx.execute("INSERT INTO no_such_table VALUES (1)")
    assert not sqlite_mem_store._writer.in_transaction
    async with sqlite_mem_store.write() as tx:
        await tx.set_meta("a", b"1")
    assert await sqlite_mem_store.get_meta("a") == b"1"


async def test_sqlite_errors_become_store_errors(mem_store: Store) -> None:
    with pytest.raises(StoreError, match=r"OperationalError|UndefinedTableError"):
        await mem_store.fetchall("SELECT * FROM no_such_table")
    with pytest.raises(StoreError):
        async with mem_store.write() as tx:
            await tx.execute("INSERT INTO no_such_table VALUES (1)")


async def test_an_integer_past_64_bits_is_a_store_error(mem_store: Store) -> None:
    # A value a peer chose (an ack's version) must fail as the store's error on both engines:
    # SQLite's OverflowError escaped unmapped, as no error the callers handle.
    async with mem_store.write() as tx:
        await tx.execute("CREATE TABLE wide (v BIGINT)")
    with pytest.raises(StoreError, match="write failed"):
        async with mem_store.write() as tx:
            await tx.execute("INSERT INTO wide(v) VALUES (?)", (1 << 64,))
    with pytest.raises(StoreError, match="query failed"):
        await mem_store.fetchall("SELECT v FROM wide WHERE v = ?", (1 << 64,))
    # The failed query left nothing holding the table: asyncpg's pooled connection sat in the
    # statement's implicit transaction and blocked this DROP for a minute.
    async with asyncio.timeout(10), mem_store.write() as tx:
        await tx.execute("DROP TABLE wide")


async def test_closed_store_raises_store_error() -> None:
    store = await Store.open(":memory:")
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        await store.get_meta("x")
    with pytest.raises(StoreError, match="closed"):
        async with store.write():
            pass


async def test_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await Store.open(tmp_path / "missing-dir" / "db.sqlite")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ckms:hunter2@db.internal/ckms",
        "postgres://ckms:hunter2@db/ckms",
        "postgresql://ckms@db/ckms?password=hunter2",
        # The client key's passphrase, which asyncpg (like libpq) reads from the URL too.
        "postgresql://ckms@db/ckms?sslmode=verify-full&sslpassword=hunter2",
    ],
)
async def test_a_postgresql_url_with_a_password_is_refused_without_echoing_it(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken as a file name it failed as "cannot open database <url with its password>"; a
    # password in the URL ends up in shells' history, process lists and logs.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="holds a password") as caught:
        await Store.open(url)
    assert "hunter2" not in str(caught.value)
    assert not any(os.scandir(tmp_path))  # no file made of the URL


@pytest.mark.parametrize("url", ["mysql://db/ckms", "postgresql:ckms", "postgresql:///ckms"])
async def test_an_unknown_or_incomplete_store_url_is_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="store URL"):
        await Store.open(url)
    assert not any(os.scandir(tmp_path))


async def test_sqlite_prefix_names_a_file(tmp_path: Path) -> None:
    async with await Store.open(f"sqlite:{tmp_path / 'a.db'}") as store:
        assert store.dialect.name == "sqlite"
        assert store.path == str(tmp_path / "a.db")
    assert (tmp_path / "a.db").exists()
