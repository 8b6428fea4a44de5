"""The agent's own state: what it holds, where it reads events, what it still has to ack.

One SQLite file (WAL, ``synchronous=FULL``; the volume is tiny and an ack
must not be lost to a power cut) with ordered migrations tracked in ``PRAGMA user_version``. It
never holds key material: the files on disk are the material; the DB holds digests of each
version and a SHA-256 of each file the agent wrote, so drift (a file edited or deleted behind
the agent's back) is noticed before the agent reports it as installed.

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

Migration 2 lets ``key_versions.digest`` hold keyed digests (``hmac-sha256:``) beside the plain
``sha256:`` ones written before digests were keyed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from pydantic import ValidationError

from ckms.consumer import Position
from ckms.errors import StoreError
from ckms.protocol import InstallSpec, SignedMessage

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    (
        2,
        "keyed digests",
        """
        CREATE TABLE key_versions_v2 (
            key         TEXT NOT NULL REFERENCES keys(name) ON DELETE CASCADE,
            version     INTEGER NOT NULL CHECK (version >= 1),
            state       TEXT NOT NULL,
            is_primary  INTEGER NOT NULL CHECK (is_primary IN (0, 1)),
            digest      TEXT NOT NULL
                        CHECK (digest LIKE 'hmac-sha256:%' OR digest LIKE 'sha256:%'),
            PRIMARY KEY (key, version)
        );
        INSERT INTO key_versions_v2 SELECT key, version, state, is_primary, digest
            FROM key_versions;
        DROP TABLE key_versions;
        ALTER TABLE key_versions_v2 RENAME TO key_versions;
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
    """``async with AgentState(path) as state:`` — the agent's SQLite state (see module doc).

    Every method runs a whole transaction (or one consistent read) in one synchronous call on
    the event loop: the DB is tiny and local, its statements take microseconds, and a trip to a
    worker thread and back cost ~120 µs of CPU per call — more than the statements and most of
    a commit (measured; that added up when many agents share a core). A commit's fsync blocks
    the loop for well under a millisecond on a local disk, which an agent (one host, one job)
    can afford. A call cannot be interrupted half-way, so a cancelled task never leaves a
    transaction open. ``keys()`` is served from memory between writes (this object is the only
    writer of its file).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._keys: dict[str, KeyRecord] | None = None

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
        with _mapped(f"cannot open agent state {self.path}"):
            self._db = _connect(str(self.path))
        try:
            await self._run(f"cannot open agent state {self.path}", _migrate, self.path)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the database; safe to call twice."""
        db, self._db = self._db, None
        self._keys = None
        if db is not None:
            db.close()

    async def _run(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)``; sqlite and OS errors become StoreError."""
        db = self._db
        if db is None:
            raise StoreError("agent state is not open")
        with _mapped(what):
            return fn(db, *args)

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)`` as one write transaction, in one call on the event loop."""
        return await self._run(f"write to agent state {self.path} failed", _in_tx, fn, *args)

    async def _rows(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        return await self._run(f"read from agent state {self.path} failed", _rows, sql, params)

    # -- meta ---------------------------------------------------------------------------------

    async def _meta(self, name: str) -> str | None:
        rows = await self._rows("SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def _set_meta(self, name: str, value: str) -> None:
        await self._write(_upsert_meta, name, value)

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

    async def tls_certs(self) -> dict[str, dict[str, object]]:
        """What :class:`ckms_agent.certs.CertKeeper` installed, by key (no private key)."""
        value = await self._meta("tls_certs")
        return json.loads(value) if value else {}

    async def set_tls_certs(self, records: dict[str, dict[str, object]]) -> None:
        """Record what the certificate keeper installed."""
        await self._set_meta("tls_certs", json.dumps(records, sort_keys=True))

    async def ack_seq(self) -> int:
        """The last ack sequence number used (0: none yet)."""
        value = await self._meta("ack_seq")
        return int(value) if value is not None else 0

    # -- keys ---------------------------------------------------------------------------------

    async def keys(self) -> dict[str, KeyRecord]:
        """Every key the host holds, by name (a fresh dict; the records are immutable)."""
        if self._keys is None:
            self._keys = await self._run(f"read from agent state {self.path} failed", _load_keys)
        return dict(self._keys)

    async def key(self, name: str) -> KeyRecord | None:
        """One held key, or None."""
        return (await self.keys()).get(name)

    async def put_key(self, record: KeyRecord) -> None:
        """Replace everything recorded about one key (versions and files) in one transaction."""
        cached, self._keys = self._keys, None
        await self._write(_put_key, record, record.spec.model_dump_json())
        if cached is not None:  # as a reload would give it: versions and files in order
            cached[record.name] = replace(
                record,
                versions=dict(sorted(record.versions.items())),
                files=dict(sorted(record.files.items(), key=lambda item: str(item[0]))),
            )
            self._keys = cached

    async def forget_key(self, name: str) -> None:
        """Drop a key (its versions and files go with it)."""
        cached, self._keys = self._keys, None
        await self._write(_forget_key, name)
        if cached is not None:
            cached.pop(name, None)
            self._keys = cached

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
        return await self._write(_enqueue_ack, build, key, version, status, now)

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
        await self._write(
            _executemany, "DELETE FROM pending_acks WHERE seq = ?", [(s,) for s in seqs]
        )

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
        await self._write(
            _executemany,
            "INSERT INTO kafka_positions (topic, partition, next_offset, last_seq) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE SET "
            "next_offset = excluded.next_offset, last_seq = excluded.last_seq",
            [(topic, p, pos.offset, pos.last_seq) for p, pos in sorted(positions.items())],
        )

    async def reset_positions(self) -> None:
        """Forget every position (re-enrollment starts again from the end of the topic)."""
        await self._write(_executemany, "DELETE FROM kafka_positions", [()])

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


# -- one call each ---------------------------------------------------------------------------


def _connect(target: str) -> sqlite3.Connection:
    if target != ":memory:":
        _create_private(Path(target))
    db = sqlite3.connect(target, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path | str) -> None:
    current = int(db.execute("PRAGMA user_version").fetchone()[0])
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"agent state {path} has schema {current}, newer than this agent "
            f"({SCHEMA_VERSION}): upgrade ckms-agent"
        )
    for version, name, sql in _MIGRATIONS:
        if version <= current:
            continue
        try:
            db.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version={version};\nCOMMIT;")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"migration {version} ({name}) of {path} failed: {exc}") from exc
        log.info("agent state %s migrated to schema %d (%s)", path, version, name)


def _in_tx(db: sqlite3.Connection, fn: Callable[..., T], *args: object) -> T:
    """``fn(db, *args)`` inside BEGIN IMMEDIATE … COMMIT; rolled back if anything raises."""
    if db.in_transaction:  # pragma: no cover - every trip ends its own transaction
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db, *args)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return result


