"""The PostgreSQL store (asyncpg): the same interface and transaction boundaries as SQLite's.

Several controllers may share one database, so what SQLite's single file gives for free is
made explicit here:

- **One writer at a time, across every process.** :meth:`PgStore.write` opens a READ
  COMMITTED transaction and first takes a transaction-scoped advisory lock
  (:data:`WRITER_LOCK`), held until COMMIT or ROLLBACK: exactly what ``BEGIN IMMEDIATE`` is on
  SQLite. Every statement after it sees every earlier writer's commit, so the audit chain is
  extended from its real head (two replicas never fork it), the outbox sequence is taken in
  commit order, and a change, its audit record and its outbox row commit together.
- **Reads** run on a small pool, each :meth:`PgStore.read` in a REPEATABLE READ READ ONLY
  snapshot, beside the writer.
- **Generations** (:meth:`Store.generation`): permanent triggers on the watched tables note
  each changed row's id in a transaction-local setting (read back just before COMMIT, so this
  process's own commits move its caches at once, with the ids), and bump the ``changes``
  counter once per transaction; the counter is polled at most every ``FOREIGN_CHECK_S``, so a
  commit by another replica moves every generation.
- **Errors** become StoreError without bound values (asyncpg's own messages may quote them);
  a lost connection is replaced on the next call, so a PostgreSQL restart needs no controller
  restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from ckms.errors import ConfigError, DependencyMissingError, StoreError
from ckms.store import _store
from ckms.store._dialect import POSTGRESQL, Dialect
from ckms.store._fence import check_fence
from ckms.store._migrations import MIGRATIONS, Migration
from ckms.store._store import (
    WATCHED,
    Params,
    Reader,
    RunSql,
    Store,
    Transaction,
    _uncancellable,
)
from ckms.store._time import format_time, utc_now

try:
    import asyncpg
except ImportError:  # pragma: no cover - the postgresql extra is not installed
    asyncpg = None

log = logging.getLogger(__name__)

WRITER_LOCK = 0x636B6D7301
"""The advisory lock key every write transaction holds (``ckms`` + 1): the one writer."""
MIGRATION_LOCK = 0x636B6D7302
"""The advisory lock key migrations hold, so replicas starting together migrate once."""

_BEGIN_WRITE = (
    f"BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock({int(WRITER_LOCK)})"
)

IDLE_IN_WRITE_MS = "15000"
"""How long (ms) a write transaction may sit idle before PostgreSQL ends its session."""

READ_POOL_SIZE = 4
"""Read connections kept per store (reads beside the one writer connection)."""
CONNECT_TIMEOUT_S = 10.0

_CHANGED_SETTING = "ckms.changed"
_EVERYTHING = "*"
"""The setting's value once a transaction changed too many rows to list (a copy, a big batch):
every row is taken as changed, and caches reload whole."""
_MAX_NOTED = 65536
_NOTE_FUNCTION = "ckms_note_change"

# The row trigger of the watched tables (see the module docstring): the first change of a
# transaction bumps the ``changes`` counter, every change appends "name id" to the setting.
_NOTE_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {_NOTE_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    seen text := coalesce(current_setting('{_CHANGED_SETTING}', true), '');
    row_id text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_id := to_jsonb(OLD) ->> TG_ARGV[1];
    ELSE
        row_id := to_jsonb(NEW) ->> TG_ARGV[1];
    END IF;
    IF seen = '' THEN
        UPDATE counters SET value = value + 1 WHERE name = 'changes';
    ELSIF seen = '{_EVERYTHING}' THEN
        RETURN NULL;
    END IF;
    IF length(seen) > {_MAX_NOTED} THEN
        seen := '{_EVERYTHING}';
    ELSE
        seen := seen || TG_ARGV[0] || ' ' || coalesce(row_id, '') || chr(10);
    END IF;
    PERFORM set_config('{_CHANGED_SETTING}', seen, true);
    RETURN NULL;
END
$$;
"""  # noqa: S608

