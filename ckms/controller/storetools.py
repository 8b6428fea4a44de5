"""The store commands run beside a stopped controller: ``ckms store migrate`` and ``ckms store
copy`` (how a SQLite store moves to PostgreSQL).

A copy is checked at both ends: the source's audit log must verify under the controller's own
signing key before anything is copied (a copy would carry a tampered log along, looking
fresh), and the copy's must verify afterwards with the same size and head, so the copy holds
the whole history and nothing else. Row MACs are copied as stored: they bind rows to the root
KEK, not to the engine, and are checked again at the first unseal on the new store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckms._secret_file import read_secret_file
from ckms.controller.sealing import META_SIGNING_PUBLIC
from ckms.errors import AuditVerificationError, ConfigError, StoreError
from ckms.store import Store, parse_store_url
from ckms.store import audit as audit_log
from ckms.store.copy import CopyReport, copy_rows


@dataclass(frozen=True)
class MigrateResult:
    """Where the store is, the migrations this run applied, and the version it is at now."""

    store: str
    engine: str
    applied: list[int]
    version: int


async def migrate_store(location: str, *, password: str | None = None) -> MigrateResult:
    """Apply the pending migrations to the store at ``location``; report what was done."""
    url = parse_store_url(location)
    _require_sqlite_file(url.engine, url.target, "store")
    async with await Store.open(url.target, password=password) as store:
        return MigrateResult(str(url), url.engine, store.migrated, await store.schema_version())


@dataclass(frozen=True)
class CopyResult:
    """What a copy moved and the verdict on the copy's audit log."""

    source: str
    target: str
    copied: CopyReport
    audit: audit_log.AuditReport


async def copy_store(
    source: str,
    target: str,
    *,
    source_password: str | None = None,
    target_password: str | None = None,
) -> CopyResult:
    """Copy the store at ``source`` into the new, empty store at ``target`` (one transaction
    there), both migrated to this version first; the copy's audit log is verified."""
    src_url, dst_url = parse_store_url(source), parse_store_url(target)
    _require_sqlite_file(src_url.engine, src_url.target, "--from")
    if str(src_url) == str(dst_url):
        raise ConfigError("--from and --to name the same store")
    async with await Store.open(src_url.target, password=source_password) as src:
        public = await src.get_meta(META_SIGNING_PUBLIC)
        if public is None:
            raise ConfigError(f"{src_url} holds no initialised controller store (run ckms init)")
        before = await audit_log.verify_store(src, public)
        if not before.ok:
            raise AuditVerificationError(
                f"the source's audit log does not verify ({before.reason}): nothing copied",
                before.first_bad_index,
            )
        async with await Store.open(dst_url.target, password=target_password) as dst:
            copied = await copy_rows(src, dst)
            after = await audit_log.verify_store(dst, public)
    if not after.ok or (after.size, after.head_hash) != (before.size, before.head_hash):
        raise StoreError(
            f"the copy's audit log does not match the source's ({after.reason or 'size or head'}"
            "): do not use the target"
        )
    return CopyResult(str(src_url), str(dst_url), copied, after)


def _require_sqlite_file(engine: str, target: str, what: str) -> None:
    """A SQLite store named to be read must exist: opening one creates an empty file."""
    if engine == "sqlite" and not Path(target).is_file():
        raise ConfigError(f"{what}: there is no SQLite store file {target}")


def read_password_file(path: Path, what: str) -> str:
    """A PostgreSQL password from its own file, refused when others may read it."""
    return read_secret_file(path, what)
