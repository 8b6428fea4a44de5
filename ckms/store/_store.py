"""The SQLite store: one writer, WAL, ordered migrations, sqlite errors mapped to StoreError.

All writes go through :meth:`Store.write`, an async context manager holding the single writer
lock around one ``BEGIN IMMEDIATE`` transaction: it commits when the block ends normally and
rolls back on any exception (including cancellation), so a key change, its audit record and its
outbox event are stored together or not at all. Reads use :meth:`Store.read`, a read-only
snapshot on a second connection (WAL lets it run beside the writer); an in-memory database has
only one connection, so there reads wait for the writer lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiosqlite

from ckms.errors import StoreError
from ckms.store._dialect import SQLITE, Dialect
from ckms.store._fence import check_fence
from ckms.store._migrations import MIGRATIONS, Migration
from ckms.store._time import format_time, utc_now
from ckms.store._url import parse_store_url

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]
T = TypeVar("T")

RunSql = Callable[[str, Params], list[Any]]
"""Runs one statement on the connection's thread and returns its rows; a failure is a
StoreError (what deferred work, :meth:`Transaction.defer`, is handed)."""

_MEMORY = ":memory:"
_BUSY_TIMEOUT_MS = 5000

WATCHED: dict[str, tuple[tuple[str, str], ...]] = {
    "keys": (
        ("AFTER INSERT ON main.keys", "NEW.id"),
        ("AFTER UPDATE ON main.keys", "NEW.id"),
        ("AFTER DELETE ON main.keys", "OLD.id"),
        ("AFTER INSERT ON main.key_versions", "NEW.key_id"),
        ("AFTER UPDATE ON main.key_versions", "NEW.key_id"),
        ("AFTER DELETE ON main.key_versions", "OLD.key_id"),
        ("AFTER INSERT ON main.rollouts", "NEW.key_id"),
        ("AFTER UPDATE ON main.rollouts", "NEW.key_id"),
        ("AFTER DELETE ON main.rollouts", "OLD.key_id"),
    ),
    # Who a host is and what it may have; not when it was last seen or its last ack.
    "hosts": (
        ("AFTER INSERT ON main.hosts", "NEW.id"),
        ("AFTER DELETE ON main.hosts", "OLD.id"),
        (
            "AFTER UPDATE OF name, labels, identity_public_key, wrapping_public_key, enrolled_at, "
            "revoked, revoked_at, wrap_suite, signer_key_id ON main.hosts",
            "NEW.id",
        ),
    ),
}
"""What :meth:`Store.generation` counts: name → the writes that change it (temp triggers), each
with the id of the row it changed (a key's id for its versions), for :meth:`Store.changed_since`."""

CHANGE_HISTORY = 1024
"""Committed generations per watched name whose changed ids :meth:`Store.changed_since` keeps."""

_CHANGED_FUNCTION = "ckms_changed"

FOREIGN_CHECK_S = 0.05
"""How often :meth:`Store.generation` looks for commits by other connections (each look is a
query on the writer connection, queued behind its writes; the agent requests ask per request)."""


def read_only_uri(path: str | Path, *, immutable: bool = False) -> str:
    """A SQLite URI that opens exactly ``path`` read-only (``sqlite3.connect(..., uri=True)``).

    The path is percent-encoded (``Path.as_uri``): pasted raw into ``file:...?mode=ro``, a
    ``?`` or ``#`` in it starts the query and a ``%`` escapes, so another file -- created
    empty if missing -- would be opened and checked than the one named."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    return uri + "&immutable=1" if immutable else uri


def _store_error(exc: BaseException, what: str) -> StoreError:
    """Map a sqlite or aiosqlite error to StoreError; messages never contain bound values."""
    if isinstance(exc, ValueError):  # aiosqlite: "Connection closed" / "no active connection"
        return StoreError(f"{what}: the store is closed")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")


class _Queries:
    """What every query surface derives from ``fetchall``: a reader, a transaction, a store
    (whose one-statement reads each run in their own snapshot) on either engine."""

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        raise NotImplementedError

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        """Run a query and return its first row, or None."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Params = ()) -> Any:
        """Run a query and return the first column of its first row, or None."""
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    async def get_meta(self, name: str) -> bytes | None:
        """Return a value of the ``meta`` table (controller secrets are stored there sealed)."""
        value = await self.fetchval("SELECT value FROM meta WHERE name = ?", (name,))
        return None if value is None else bytes(value)


class Reader(_Queries):
    """Queries inside one read snapshot (or inside the write transaction, for a Transaction)."""

    dialect: Dialect = SQLITE
    """How this engine spells what the application SQL cannot share (``ckms.store._dialect``)."""

    def __init__(
        self, conn: aiosqlite.Connection, row_key: bytes | None = None, *, begin: str | None = None
    ) -> None:
        self._conn = conn
        self._active = True
        self._begin = begin
        """The BEGIN still to run, in the same trip to the connection's thread as the first
        statement (see :meth:`_call`); None once it ran, or when there is none."""
        self.row_key = row_key
        """The key that binds rows to the root KEK (``Store.row_key``), or None while sealed."""
        self._deferred: deque[Callable[[RunSql], None]] = deque()
        """Work queued by :meth:`Transaction.defer`, run before the next statement's work."""
        self._deferred_failure: BaseException | None = None
        """Deferred work that failed: the transaction may hold part of what was queued, so no
        later statement runs and it never commits (whatever its block caught)."""

    @property
    def begun(self) -> bool:
        """True once the transaction's BEGIN has run (nothing to end before that)."""
        return self._begin is None

    def _check(self) -> None:
        """Refuse use after the context that handed this object out has ended, or after its
        deferred work failed."""
        if not self._active:
            raise StoreError("transaction is no longer active")
        if self._deferred_failure is not None:
            raise StoreError(f"transaction failed earlier: {self._deferred_failure}")

    async def _call(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the connection's thread, preceded by the pending BEGIN if any.

        Each trip to that thread costs two thread wake-ups, which on a busy machine cost more
        than a small statement does: a one-record transaction was three trips (BEGIN, INSERT,
        COMMIT) and is two. SQLite takes a deferred BEGIN's snapshot at its first statement
        anyway, and the one writer holds the write lock meanwhile, so nothing else changes.
        """
        self._check()
        return await self._trip(what, work)

    async def _trip(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """One trip to the connection's thread: the pending BEGIN, then deferred work, then
        ``work``, so every statement sees what was queued before it."""
        begin = self._begin
        deferred = self._deferred

        def run(conn: sqlite3.Connection) -> T:
            if begin is not None:
                try:
                    conn.execute(begin)
                except sqlite3.Error as exc:
                    raise _BeginFailed(exc) from exc
                self._begin = None
            if deferred:
                sql = _sql_runner(conn)
                while deferred:
                    try:
                        deferred.popleft()(sql)
                    except BaseException as exc:
                        self._deferred_failure = exc
                        deferred.clear()
                        raise
            return work(conn)

        try:
            return await _on_thread(self._conn, run)
        except _BeginFailed as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise _store_error(cause, "cannot start a transaction") from cause
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            # OverflowError: an integer past 64 bits (a value a peer chose), as PostgreSQL's
            # out-of-range DataError is a StoreError too.
            raise _store_error(exc, what) from exc

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run a query and return every row."""
        return await self._call("query failed", lambda c: c.execute(sql, params).fetchall())


class Transaction(Reader):
    """The one write transaction; handed out by :meth:`Store.write`."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        audit_head: tuple[int, str] | None = None,
        audit_blocked: str | None = None,
        row_key: bytes | None = None,
        *,
        begin: str | None = None,
    ) -> None:
        super().__init__(conn, row_key)
        self._begin = begin  # set here: the PostgreSQL reader in the MRO takes no begin
        self.wrote_outbox = False
        """Set by ``outbox.add_event``: the store tells its outbox listeners after the commit."""
        self.audit_head = audit_head
        """(records, last hash) of the audit log as this transaction sees it, if known; kept
        by ``audit.append`` so a busy writer does not read the head back for every record."""
        self.audit_blocked = audit_blocked
        """Why audit appends are refused in this transaction (``Store.audit_blocked``), if so."""

    can_defer = True
    """Whether :meth:`defer` is available (SQLite: statements run on one thread of its own)."""

    async def defer(self, work: Callable[[RunSql], None]) -> None:
        """Queue ``work`` to run on the connection's thread just before the next statement, or
        with COMMIT if none follows: a transaction whose last write is deferred commits in one
        trip to that thread instead of two (each trip is two thread wake-ups, more than a small
        statement costs). Every later statement sees its effect, as if it had run now; its
        failure is raised by that statement, or by the commit, and the transaction rolls back.
        ``work`` runs on another thread: it may read and set this transaction's attributes
        (the task that owns the transaction waits meanwhile) but must not touch the loop.

        Every :data:`DEFER_AT_MOST` queued items run at once (one trip), so a block that
        defers many (a group commit's records) still yields to the loop between them and
        holds a bounded queue.
        """
        self._check()
        self._deferred.append(work)
        if len(self._deferred) >= DEFER_AT_MOST:
            await self._trip("write failed", _nothing)

    async def execute_later(self, sql: str, params: Params = ()) -> None:
        """Run a statement whose result nobody reads, with the next trip to SQLite's thread
        (:meth:`defer`): a group commit's per-host updates then cost no trip of their own."""

        def run(sql_runner: RunSql) -> None:
            sql_runner(sql, params)

        await self.defer(run)

    @property
    def pending(self) -> bool:
        """True if committing has anything to do: a BEGIN that ran, or work deferred."""
        return self.begun or bool(self._deferred)

    async def _commit(self) -> None:
        """COMMIT in the same trip as the pending BEGIN and deferred work (the block is over)."""

        def commit(conn: sqlite3.Connection) -> None:
            conn.execute("COMMIT")

        await self._trip("cannot commit", commit)

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement and return the number of rows it changed."""
        return await self._call("write failed", lambda c: c.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        """Run one statement for each parameter row (one trip to the connection's thread)."""
        self._check()
        if not rows:
            return
        await self._call("write failed", lambda c: c.executemany(sql, rows))

    async def insert(self, sql: str, params: Params = ()) -> int:
        """Run an INSERT and return the new row's rowid."""
        rowid = await self._call("write failed", lambda c: c.execute(sql, params).lastrowid)
        if rowid is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise StoreError("write failed: no row id")
        return rowid

    async def set_meta(self, name: str, value: bytes) -> None:
        """Insert or replace a value of the ``meta`` table."""
        await self.execute(
            "INSERT INTO meta(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )


class Store(_Queries):
    """The controller's database: open with :meth:`open`, close with :meth:`close`.

    This class is the SQLite engine; :class:`ckms.store._pg.PgStore` is the PostgreSQL one,
    with the same interface and the same transaction boundaries.
    """

    dialect: Dialect = SQLITE
    """The engine's SQL differences (``store.dialect.name``: ``sqlite`` or ``postgresql``)."""

    def __init__(
        self, path: str, writer: aiosqlite.Connection, reader: aiosqlite.Connection | None
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._init_state(path)
        self._read_lock = asyncio.Lock() if reader is not None else self._write_lock

    def _init_state(self, path: str) -> None:
        """What both engines keep in this process: locks, generations, the audit head."""
        self.path = path
        """Where the store is: a file, ``:memory:``, or a PostgreSQL URL (never a password)."""
        self._write_lock = asyncio.Lock()
        self._writer_task: asyncio.Task[Any] | None = None
        self._closed = False
        self._outbox_listeners: list[Callable[[], None]] = []
        self._generations: dict[str, int] = dict.fromkeys(WATCHED, 0)
        self._changed: dict[str, set[str]] = {}
        self._history: dict[str, deque[tuple[int, frozenset[str] | None]]] = {
            name: deque(maxlen=CHANGE_HISTORY) for name in WATCHED
        }
        self._audit_head: tuple[int, str] | None = None
        self.row_key: bytes | None = None
        """Set by the vault once unsealed (and rows are bound): reads check row MACs with it,
        writes stamp them (``ckms.controller.rowmac``); None while sealed."""
        self.audit_blocked: str | None = None
        """Set (to why) while the audit log is known not to extend its last anchor: every audit
        append then fails, so nothing that must be audited happens on a cut log."""
        self._data_version: int | None = None
        self._data_checked = -FOREIGN_CHECK_S
        self.migrated: list[int] = []
        """The migrations this open applied (``ckms store migrate`` reports them)."""

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        password: str | None = None,
    ) -> Store:
        """Open (creating if needed) the store at ``path``, apply migrations, and return it.

        ``path`` is a file path or ``sqlite:PATH`` (SQLite; ``":memory:"`` gives a private
        in-memory database for unit tests), or ``postgresql://user@host:port/db``
        (PostgreSQL, :class:`ckms.store._pg.PgStore`), whose password is ``password`` or else
        the ``PGPASSWORD`` environment, never part of the URL.
        """
        url = parse_store_url(path)
        if url.engine == "postgresql":
            from ckms.store._pg import PgStore  # asyncpg is only needed for PostgreSQL

            return await PgStore.connect(url.target, password=password, migrations=migrations)
        location = url.target
        writer = await _connect(location, read_only=False)
        reader: aiosqlite.Connection | None = None
        try:
            applied = await apply_migrations(writer, migrations)
            if location != _MEMORY:
                reader = await _connect(location, read_only=True)
        except BaseException:
            await _close_quietly(writer)
            raise
        store = cls(location, writer, reader)
        store.migrated = applied
        try:
            await store._watch()
        except BaseException:
            await store.close()
            raise
        log.info("store opened at %s", location)
        return store

    async def _watch(self) -> None:
        """Count committed writes to the :data:`WATCHED` tables (see :meth:`generation`).

        Temporary triggers on the writer connection call back into this process as each row
        changes, so counting costs no extra query; other connections never see them.
        """
        changed = self._changed

        def note(name: str, row_id: object) -> None:
            changed.setdefault(name, set()).add(str(row_id))

        try:
            await self._writer.create_function(_CHANGED_FUNCTION, 2, note)
            tables = {
                str(r[0])
                for r in await self._writer.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            for name, events in WATCHED.items():
                for i, (event, row_id) in enumerate(events):
                    table = event.rsplit(" ON main.", 1)[1]
                    if table not in tables:  # a store opened with other migrations (tests)
                        continue
                    await self._writer.execute(
                        f"CREATE TEMP TRIGGER IF NOT EXISTS ckms_watch_{name}_{i} {event} "
                        f"BEGIN SELECT {_CHANGED_FUNCTION}('{name}', {row_id}); END"
                    )
        except (sqlite3.Error, ValueError) as exc:
            raise _store_error(exc, "cannot watch the store for changes") from exc

    def invalidate(self) -> None:
        """Move every generation, so caches of rows refill (after unseal: now checked)."""
        for name in self._generations:
            self._bump(name, None)  # every row: caches reload in full

    async def generation(self, name: str, *, fresh: bool = False) -> int:
        """How many committed transactions changed ``name`` (a :data:`WATCHED` entry).

        In-memory caches of rarely changing rows (keys, host identities) compare it to the value
        they were filled at, so they never serve a row older than the last commit that changed
        it. This process's own commits are counted by the triggers, at once; a commit by any
        other connection (an operator's tool, another process on the same file) moves the
        writer connection's ``PRAGMA data_version``, looked at most every
        :data:`FOREIGN_CHECK_S`, and then every generation moves. ``fresh`` looks now: a
        caller that knows of a commit it cannot see yet (an event named it) asks so.
        """
        now = time.monotonic()
        if not self.is_memory and (fresh or now - self._data_checked >= FOREIGN_CHECK_S):
            self._data_checked = now
            try:
                rows = await self._writer.execute_fetchall("PRAGMA data_version")
            except (sqlite3.Error, ValueError) as exc:
                raise _store_error(exc, "cannot read the data version") from exc
            version = int(next(iter(rows))[0])
            if version != self._data_version:
                if self._data_version is not None:
                    for watched in self._generations:
                        self._bump(watched, None)  # which rows, another connection never says
                self._data_version = version
        return self._generations[name]

    def _bump(self, name: str, ids: frozenset[str] | None) -> None:
        self._generations[name] += 1
        self._history[name].append((self._generations[name], ids))

    def changed_since(self, name: str, generation: int) -> frozenset[str] | None:
        """The ids of the rows of ``name`` changed by the commits after ``generation`` (as
        returned by :meth:`generation`), or None when that is not known (a commit by another
        connection, or more commits than :data:`CHANGE_HISTORY` ago): reload everything then.

        A cache filled at ``generation`` refreshes just these rows instead of all of them.
        """
        current = self._generations[name]
        if generation == current:
            return frozenset()
        history = self._history[name]
        if generation > current or not history or history[0][0] > generation + 1:
            return None
        out: set[str] = set()
        for gen, ids in reversed(history):
            if gen <= generation:
                break
            if ids is None:
                return None
            out |= ids
        return frozenset(out)

    async def close(self) -> None:
        """Close both connections; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            if self._reader is not None:
                await _close_quietly(self._reader)
            await _close_quietly(self._writer)
        log.info("store closed")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def add_outbox_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every commit that added outbox events (the publisher's wake).

        Without it the publisher only finds a new event at its next poll, up to its poll
        interval (0.5 s) after the commit, on every rotation and revocation.
        """
        self._outbox_listeners.append(callback)

    @property
    def is_memory(self) -> bool:
        """True for an in-memory database (no file, no WAL, no second connection)."""
        return self.path == _MEMORY

    # -- transactions --------------------------------------------------------------------

    def _writer_may_enter(self) -> asyncio.Task[Any] | None:
        """The task asking to write, refused if it already holds the write transaction: an
        asyncio.Lock is not re-entrant, so waiting would deadlock forever (either engine)."""
        self._check_open()
        task = asyncio.current_task()
        if task is not None and self._writer_task is task:
            raise StoreError("nested write transaction: the store has exactly one writer")
        return task

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Transaction]:
        """Run the block as the one writer in one transaction: commit on success, else roll back."""
        task = self._writer_may_enter()
        async with self._write_lock:
            self._check_open()
            self._writer_task = task
            # BEGIN IMMEDIATE runs with the first statement (Reader._call); a block that runs
            # none has nothing to commit.
            tx = Transaction(
                self._writer,
                self._audit_head,
                self.audit_blocked,
                self.row_key,
                begin="BEGIN IMMEDIATE",
            )
            # Unknown until this transaction commits (a failure reads it from the table again).
            self._audit_head = None
            self._changed.clear()
            try:
                if self._writer.in_transaction:
                    # Left open by a COMMIT that failed while its caller was being cancelled.
                    log.warning("rolling back a transaction left open by a cancelled writer")
                    await _rollback(self._writer)
                try:
                    await check_fence(tx)  # leader-only work: the lease must still be ours
                    yield tx
                except BaseException:
                    tx._active = False
                    if tx.begun:
                        await _rollback(self._writer)
                    raise
                tx._active = False
                if tx._deferred_failure is not None:
                    # Its block caught the failure of deferred work and carried on.
                    await _rollback(self._writer)
                    raise StoreError(f"transaction failed earlier: {tx._deferred_failure}")
                if tx.pending:
                    try:
                        # A cancel must not leave before COMMIT's outcome is known: the
                        # generation bump below has to follow a commit that happened.
                        await _uncancellable(tx._commit())
                    except BaseException:
                        # A failed COMMIT, or deferred work that failed before it (then the
                        # transaction is still open, also when a cancel came meanwhile).
                        if _in_transaction(self._writer):
                            await _uncancellable(_rollback(self._writer))
                        raise
                self._audit_head = tx.audit_head
                if tx.wrote_outbox:
                    for listener in self._outbox_listeners:
                        listener()
            finally:
                tx._active = False
                self._writer_task = None
                # Counted on every way out (a rolled-back change only costs a cache refill).
                for name, ids in self._changed.items():
                    self._bump(name, frozenset(ids))
                self._changed.clear()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Reader]:
        """Run the block against one consistent read-only snapshot."""
        self._check_open()
        task = asyncio.current_task()
        if self._reader is None and task is not None and self._writer_task is task:
            raise StoreError("read inside a write transaction: use the transaction to read")
        conn = self._reader if self._reader is not None else self._writer
        async with self._read_lock:
            self._check_open()
            # A deferred BEGIN takes its snapshot at the first statement anyway: it runs with
            # that statement (Reader._call), one trip to the connection's thread fewer.
            reader = Reader(conn, self.row_key, begin="BEGIN")
            try:
                yield reader
            finally:
                reader._active = False
                if reader.begun:
                    await _rollback(conn)

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[Reader]:
        """Like :meth:`read` for exactly one statement, which SQLite already runs in its own
        snapshot (autocommit): no BEGIN and ROLLBACK, each a trip to the connection's thread."""
        self._check_open()
        task = asyncio.current_task()
        if self._reader is None and task is not None and self._writer_task is task:
            raise StoreError("read inside a write transaction: use the transaction to read")
        conn = self._reader if self._reader is not None else self._writer
        async with self._read_lock:
            self._check_open()
            reader = Reader(conn, self.row_key)
            try:
                yield reader
            finally:
                reader._active = False

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one read query in its own snapshot."""
        async with self._statement() as r:
            return await r.fetchall(sql, params)

    async def schema_version(self) -> int:
        """Return the highest migration number applied to this database."""
        async with self.read() as r:
            return int(await r.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")


# -- helpers ---------------------------------------------------------------------------------


async def _connect(location: str, *, read_only: bool) -> aiosqlite.Connection:
    """Open one connection with the pragmas every ckms connection uses."""
    if location != _MEMORY:
        # Surface "cannot open" from a plain connection first: a failed aiosqlite.connect leaves
        # its worker thread to finish after we return, which may be after the loop has closed.
        try:
            await asyncio.to_thread(_probe, location)
        except sqlite3.Error as exc:
            raise _store_error(exc, f"cannot open database {location}") from exc
    try:
        conn = await aiosqlite.connect(location, isolation_level=None)
    except (sqlite3.Error, ValueError) as exc:
        raise _store_error(exc, f"cannot open database {location}") from exc
    conn.row_factory = sqlite3.Row
    try:
        await conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys = ON")
        # Freed pages (e.g. a destroyed version's sealed material) are zeroed, not left behind.
        await conn.execute("PRAGMA secure_delete = ON")
        if location != _MEMORY and not read_only:
            cursor = await conn.execute("PRAGMA journal_mode = WAL")
            row = await cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"cannot switch {location} to WAL mode")
            # FULL in WAL mode: a committed key change survives power loss, not only a crash.
            await conn.execute("PRAGMA synchronous = FULL")
        if read_only:
            await conn.execute("PRAGMA query_only = ON")
    except (sqlite3.Error, ValueError) as exc:
        await _close_quietly(conn)
        raise _store_error(exc, f"cannot open database {location}") from exc
    except BaseException:
        await _close_quietly(conn)
        raise
    return conn


def _probe(location: str) -> None:
    """Open and close a plain connection, raising sqlite3.Error if the file cannot be opened."""
    sqlite3.connect(location).close()


class _BeginFailed(Exception):
    """A transaction's BEGIN failed (its sqlite3 error is the cause), not its first statement."""


async def _on_thread(conn: aiosqlite.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``work(sqlite3 connection)`` on ``conn``'s own thread, in its queue of statements.

    The one place that reaches into aiosqlite: its public calls run one statement per trip to
    the thread, and a transaction's BEGIN goes with its first statement (``Reader._call``).
    """
    return await conn._execute(lambda: work(conn._conn))


DEFER_AT_MOST = 32
"""Deferred work a transaction queues before it runs it (:meth:`Transaction.defer`)."""


def _nothing(conn: sqlite3.Connection) -> None:
    """A trip's work when only the deferred work before it is wanted."""


def _sql_runner(conn: sqlite3.Connection) -> RunSql:
    """What deferred work is handed: one statement on ``conn``, sqlite errors as StoreError."""

    def run(sql: str, params: Params) -> list[Any]:
        try:
            return conn.execute(sql, params).fetchall()
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            raise _store_error(exc, "write failed") from exc

    return run


async def _run(conn: aiosqlite.Connection, sql: str, what: str) -> None:
    """Run one statement without parameters, mapping errors."""
    try:
        await conn.execute(sql)
    except (sqlite3.Error, ValueError) as exc:
        raise _store_error(exc, what) from exc


async def _uncancellable(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled (any number of times)
    meanwhile; then re-raise the cancel, or ``work``'s own error."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller's cleanup handles a failed COMMIT
        raise cancelled
    return task.result()


def _in_transaction(conn: aiosqlite.Connection) -> bool:
    """Whether ``conn`` has a transaction open (False once it is closed: nothing to undo)."""
    try:
        return conn.in_transaction
    except ValueError:  # aiosqlite: no active connection
        return False


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open; never raises (the original error matters more)."""
    # No transaction active, or the connection is gone: nothing to undo either way.
    with contextlib.suppress(sqlite3.Error, ValueError):
        await conn.execute("ROLLBACK")


async def _close_quietly(conn: aiosqlite.Connection) -> None:
    """Close a connection, logging instead of raising."""
    try:
        await conn.close()
    except Exception:
        log.warning("error while closing a database connection", exc_info=True)


async def apply_migrations(
    conn: aiosqlite.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """Apply, in order, each migration not yet recorded in ``schema_version``; return those applied.

    Each migration runs in its own transaction together with its ``schema_version`` row, so a
    failure leaves the database at the previous version. Applying twice is a no-op.
    """
    numbers = [m.version for m in migrations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise StoreError("migrations must be numbered 1, 2, 3, ... without gaps")
    await _run(
        conn,
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
        "cannot create schema_version",
    )
    try:
        rows = await conn.execute_fetchall("SELECT version FROM schema_version")
    except (sqlite3.Error, ValueError) as exc:
        raise _store_error(exc, "cannot read schema_version") from exc
    applied = {int(r[0]) for r in rows}
    newest = max(applied, default=0)
    if newest > len(migrations):
        raise StoreError(
            f"database schema version {newest} is newer than this ckms knows "
            f"({len(migrations)}); upgrade ckms"
        )
    done: list[int] = []
    for migration in migrations:
        if migration.version in applied:
            continue
        stamp = format_time(utc_now()).replace("'", "")
        name = migration.name.replace("'", "''")
        script = (
            "BEGIN IMMEDIATE;\n"
            f"{migration.sql}\n"
            "INSERT INTO schema_version(version, name, applied_at) "
            f"VALUES ({int(migration.version)}, '{name}', '{stamp}');\n"
            "COMMIT;\n"
        )
        try:
            await conn.executescript(script)
        except (sqlite3.Error, ValueError) as exc:
            await _rollback(conn)
            raise _store_error(
                exc, f"migration {migration.version} ({migration.name}) failed"
            ) from exc
        log.info("applied migration %d (%s)", migration.version, migration.name)
        done.append(migration.version)
    return done