_SAFE_MESSAGE_CLASSES = ("23", "42", "P0")
"""SQLSTATE classes whose server message names only SQL text and schema objects (integrity
constraints, syntax and access rules, the store's own trigger errors), never a bound value.
Other messages (a data exception quotes the value it could not take) are left out."""


_LOST = "the connection to PostgreSQL was lost"


def _says_lost(exc: StoreError) -> bool:
    """Whether a StoreError of :func:`pg_error` is a lost connection (a new one may do)."""
    return _LOST in str(exc)


def _require_asyncpg() -> Any:
    if asyncpg is None:
        raise DependencyMissingError(
            "the PostgreSQL store needs asyncpg: pip install 'ckms[postgresql]'"
        )
    return asyncpg


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection is gone (a new one may succeed)."""
    if asyncpg is None:
        return False
    return isinstance(
        exc,
        (
            OSError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.CrashShutdownError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.InterfaceError,
            # The server ended the session (a restart's FATAL 57P01) while the connection sat
            # idle: asyncpg waits for a ReadyForQuery that never comes, and the next statement
            # is refused ("cannot switch to state ...; another operation is in progress").
            asyncpg.exceptions.InternalClientError,
        ),
    )


def _errors() -> tuple[type[BaseException], ...]:
    return (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
        asyncio.TimeoutError,
    )


def pg_error(exc: BaseException, what: str) -> StoreError:
    """Map an asyncpg error to StoreError; the message never holds a bound value or password."""
    if asyncpg is not None and isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        text = f"{what}: {type(exc).__name__} (SQLSTATE {state})"
        if state.startswith(_SAFE_MESSAGE_CLASSES):
            text += f": {exc.args[0] if exc.args else ''}"
        for attr in ("table_name", "column_name", "constraint_name"):
            value = getattr(exc, attr, None)
            if value:
                text += f" [{attr.removesuffix('_name')} {value}]"
        if _lost(exc):
            text += f" ({_LOST}; the next call reconnects)"
        return StoreError(text)
    if _lost(exc):
        return StoreError(
            f"{what}: {_LOST} or refused ({type(exc).__name__}); the next call reconnects"
        )
    # Other client-side errors: only the type is kept (asyncpg's messages may quote a value;
    # its DataError, "invalid input for query argument $1: <value>", is a class 22
    # PostgresError above, whose message is left out).
    return StoreError(f"{what}: {type(exc).__name__}")


def _rowcount(status: str) -> int:
    """The row count of a command status (``UPDATE 3``, ``INSERT 0 1``), 0 if none."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PgReader(Reader):
    """:class:`Reader` on one asyncpg connection."""

    dialect: Dialect = POSTGRESQL

    def __init__(self, conn: Any, row_key: bytes | None = None) -> None:
        super().__init__(conn, row_key)
        self.spoiled = False
        """A statement failed in the client (an argument it could not encode, such as an
        integer past 64 bits): the server was left inside that statement's implicit
        transaction, holding its locks, with nothing the client can see. The connection is
        closed rather than used again (pooled, it blocked DDL on the table for a minute)."""

    def _failed(self, exc: BaseException) -> None:
        # asyncpg raises its encoding failure as a PostgresError (a DataError) of its own
        # making: the server did not send it, so it carries no severity.
        if asyncpg is None:
            return
        if isinstance(exc, asyncpg.InterfaceError) or (
            isinstance(exc, asyncpg.PostgresError) and getattr(exc, "severity", None) is None
        ):
            self.spoiled = True

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        """Run a query and return every row (asyncpg Records: by index and by name)."""
        self._check()
        try:
            text, args = POSTGRESQL.bind(sql, params)
            return list(await self._conn.fetch(text, *args))
        except _errors() as exc:
            self._failed(exc)
            raise pg_error(exc, "query failed") from None