def _rows(db: sqlite3.Connection, sql: str, params: Iterable[object]) -> list[sqlite3.Row]:
    return db.execute(sql, tuple(params)).fetchall()


def _executemany(db: sqlite3.Connection, sql: str, rows: list[tuple[object, ...]]) -> None:
    db.executemany(sql, rows)


def _upsert_meta(db: sqlite3.Connection, name: str, value: str) -> None:
    db.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def _load_keys(db: sqlite3.Connection) -> dict[str, KeyRecord]:
    """Every held key from one snapshot of the three tables."""
    db.execute("BEGIN")
    try:
        key_rows = db.execute(
            "SELECT name, key_type, install_spec, max_staleness_s, updated_at FROM keys"
        ).fetchall()
        version_rows = db.execute(
            "SELECT key, version, state, is_primary, digest FROM key_versions ORDER BY version"
        ).fetchall()
        file_rows = db.execute(
            "SELECT key, path, file_sha256 FROM key_files ORDER BY path"
        ).fetchall()
    finally:
        db.execute("ROLLBACK")
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


def _put_key(db: sqlite3.Connection, record: KeyRecord, spec_json: str) -> None:
    db.execute("DELETE FROM keys WHERE name = ?", (record.name,))
    db.execute(
        "INSERT INTO keys (name, key_type, install_spec, max_staleness_s, updated_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (record.name, record.key_type, spec_json, record.max_staleness_s, record.updated_at),
    )
    db.executemany(
        "INSERT INTO key_versions (key, version, state, is_primary, digest) VALUES (?, ?, ?, ?, ?)",
        [
            (record.name, v.version, v.state, int(v.primary), v.digest)
            for v in record.versions.values()
        ],
    )
    db.executemany(
        "INSERT INTO key_files (key, path, file_sha256) VALUES (?, ?, ?)",
        [(record.name, str(p), sha) for p, sha in record.files.items()],
    )


def _forget_key(db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM keys WHERE name = ?", (name,))


def _enqueue_ack(
    db: sqlite3.Connection,
    build: Callable[[int], SignedMessage],
    key: str,
    version: int,
    status: str,
    now: float,
) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'ack_seq'").fetchone()
    seq = (int(row[0]) if row else 0) + 1
    message = build(seq)
    headers = json.dumps([[k, base64.b64encode(v).decode()] for k, v in message.headers])
    db.execute(
        "INSERT INTO pending_acks (seq, key, version, status, msg_key, value, headers, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, key, version, status, message.key, message.value, headers, now),
    )
    _upsert_meta(db, "ack_seq", str(seq))
    return seq


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Translate sqlite and OS errors into StoreError where they enter."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{what}: {exc.strerror or exc}") from exc
