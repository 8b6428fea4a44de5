"""The agent's own state: what it holds, where it reads events, what it still has to ack.

One SQLite file (aiosqlite, WAL, ``synchronous=FULL``; the volume is tiny and an ack must not be
lost to a power cut) with ordered migrations tracked in ``PRAGMA user_version``. It never holds
key material: the files on disk are the material; the DB holds digests of each version and a
SHA-256 of each file the agent wrote, so drift (a file edited or deleted behind the agent's
back) is noticed before the agent reports it as installed.

Schema (migration 1):

- ``meta(name, value)``: ``last_contact`` (epoch seconds of the last successful RPC),
  ``ack_seq`` (the agent's monotonic ack counter), ``revoked`` (set by ``host.revoked``).
- ``keys(name, key_type, install_spec JSON, max_staleness_s, updated_at)``.
- ``key_versions(key, version, state, is_primary, digest)``: every version the host holds.
- ``key_files(key, path, file_sha256)``: every file written for the key (root-prefixed path).
- ``kafka_positions(topic, partition, next_offset, last_seq)``: the ``Subscriber`` positions.
- ``pending_acks(seq, key, version, status, msg_key, value, headers, created_at)``: acks are
  signed and written here first, then published and deleted, so none is lost while Kafka is down
  or across restarts; ``seq`` is the ack's envelope ``seq``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiosqlite
from pydantic import ValidationError

from ckms.consumer import Position
from ckms.errors import StoreError
from ckms.protocol import InstallSpec, SignedMessage

log = logging.getLogger(__name__)

_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "initial",
        """
        CREATE TABLE meta (
            name    TEXT PRIMARY KEY,
            value   TEXT NOT NULL
        );
        CREATE TABLE keys (
            name            TEXT PRIMARY KEY,
            key_type        TEXT NOT NULL,
            install_spec    TEXT NOT NULL,
            max_staleness_s INTEGER,
            updated_at      REAL NOT NULL
        );
        CREATE TABLE key_versions (
            key         TEXT NOT NULL REFERENCES keys(name) ON DELETE CASCADE,
            version     INTEGER NOT NULL CHECK (version >= 1),
            state       TEXT NOT NULL,
            is_primary  INTEGER NOT NULL CHECK (is_primary IN (0, 1)),
            digest      TEXT NOT NULL CHECK (digest LIKE 'sha256:%'),
            PRIMARY KEY (key, version)
        );
        CREATE TABLE key_files (
            key         TEXT NOT NULL REFERENCES keys(name) ON DELETE CASCADE,
            path        TEXT NOT NULL,
            file_sha256 TEXT NOT NULL,
            PRIMARY KEY (key, path)
        );
        CREATE TABLE kafka_positions (
            topic       TEXT NOT NULL,
            partition   INTEGER NOT NULL,
            next_offset INTEGER NOT NULL,
            last_seq    INTEGER,
            PRIMARY KEY (topic, partition)
        );
        CREATE TABLE pending_acks (
            seq         INTEGER PRIMARY KEY,
            key         TEXT NOT NULL,
            version     INTEGER NOT NULL,
            status      TEXT NOT NULL,
            msg_key     BLOB NOT NULL,
            value       BLOB NOT NULL,
            headers     TEXT NOT NULL,
            created_at  REAL NOT NULL
        );
        """,
    ),
)

SCHEMA_VERSION = _MIGRATIONS[-1][0]


@dataclass(frozen=True)
class VersionRecord:
    """One version the host holds: its state, whether it is primary, its material digest."""

    version: int
    state: str
    primary: bool
    digest: str


@dataclass(frozen=True)
class KeyRecord:
    """One key the host holds: how it was installed, its versions and the files written."""

    name: str
    key_type: str
    spec: InstallSpec
    versions: Mapping[int, VersionRecord]
    files: Mapping[Path, str] = field(default_factory=dict)
    max_staleness_s: int | None = None
    updated_at: float = 0.0

    @property
    def primary(self) -> VersionRecord | None:
        """The primary version, if the host holds one."""
        return next((v for v in self.versions.values() if v.primary), None)

    @property
    def paths(self) -> list[Path]:
        """The files written for this key."""
        return sorted(self.files)


@dataclass(frozen=True)
class PendingAck:
    """A signed ack waiting to be published (exact bytes, ready for the producer)."""

    seq: int
    key: str
    version: int
    status: str
    message: SignedMessage
    created_at: float


class AgentState:
    """``async with AgentState(path) as state:`` — the agent's SQLite state (see module doc)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AgentState:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (creating with mode 0600 if missing) and migrate the database."""
        if self._db is not None:
            return
        target = str(self.path)
        with _mapped(f"cannot open agent state {self.path}"):
            if target != ":memory:":
                _create_private(Path(target))
            db = await aiosqlite.connect(target, isolation_level=None)
        try:
            with _mapped(f"cannot open agent state {self.path}"):
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=FULL")
                await db.execute("PRAGMA foreign_keys=ON")
                await db.execute("PRAGMA busy_timeout=5000")
            self._db = db
            await self._migrate()
        except BaseException:
            self._db = None
            await db.close()
            raise

    async def close(self) -> None:
        """Close the database; safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("agent state is not open")
        return self._db

    async def _migrate(self) -> None:
        async with self._conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"agent state {self.path} has schema {current}, newer than this agent "
                f"({SCHEMA_VERSION}): upgrade ckms-agent"
            )
        for version, name, sql in _MIGRATIONS:
            if version <= current:
                continue
            with _mapped(f"migration {version} ({name}) of {self.path} failed"):
                await self._conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version={version};\nCOMMIT;"
                )
            log.info("agent state %s migrated to schema %d (%s)", self.path, version, name)

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time (the agent's tasks share one connection)."""
        async with self._lock:
            conn = self._conn
            with _mapped(f"write to agent state {self.path} failed"):
                if conn.in_transaction:
                    # Left open by a task cancelled while its BEGIN was in flight: the statement
                    # still ran in the connection's thread. Nothing in it was committed; drop it.
                    log.warning("rolling back a transaction a cancelled task left open")
                    await conn.execute("ROLLBACK")
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")

    async def _rows(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return await self._rows_locked(sql, params)

    async def _rows_locked(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        with _mapped(f"read from agent state {self.path} failed"):
            # One trip to the connection's thread, not three (execute, fetchall, close).
            return list(await self._conn.execute_fetchall(sql, tuple(params)))

    # -- meta ---------------------------------------------------------------------------------

    async def _meta(self, name: str) -> str | None:
        rows = await self._rows("SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def _set_meta(self, name: str, value: str) -> None:
        async with self._tx() as conn:
            await _upsert_meta(conn, name, value)

    async def last_contact(self) -> float | None:
        """Epoch seconds of the last successful request to the controller (None: never)."""
        value = await self._meta("last_contact")
        return float(value) if value is not None else None

    async def set_last_contact(self, at: float) -> None:
        """Record a successful request to the controller."""
        await self._set_meta("last_contact", repr(float(at)))

    async def revoked(self) -> bool:
        """True once the controller revoked this host (a ``host.revoked`` event)."""
        return await self._meta("revoked") == "1"

    async def set_revoked(self, revoked: bool) -> None:
        """Mark this host revoked (or clear it on re-enrollment)."""
        await self._set_meta("revoked", "1" if revoked else "0")

    async def ack_seq(self) -> int:
        """The last ack sequence number used (0: none yet)."""
        value = await self._meta("ack_seq")
        return int(value) if value is not None else 0

    # -- keys ---------------------------------------------------------------------------------

    async def keys(self) -> dict[str, KeyRecord]:
        """Every key the host holds, by name."""
        async with self._lock:  # one consistent snapshot of the three tables
            key_rows = await self._rows_locked(
                "SELECT name, key_type, install_spec, max_staleness_s, updated_at FROM keys"
            )
            version_rows = await self._rows_locked(
                "SELECT key, version, state, is_primary, digest FROM key_versions ORDER BY version"
            )
            file_rows = await self._rows_locked(
                "SELECT key, path, file_sha256 FROM key_files ORDER BY path"
            )
        versions: dict[str, dict[int, VersionRecord]] = {}
        for key, version, state, primary, digest in version_rows:
            versions.setdefault(key, {})[int(version)] = VersionRecord(
                int(version), str(state), bool(primary), str(digest)
            )
        files: dict[str, dict[Path, str]] = {}
        for key, path, sha in file_rows:
            files.setdefault(key, {})[Path(path)] = str(sha)
        out: dict[str, KeyRecord] = {}
        for name, key_type, spec_json, staleness, updated_at in key_rows:
            try:
                spec = InstallSpec.model_validate_json(spec_json)
            except ValidationError:
                raise StoreError(f"agent state has a bad install spec for {name}") from None
            out[name] = KeyRecord(
                name=name,
                key_type=key_type,
                spec=spec,
                versions=versions.get(name, {}),
                files=files.get(name, {}),
                max_staleness_s=None if staleness is None else int(staleness),
                updated_at=float(updated_at),
            )
        return out

    async def key(self, name: str) -> KeyRecord | None:
        """One held key, or None."""
        return (await self.keys()).get(name)

    async def put_key(self, record: KeyRecord) -> None:
        """Replace everything recorded about one key (versions and files) in one transaction."""
        async with self._tx() as conn:
            await conn.execute("DELETE FROM keys WHERE name = ?", (record.name,))
            await conn.execute(
                "INSERT INTO keys (name, key_type, install_spec, max_staleness_s, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.key_type,
                    record.spec.model_dump_json(),
                    record.max_staleness_s,
                    record.updated_at,
                ),
            )
            await conn.executemany(
                "INSERT INTO key_versions (key, version, state, is_primary, digest) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (record.name, v.version, v.state, int(v.primary), v.digest)
                    for v in record.versions.values()
                ],
            )
            await conn.executemany(
                "INSERT INTO key_files (key, path, file_sha256) VALUES (?, ?, ?)",
                [(record.name, str(p), sha) for p, sha in record.files.items()],
            )

    async def forget_key(self, name: str) -> None:
        """Drop a key (its versions and files go with it)."""
        async with self._tx() as conn:
            await conn.execute("DELETE FROM keys WHERE name = ?", (name,))

    # -- acks ---------------------------------------------------------------------------------

    async def enqueue_ack(
        self,
        build: Callable[[int], SignedMessage],
        *,
        key: str,
        version: int,
        status: str,
        now: float,
    ) -> int:
        """Take the next ack seq, sign the ack with it (``build``) and queue it, atomically."""
        async with self._tx() as conn:
            rows = await conn.execute_fetchall("SELECT value FROM meta WHERE name = 'ack_seq'")
            row = next(iter(rows), None)
            seq = (int(row[0]) if row else 0) + 1
            message = build(seq)
            headers = json.dumps([[k, base64.b64encode(v).decode()] for k, v in message.headers])
            await conn.execute(
                "INSERT INTO pending_acks "
                "(seq, key, version, status, msg_key, value, headers, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, key, version, status, message.key, message.value, headers, now),
            )
            await _upsert_meta(conn, "ack_seq", str(seq))
        return seq

    async def pending_acks(self, limit: int = 100) -> list[PendingAck]:
        """The oldest queued acks, in seq order."""
        rows = await self._rows(
            "SELECT seq, key, version, status, msg_key, value, headers, created_at "
            "FROM pending_acks ORDER BY seq LIMIT ?",
            (limit,),
        )
        out = []
        for seq, key, version, status, msg_key, value, headers, created_at in rows:
            hdrs = tuple((str(k), base64.b64decode(v)) for k, v in json.loads(headers))
            out.append(
                PendingAck(
                    seq=int(seq),
                    key=str(key),
                    version=int(version),
                    status=str(status),
                    message=SignedMessage(value=bytes(value), headers=hdrs, key=bytes(msg_key)),
                    created_at=float(created_at),
                )
            )
        return out

    async def delete_acks(self, seqs: Iterable[int]) -> None:
        """Forget acks the broker has acknowledged."""
        async with self._tx() as conn:
            await conn.executemany("DELETE FROM pending_acks WHERE seq = ?", [(s,) for s in seqs])

    async def pending_ack_count(self) -> int:
        """How many acks wait for Kafka."""
        rows = await self._rows("SELECT COUNT(*) FROM pending_acks")
        return int(rows[0][0])

    # -- Kafka positions ----------------------------------------------------------------------

    async def load_positions(self, topic: str) -> dict[int, Position]:
        """The saved positions of ``topic`` by partition."""
        rows = await self._rows(
            "SELECT partition, next_offset, last_seq FROM kafka_positions WHERE topic = ?",
            (topic,),
        )
        return {int(p): Position(int(o), None if s is None else int(s)) for p, o, s in rows}

    async def save_positions(self, topic: str, positions: Mapping[int, Position]) -> None:
        """Save the positions of ``topic`` (all partitions in one transaction)."""
        async with self._tx() as conn:
            await conn.executemany(
                "INSERT INTO kafka_positions (topic, partition, next_offset, last_seq) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE SET "
                "next_offset = excluded.next_offset, last_seq = excluded.last_seq",
                [(topic, p, pos.offset, pos.last_seq) for p, pos in sorted(positions.items())],
            )

    async def reset_positions(self) -> None:
        """Forget every position (re-enrollment starts again from the end of the topic)."""
        async with self._tx() as conn:
            await conn.execute("DELETE FROM kafka_positions")

    def offset_store(self) -> StateOffsetStore:
        """This DB as the ``OffsetStore`` of a :class:`ckms.consumer.Subscriber`."""
        return StateOffsetStore(self)


class StateOffsetStore:
    """The ``ckms.consumer.OffsetStore`` protocol over the agent's state DB."""

    def __init__(self, state: AgentState) -> None:
        self._state = state

    async def load(self, topic: str) -> dict[int, Position]:
        """Return the saved positions of ``topic``."""
        return await self._state.load_positions(topic)

    async def save(self, topic: str, positions: Mapping[int, Position]) -> None:
        """Durably save the positions of ``topic``."""
        await self._state.save_positions(topic, positions)


def _create_private(path: Path) -> None:
    """Create the DB file with mode 0600 before SQLite does (its WAL files copy the mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))


async def _upsert_meta(conn: aiosqlite.Connection, name: str, value: str) -> None:
    await conn.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Translate sqlite and OS errors into StoreError where they enter (STYLE §2)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{what}: {exc.strerror or exc}") from exc