class PgTransaction(Transaction, PgReader):
    """:class:`Transaction` on the writer connection."""

    dialect: Dialect = POSTGRESQL
    can_defer = False  # every statement is a round trip to the server: nothing to save

    async def defer(self, work: Callable[[RunSql], None]) -> None:
        raise StoreError("deferred work is SQLite's (Transaction.can_defer): run it now")

    async def execute_later(self, sql: str, params: Params = ()) -> None:
        """Run it now: every statement here is a round trip to the server anyway."""
        await self.execute(sql, params)

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement and return the number of rows it changed."""
        self._check()
        try:
            text, args = POSTGRESQL.bind(sql, params)
            status = await self._conn.execute(text, *args)
        except _errors() as exc:
            self._failed(exc)
            raise pg_error(exc, "write failed") from None
        return _rowcount(status)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        """Run one statement for each parameter row (one round trip, pipelined)."""
        self._check()
        if not rows:
            return
        try:
            text = POSTGRESQL.bind(sql, rows[0])[0]
            await self._conn.executemany(text, [POSTGRESQL.bind(sql, r)[1] for r in rows])
        except _errors() as exc:
            self._failed(exc)
            raise pg_error(exc, "write failed") from None

    async def insert(self, sql: str, params: Params = ()) -> int:
        """Run an ``INSERT ... RETURNING <integer key>`` and return the key.

        PostgreSQL has no rowid: the statement names the column it wants back.
        """
        if "RETURNING" not in sql.upper():
            raise StoreError("insert() on PostgreSQL needs INSERT ... RETURNING <key column>")
        value = await self.fetchval(sql, params)
        if value is None:
            raise StoreError("write failed: no row id")
        return int(value)


class PgStore(Store):
    """A store in a PostgreSQL database; open with :meth:`Store.open` and a ``postgresql://``
    URL (or :meth:`connect`)."""

    dialect: Dialect = POSTGRESQL

    def __init__(self, url: str, password: str | None) -> None:
        self._init_state(url)
        self._password = password
        self._conn: Any = None
        self._pool: Any = None
        self._counter: int | None = None
        self._everything = False
        """Set by a transaction that changed too many rows to list (see _EVERYTHING)."""
        self._checked = -_store.FOREIGN_CHECK_S

    def __repr__(self) -> str:
        return f"PgStore({self.path!r})"

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        password: str | None = None,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> PgStore:
        """Connect to the database at ``url``, apply migrations, and return the store."""
        _require_asyncpg()
        store = cls(url, password)
        try:
            store._conn = await store._new_connection()
            await _check_database(store._conn)
            store.migrated = await apply_pg_migrations(store._conn, migrations)
            await store._install_watch()
            store._pool = await asyncpg.create_pool(
                url,
                password=password,
                min_size=0,
                max_size=READ_POOL_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                max_inactive_connection_lifetime=60.0,
                reset=_reset_reader,
            )
        except BaseException:
            await store.close()
            raise
        log.info("store opened at %s", url)
        return store

    async def _new_connection(self) -> Any:
        try:
            return await asyncpg.connect(
                self.path,
                password=self._password,
                timeout=CONNECT_TIMEOUT_S,
                # A replica frozen inside a write transaction (SIGSTOP, a VM pause) holds the
                # writer lock: the server ends its session after this, so the other replicas'
                # writes (their leader lease rounds first) wait at most this long.
                server_settings={"idle_in_transaction_session_timeout": IDLE_IN_WRITE_MS},
            )
        except _errors() as exc:
            raise pg_error(exc, f"cannot connect to the PostgreSQL store {self.path}") from None

    async def _writer_conn(self) -> Any:
        """The writer connection, replaced first if it was lost."""
        if self._conn is None or self._conn.is_closed():
            if self._conn is not None:
                self._conn.terminate()
                log.warning("the PostgreSQL store's connection was lost; reconnecting")
            self._conn = None
            self._conn = await self._new_connection()
        return self._conn

    async def _install_watch(self) -> None:
        """Create (or replace) the change triggers of :data:`WATCHED`, under the writer lock."""
        conn = self._conn
        tables = {
            str(r[0])
            for r in await _fetch(
                conn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        statements = [_NOTE_FUNCTION_SQL]
        for name, events in WATCHED.items():
            for i, (event, row_id) in enumerate(events):
                table = event.rsplit(" ON main.", 1)[1]
                if table not in tables or "counters" not in tables:
                    continue
                column = row_id.split(".", 1)[1]
                statements.append(
                    f"CREATE OR REPLACE TRIGGER ckms_watch_{name}_{i} "
                    f"{event.replace(' ON main.', ' ON ')} FOR EACH ROW "
                    f"EXECUTE FUNCTION {_NOTE_FUNCTION}('{name}', '{column}')"
                )
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITER_LOCK)
                for statement in statements:
                    await conn.execute(statement)
        except _errors() as exc:
            raise pg_error(exc, "cannot watch the store for changes") from None

    # -- opening and closing -------------------------------------------------------------

    @property
    def is_memory(self) -> bool:
        """Never: a PostgreSQL store is a database on a server."""
        return False

    async def close(self) -> None:
        """Close the writer connection and the read pool; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            if self._pool is not None:
                try:
                    await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT_S)
                except (TimeoutError, Exception):
                    self._pool.terminate()
            if self._conn is not None:
                try:
                    await asyncio.wait_for(self._conn.close(), CONNECT_TIMEOUT_S)
                except (TimeoutError, Exception):
                    self._conn.terminate()
        log.info("store closed")

    # -- generations ---------------------------------------------------------------------

    async def generation(self, name: str, *, fresh: bool = False) -> int:
        """As :meth:`Store.generation`; another replica's commits are seen by polling the
        ``changes`` counter at most every ``FOREIGN_CHECK_S`` (now, when ``fresh``)."""
        now = time.monotonic()
        if fresh or now - self._checked >= _store.FOREIGN_CHECK_S:
            self._checked = now
            value = await self.fetchval("SELECT value FROM counters WHERE name = 'changes'")
            self._saw_counter(None if value is None else int(value), own=False)
        return self._generations[name]

    def _saw_counter(self, value: int | None, *, own: bool) -> None:
        """Take a read of the change counter; ``own``: read inside this process's write
        transaction, which bumped it once if it changed watched rows.

        The counter only grows; a read older than one already taken (a poll that started
        before this process's last commit) is ignored. Any growth not explained by this
        process's own commit is another writer's: every generation moves.
        """
        if value is None:
            return
        known = self._counter
        if known is not None:
            if value < known:
                return
            if value != known + (1 if own and self._changed else 0):
                self._bump_all()
        self._counter = value

    def _bump_all(self) -> None:
        for watched in self._generations:
            self._bump(watched, None)  # another writer committed; which rows, unknown

    # -- transactions --------------------------------------------------------------------

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Transaction]:
        """One transaction as the one writer of every process on this database."""
        task = self._writer_may_enter()
        async with self._write_lock:
            self._check_open()
            self._writer_task = task
            self._changed.clear()
            tx: PgTransaction | None = None
            try:
                conn = await self._begin_write()
                # The audit head is always read from the table: another replica may have
                # appended since this process's last commit.
                tx = PgTransaction(conn, None, self.audit_blocked, self.row_key)
                try:
                    await check_fence(tx)  # leader-only work: the lease must still be ours
                    yield tx
                    tx._active = False
                    await self._note_changes(conn)
                except BaseException:
                    tx._active = False
                    await _rollback(conn)
                    if tx.spoiled:
                        self._drop_writer()
                    raise
                try:
                    await _uncancellable(_run(conn, "COMMIT", "cannot commit"))
                except StoreError as exc:
                    if _says_lost(exc):
                        self._drop_writer()  # the next write connects afresh
                    else:
                        await _rollback(conn)
                    # The counter read above counted a commit that may not have happened.
                    self._counter = None
                    self._bump_all()
                    raise
                self._audit_head = tx.audit_head
                if tx.wrote_outbox:
                    for listener in self._outbox_listeners:
                        listener()
            finally:
                if tx is not None:
                    tx._active = False
                self._writer_task = None
                for name, ids in self._changed.items():
                    self._bump(name, None if self._everything else frozenset(ids))
                self._changed.clear()
                self._everything = False

    async def _begin_write(self) -> Any:
        """BEGIN and take the writer lock (waiting for another process's writer to finish).

        A connection found lost here, with nothing done yet, is replaced once. A cancel
        while waiting drops the connection: the server then ends the transaction and
        releases the lock, whatever state the wait was in.
        """
        for attempt in (1, 2):
            conn = await self._writer_conn()
            try:
                if conn.is_in_transaction():
                    log.warning("rolling back a transaction left open by a cancelled writer")
                    await conn.execute("ROLLBACK")
                # One round trip (simple query protocol: two statements, no parameters).
                await conn.execute(_BEGIN_WRITE)
                return conn
            except Exception as exc:
                if _lost(exc) and attempt == 1:
                    self._drop_writer()
                    continue
                await _rollback(conn)
                if isinstance(exc, _errors()):
                    raise pg_error(exc, "cannot start a write transaction") from None
                raise
            except BaseException:
                self._drop_writer()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _drop_writer(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
        self._conn = None

    async def _note_changes(self, conn: Any) -> None:
        """Read what this transaction changed in the watched tables (and the counter)."""
        try:
            row = await conn.fetchrow(
                f"SELECT current_setting('{_CHANGED_SETTING}', true), "  # noqa: S608
                "(SELECT value FROM counters WHERE name = 'changes')"
            )
        except _errors() as exc:
            raise pg_error(exc, "cannot read the changes of a transaction") from None
        if row is None:  # pragma: no cover - a SELECT without FROM returns one row
            return
        noted = str(row[0] or "")
        if noted == _EVERYTHING:
            for watched in self._generations:
                self._changed.setdefault(watched, set())
            self._everything = True
        for line in noted.splitlines():
            watched, _, row_id = line.partition(" ")
            if watched in self._generations:
                self._changed.setdefault(watched, set()).add(row_id)
        self._saw_counter(None if row[1] is None else int(row[1]), own=True)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Reader]:
        """Run the block against one consistent read-only snapshot (a pool connection)."""
        self._check_open()
        for attempt in (1, 2):
            conn = await self._acquire()
            try:
                await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            except Exception as exc:
                await self._release(conn)
                if _lost(exc) and attempt == 1:
                    continue
                raise pg_error(exc, "cannot start a read transaction") from None
            reader = PgReader(conn, self.row_key)
            try:
                yield reader
            finally:
                reader._active = False
                await self._release(conn, reader)
            return

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[Reader]:
        """One statement on a pool connection, in its own snapshot (autocommit)."""
        self._check_open()
        conn = await self._acquire()
        reader = PgReader(conn, self.row_key)
        try:
            yield reader
        finally:
            reader._active = False
            await self._release(conn, reader)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        """Run one read query in its own snapshot (again once if its connection was lost)."""
        try:
            async with self._statement() as r:
                return await r.fetchall(sql, params)
        except StoreError as exc:
            if not _says_lost(exc):
                raise
        async with self._statement() as r:
            return await r.fetchall(sql, params)

    async def _acquire(self) -> Any:
        self._check_open()
        try:
            return await self._pool.acquire(timeout=CONNECT_TIMEOUT_S)
        except _errors() as exc:
            raise pg_error(exc, f"cannot connect to the PostgreSQL store {self.path}") from None

    async def _release(self, conn: Any, reader: PgReader | None = None) -> None:
        """Return a read connection to the pool, or close it if a statement spoiled it."""
        if reader is not None and reader.spoiled:
            _terminate_pooled(conn)
        else:
            await _rollback(conn)
        try:
            await self._pool.release(conn)
        except Exception:
            log.debug("a read connection could not be returned to the pool", exc_info=True)
            _terminate_pooled(conn)


