"""Backups of a running controller (restoring one: :mod:`ckms.controller.restore`).

A backup is one consistent copy of the store, made with SQLite's online backup API from a
connection of its own while the controller keeps serving (WAL: the copy is one read snapshot,
writers go on). Material in it stays sealed under the root KEK, so a backup is useless without
the custodians' shares or the passphrase. The controller writes the copy into
``<home>/backups/`` (directory 0700, file 0600, written under a temporary name, fsynced, then
renamed) and the operator's ``ckms backup`` reads it back over the admin RPC in chunks, checks
size and SHA-256, and writes its own file the same way. Each backup is audited
(``controller.backup``) with the audit head it contains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from ckms.controller.sealing import META_SIGNING_PUBLIC
from ckms.crypto import signer_key_id
from ckms.errors import (
    ConfigError,
    NotFoundError,
    StoreError,
)
from ckms.store import MIGRATIONS, Clock, Store, read_only_uri, utc_now
from ckms.store import audit as audit_log

__all__ = [
    "BACKUP_DIR",
    "CHUNK_MAX",
    "BackupFacts",
    "Backups",
    "inspect_backup",
]

BACKUP_DIR: Final = "backups"
CHUNK_MAX: Final = 1024 * 1024
"""Largest chunk one ``backup.read`` returns (base64 keeps the reply well under its bound)."""
KEEP_FOR: Final = timedelta(hours=1)
"""A backup the operator did not fetch and delete is removed by the next backup once this old."""
_ID_RE: Final = re.compile(r"^b-[0-9a-f]{16}$")


@dataclass(frozen=True)
class BackupFacts:
    """What a backup file holds: its size and hash, schema, and the audit log it contains."""

    size: int
    sha256: str
    schema_version: int
    keys: int
    versions: int
    audit_size: int
    audit_head: str
    checkpoint_size: int | None
    checkpoint_head: str | None
    signer_key_id: str | None


def _snapshot(db_path: str, target: Path) -> None:
    """Copy the database at ``db_path`` to ``target`` with the online backup API (one step:
    one read snapshot; the controller's writer is not held up in WAL mode)."""
    source = sqlite3.connect(read_only_uri(db_path), uri=True)
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        finally:
            dest.close()
    finally:
        source.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_MAX):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_backup(path: Path) -> BackupFacts:
    """Read a backup file's facts, refusing anything that is not an intact ckms store.

    Blocking (SQLite and hashing): call it in a worker thread from async code.
    """
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        conn = sqlite3.connect(read_only_uri(path, immutable=True), uri=True)
    except sqlite3.Error:
        raise ConfigError(f"{path} is not a SQLite database") from None
    try:
        try:
            (check,) = conn.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise ConfigError(f"{path} fails SQLite's integrity check: {str(check)[:200]}")
            schema = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            (version,) = schema.fetchone()
            public = conn.execute(
                "SELECT value FROM meta WHERE name = ?", (META_SIGNING_PUBLIC,)
            ).fetchone()
            keys = conn.execute("SELECT count(*) FROM keys").fetchone()[0]
            versions = conn.execute("SELECT count(*) FROM key_versions").fetchone()[0]
            head = conn.execute("SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1").fetchone()
            cp = conn.execute(
                "SELECT size, head_hash FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
        except sqlite3.DatabaseError:
            raise ConfigError(f"{path} is not a ckms controller store") from None
    finally:
        conn.close()
    if int(version) > len(MIGRATIONS):
        raise ConfigError(
            f"{path} has schema version {version}; this ckms knows up to {len(MIGRATIONS)} "
            "(restore it with a newer ckms)"
        )
    if public is None:
        raise ConfigError(f"{path} is a store that was never initialised (no signing key)")
    return BackupFacts(
        size=path.stat().st_size,
        sha256=_sha256(path),
        schema_version=int(version),
        keys=int(keys),
        versions=int(versions),
        audit_size=0 if head is None else int(head[0]) + 1,
        audit_head="" if head is None else str(head[1]),
        checkpoint_size=None if cp is None else int(cp[0]),
        checkpoint_head=None if cp is None else str(cp[1]),
        signer_key_id=signer_key_id(bytes(public[0])),
    )


class Backups:
    """The controller's side: make a backup file, hand it out in chunks, remove it."""

    def __init__(self, store: Store, home: Path, *, clock: Clock = utc_now) -> None:
        self._store = store
        self._dir = home / BACKUP_DIR
        self._clock = clock
        self._lock = asyncio.Lock()

    def _path(self, backup_id: str) -> Path:
        if not _ID_RE.match(backup_id):
            raise NotFoundError(f"no backup {backup_id[:40]!r}")
        path = self._dir / f"{backup_id}.db"
        if not path.is_file():
            raise NotFoundError(f"no backup {backup_id} (fetched and deleted, or swept)")
        return path

    async def create(self, *, actor: str) -> tuple[str, BackupFacts]:
        """Copy the store now (online) and audit it; return the backup's id and facts."""
        if self._store.is_memory:
            raise ConfigError("an in-memory store cannot be backed up")
        if self._store.dialect.name != "sqlite":
            raise ConfigError(
                "ckms backup copies a SQLite store file; back a PostgreSQL store up with "
                "PostgreSQL's own tools (pg_dump, base backups, replication)"
            )
        async with self._lock:  # one copy at a time: each is the whole database
            await asyncio.to_thread(self._sweep)
            backup_id = "b-" + secrets.token_hex(8)
            facts = await asyncio.to_thread(self._make, backup_id)
            async with self._store.write() as tx:
                await audit_log.append(
                    tx,
                    now=self._clock(),
                    actor=actor,
                    action="controller.backup",
                    object="controller",
                    details={
                        "backup": backup_id,
                        "size": facts.size,
                        "sha256": facts.sha256,
                        "audit_size": facts.audit_size,
                        "audit_head": facts.audit_head,
                        "checkpoint_size": facts.checkpoint_size,
                    },
                )
        return backup_id, facts

    def _make(self, backup_id: str) -> BackupFacts:
        self._dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self._dir, 0o700)
        final = self._dir / f"{backup_id}.db"
        tmp = self._dir / f".{backup_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        try:
            _snapshot(self._store.path, tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except sqlite3.Error as exc:
            raise StoreError(f"backup failed: {type(exc).__name__}: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return inspect_backup(final)

    def _sweep(self) -> None:
        """Remove backups older than :data:`KEEP_FOR` and temporary files of failed ones."""
        if not self._dir.is_dir():
            return
        cutoff = datetime.now().timestamp() - KEEP_FOR.total_seconds()
        for path in self._dir.iterdir():
            with contextlib.suppress(OSError):
                if path.name.endswith(".tmp") or path.stat().st_mtime < cutoff:
                    path.unlink()

    async def read(self, backup_id: str, offset: int, length: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes of a backup from ``offset``, and the backup's size."""
        path = self._path(backup_id)

        def chunk() -> tuple[bytes, int]:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                return f.read(min(length, CHUNK_MAX)), size

        return await asyncio.to_thread(chunk)

    async def facts(self, backup_id: str) -> BackupFacts:
        """What a backup made earlier holds (size, SHA-256, audit head), read from its file:
        a backup an approved dual-control request made is fetched later, by its id."""
        return await asyncio.to_thread(inspect_backup, self._path(backup_id))

    async def delete(self, backup_id: str) -> None:
        """Remove a fetched backup from the controller's home."""
        path = self._path(backup_id)
        await asyncio.to_thread(path.unlink)