# -- helpers ---------------------------------------------------------------------------------


async def _reset_reader(conn: Any) -> None:
    """What a read connection needs before its next use: no open transaction. (asyncpg's
    default reset, a round trip of RESET ALL, UNLISTEN and unlocks, undoes nothing these
    connections do: they set nothing, listen to nothing and lock nothing.)"""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _fetch(conn: Any, sql: str, *args: Any) -> list[Any]:
    try:
        return list(await conn.fetch(sql, *args))
    except _errors() as exc:
        raise pg_error(exc, "query failed") from None


async def _run(conn: Any, sql: str, what: str) -> None:
    try:
        await conn.execute(sql)
    except _errors() as exc:
        raise pg_error(exc, what) from None


def _terminate_pooled(conn: Any) -> None:
    """Close a pool connection now. asyncpg detaches the connection from its pool proxy as soon
    as it learns the server ended the session; a detached proxy is closed already, and calling
    it raises."""
    if asyncpg is not None:
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()


async def _rollback(conn: Any) -> None:
    """Roll back if a transaction is open; never raises (the original error matters more)."""
    with contextlib.suppress(Exception):
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("ROLLBACK")


_BYTEWISE = ("C", "POSIX", "ucs_basic")


async def _check_database(conn: Any) -> None:
    """Refuse a database whose text order is not bytewise, or whose encoding is not UTF-8.

    Times are fixed-width text compared in SQL, and pages of keys and hosts are read by name
    order: a locale collation (``en_US.UTF-8``) orders punctuation and case otherwise than
    SQLite and Python do.
    """
    row = (
        await _fetch(
            conn,
            "SELECT *, pg_encoding_to_char(encoding) AS encoding_name FROM pg_database "
            "WHERE datname = current_database()",
        )
    )[0]
    info = dict(row.items())
    collate, encoding = str(info["datcollate"]), str(info["encoding_name"])
    if info.get("datlocprovider") in ("i", b"i"):  # PostgreSQL 15+: the database's ICU locale
        collate = f"ICU {info.get('daticulocale')}"  # no ICU collation orders bytewise
    if collate not in _BYTEWISE and not collate.startswith("C."):
        raise ConfigError(
            f"the PostgreSQL database orders text by the locale {collate!r}; ckms needs "
            "bytewise order: CREATE DATABASE ... TEMPLATE template0 LOCALE 'C' ENCODING 'UTF8'"
        )
    if encoding.upper() not in ("UTF8", "UTF-8"):
        raise ConfigError(
            f"the PostgreSQL database's encoding is {encoding}; ckms needs UTF8 "
            "(CREATE DATABASE ... ENCODING 'UTF8')"
        )


async def apply_pg_migrations(conn: Any, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the pending migrations (their PostgreSQL DDL), each in its own transaction with
    its ``schema_version`` row, under :data:`MIGRATION_LOCK`; return those applied."""
    numbers = [m.version for m in migrations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise StoreError("migrations must be numbered 1, 2, 3, ... without gaps")
    done: list[int] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
    except _errors() as exc:
        raise pg_error(exc, "cannot create schema_version") from None
    for migration in migrations:
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                applied = {
                    int(r[0]) for r in await conn.fetch("SELECT version FROM schema_version")
                }
                newest = max(applied, default=0)
                if newest > len(migrations):
                    raise StoreError(
                        f"database schema version {newest} is newer than this ckms knows "
                        f"({len(migrations)}); upgrade ckms"
                    )
                if migration.version in applied:
                    continue
                await conn.execute(migration.script("postgresql"))
                await conn.execute(
                    "INSERT INTO schema_version(version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    format_time(utc_now()),
                )
        except _errors() as exc:
            raise pg_error(
                exc, f"migration {migration.version} ({migration.name}) failed"
            ) from None
        log.info("applied migration %d (%s)", migration.version, migration.name)
        done.append(migration.version)
    return done
