"""Rows ⇄ models for keys, versions, transitions and hosts (the controller's SQL lives here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from ckms.controller import rowmac
from ckms.controller.keyview import KeyView, VersionView
from ckms.controller.models import (
    Host,
    InstallSpec,
    Key,
    KeyState,
    KeyVersion,
    Policy,
    RevocationReason,
    Rollout,
    Targets,
    Usage,
)
from ckms.crypto import KeyType
from ckms.errors import NotFoundError, SealedError, StoreError
from ckms.protocol import Gate, RolloutState
from ckms.store import Reader, Transaction, format_time, parse_time

_VERSION_TIME_COLUMNS = (
    "created_at",
    "state_changed_at",
    "activation_at",
    "activated_at",
    "superseded_at",
    "deactivated_at",
    "compromised_at",
    "destroyed_at",
)
_VERSION_UPDATABLE = frozenset(
    {
        "state",
        "sealed_material",
        "state_changed_at",
        "activated_at",
        "superseded_at",
        "deactivated_at",
        "compromised_at",
        "destroyed_at",
        "revocation_reason",
        "revocation_message",
    }
)


def _t(value: str | None) -> datetime | None:
    return None if value is None else parse_time(value)


def _version(name: str, row: Any) -> KeyVersion:
    times = {col: _t(row[col]) for col in _VERSION_TIME_COLUMNS}
    reason = row["revocation_reason"]
    return KeyVersion(
        key=name,
        version=int(row["version"]),
        state=KeyState(row["state"]),
        digest=str(row["digest"]),
        has_material=row["has_material"] == 1,
        created_by=str(row["created_by"]),
        revocation_reason=None if reason is None else RevocationReason(reason),
        revocation_message=row["revocation_message"],
        origin=row["origin"] or "generated",
        **times,
    )


_SHARED_MAX: Final = 4096
_shared_models: dict[tuple[type, str], Any] = {}


def _shared(kind: type, text: str) -> Any:
    """The parsed (frozen, immutable) policy, targets, install spec or usage of a stored text,
    one instance per distinct text: most keys of a fleet share a few of each, so 100,000 keys
    hold a few hundred of these objects instead of 400,000 (memory, and load time)."""
    cache_key = (kind, text)
    found = _shared_models.get(cache_key)
    if found is None:
        if len(_shared_models) >= _SHARED_MAX:
            _shared_models.clear()
        if kind is frozenset:
            found = frozenset(Usage(u) for u in text.split(","))
        else:
            found = kind.model_validate_json(text)  # type: ignore[attr-defined]
        _shared_models[cache_key] = found
    return found


def _rollout(name: str, row: Any, row_key: bytes | None) -> Rollout:
    """The rollout of one ``rollouts`` row, checked against its MAC once unsealed."""
    rowmac.check_rollout(row_key, name, row)
    released = row["released"]
    return Rollout(
        key_id=row["key_id"],
        version=int(row["version"]),
        stages=tuple(json.loads(row["stages"])),
        gate=Gate(row["gate"]),
        spread=row["spread"],
        stage=int(row["stage"]),
        state=RolloutState(row["state"]),
        released=None if released is None else frozenset(json.loads(released)),
        threshold_pct=int(row["threshold_pct"]),
        max_failures=row["max_failures"],
        started_at=parse_time(row["started_at"]),
        started_by=row["started_by"],
        stage_started_at=parse_time(row["stage_started_at"]),
        deadline_at=parse_time(row["deadline_at"]),
        updated_at=parse_time(row["updated_at"]),
        reason=row["reason"],
    )


def _key(
    row: Any, versions: list[Any], row_key: bytes | None, rollout: Any | None = None
) -> Key:
    rowmac.check_key(row_key, row)
    for v in versions:
        rowmac.check_version(row_key, str(row["name"]), v)
    try:
        params = json.loads(row["params"])
        return Key(
            id=row["id"],
            name=row["name"],
            type=KeyType(row["key_type"]),
            usage=_shared(frozenset, row["usage"]),
            policy=_shared(Policy, row["policy"]),
            targets=_shared(Targets, row["targets"]),
            install=_shared(InstallSpec, row["install"]),
            secret_length=params.get("length"),
            secret_alphabet=params.get("alphabet"),
            primary_version=row["primary_version"],
            created_at=parse_time(row["created_at"]),
            created_by=row["created_by"],
            updated_at=parse_time(row["updated_at"]),
            versions=tuple(_version(row["name"], v) for v in versions),
            rollout=None if rollout is None else _rollout(row["name"], rollout, row_key),
        )
    except ValueError as exc:
        raise StoreError(f"stored key {row['name']!r} is malformed: {exc}") from exc


_VERSION_COLUMNS = (
    "key_id, version, state, digest, created_at, created_by, activation_at, activated_at, "
    "superseded_at, deactivated_at, compromised_at, destroyed_at, revocation_reason, "
    "revocation_message, state_changed_at, sealed_material IS NOT NULL AS has_material, origin, "
    "mac"
)


async def find_key(r: Reader, name: str) -> Key | None:
    """Return the key named ``name`` with all its versions, or None."""
    row = await r.fetchone("SELECT * FROM keys WHERE name = ?", (name,))
    if row is None:
        return None
    versions = await r.fetchall(
        f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id = ? ORDER BY version",  # noqa: S608
        (row["id"],),
    )
    rollout = await r.fetchone("SELECT * FROM rollouts WHERE key_id = ?", (row["id"],))
    return _key(row, versions, r.row_key, rollout)


async def load_key(r: Reader, name: str) -> Key:
    """Return the key named ``name``, or raise NotFoundError."""
    key = await find_key(r, name)
    if key is None:
        raise NotFoundError(f"no key named {name!r}")
    return key


async def list_keys(r: Reader) -> list[Key]:
    """Return every key with its versions, by name."""
    return [key_from_rows(*rows, r.row_key) for rows in await list_key_rows(r)]


KeyRows = tuple[Any, list[Any], Any | None]
"""A key's row, its version rows and its rollout row, as read (see :func:`key_from_rows`)."""


async def list_key_rows(r: Reader) -> list[KeyRows]:
    """Every key's rows, by name, in one snapshot (what :func:`list_keys` builds models of; the
    key view reads :func:`key_rows_after` slices instead)."""
    rows = await r.fetchall("SELECT * FROM keys ORDER BY name")
    versions = await r.fetchall(
        f"SELECT {_VERSION_COLUMNS} FROM key_versions ORDER BY key_id, version"  # noqa: S608
    )
    by_key: dict[str, list[Any]] = {}
    for v in versions:
        by_key.setdefault(v["key_id"], []).append(v)
    rollouts = {r["key_id"]: r for r in await r.fetchall("SELECT * FROM rollouts")}
    return [(row, by_key.get(row["id"], []), rollouts.get(row["id"])) for row in rows]


async def key_rows_after(r: Reader, after: str | None, limit: int) -> list[KeyRows]:
    """Up to ``limit`` keys' rows named after ``after`` (from the first when None), by name:
    the key view is read in such slices (one snapshot), never as one result of every row."""
    first = "" if after is None else after
    rows = await r.fetchall(
        "SELECT * FROM keys WHERE name > ? ORDER BY name LIMIT ?", (first, limit)
    )
    if not rows:
        return []
    versions = await r.fetchall(
        f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id IN "  # noqa: S608
        "(SELECT id FROM keys WHERE name > ? AND name <= ?) ORDER BY key_id, version",
        (first, rows[-1]["name"]),
    )
    # As dicts: a sqlite3.Row finds a column by name with a case-insensitive scan of every
    # column, and checking and building one key reads about 60 columns by name.
    by_key: dict[str, list[Any]] = {}
    for v in _dicts(versions):
        by_key.setdefault(v["key_id"], []).append(v)
    rollouts = {
        ro["key_id"]: ro
        for ro in await r.fetchall(
            "SELECT * FROM rollouts WHERE key_id IN "
            "(SELECT id FROM keys WHERE name > ? AND name <= ?)",
            (first, rows[-1]["name"]),
        )
    }
    return [(row, by_key.get(row["id"], []), rollouts.get(row["id"])) for row in _dicts(rows)]


def _dicts(rows: list[Any]) -> list[dict[str, Any]]:
    names = list(rows[0].keys()) if rows else []
    return [dict(zip(names, row, strict=True)) for row in rows]


class ViewBuilder:
    """Builds :class:`~ckms.controller.keyview.KeyView` entries from checked rows, sharing the
    times and creators that are equal between them (one load of the view)."""

    def __init__(self, row_key: bytes | None) -> None:
        self._row_key = row_key
        self._times: dict[str, datetime] = {}
        self._texts: dict[str, str] = {}

    def _time(self, text: str | None) -> datetime | None:
        if text is None:
            return None
        found = self._times.get(text)
        if found is None:
            found = self._times[text] = parse_time(text)
        return found

    def _text(self, text: str) -> str:
        return self._texts.setdefault(text, text)

    def key(self, row: Any, versions: list[Any], rollout: Any | None = None) -> KeyView:
        """The view of one key (IntegrityError when a row's MAC does not match, StoreError when
        it is malformed), exactly what :func:`key_from_rows` would give."""
        rowmac.check_key(self._row_key, row)
        name = str(row["name"])
        for v in versions:
            rowmac.check_version(self._row_key, name, v)
        t = self._time
        try:
            its_rollout = None if rollout is None else _rollout(name, rollout, self._row_key)
            params = json.loads(row["params"]) if row["params"] != "{}" else {}
            return KeyView(
                id=row["id"],
                name=name,
                type=KeyType(row["key_type"]),
                usage=_shared(frozenset, row["usage"]),
                policy=_shared(Policy, row["policy"]),
                targets=_shared(Targets, row["targets"]),
                install=_shared(InstallSpec, row["install"]),
                secret_length=params.get("length"),
                secret_alphabet=params.get("alphabet"),
                primary_version=row["primary_version"],
                created_at=t(row["created_at"]),  # type: ignore[arg-type]
                created_by=self._text(row["created_by"]),
                updated_at=t(row["updated_at"]),  # type: ignore[arg-type]
                versions=tuple(
                    VersionView(
                        name,
                        int(v["version"]),
                        KeyState(v["state"]),
                        str(v["digest"]),
                        v["has_material"] == 1,
                        t(v["created_at"]),  # type: ignore[arg-type]
                        self._text(v["created_by"]),
                        t(v["state_changed_at"]),  # type: ignore[arg-type]
                        t(v["activation_at"]),
                        t(v["activated_at"]),
                        t(v["superseded_at"]),
                        t(v["deactivated_at"]),
                        t(v["compromised_at"]),
                        t(v["destroyed_at"]),
                        None
                        if v["revocation_reason"] is None
                        else RevocationReason(v["revocation_reason"]),
                        v["revocation_message"],
                        v["origin"] or "generated",
                    )
                    for v in versions
                ),
                rollout=its_rollout,
            )
        except ValueError as exc:
            raise StoreError(f"stored key {name!r} is malformed: {exc}") from exc


def key_from_rows(
    row: Any, versions: list[Any], rollout: Any | None, row_key: bytes | None
) -> Key:
    """The model of one key from its rows (StoreError when they are malformed, IntegrityError
    when ``row_key`` is given and a row's MAC does not match)."""
    return _key(row, versions, row_key, rollout)


async def existing_names(r: Reader, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that name a stored key, sorted."""
    wanted = sorted(set(names))
    found: list[str] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        rows = await r.fetchall(
            f"SELECT name FROM keys WHERE name IN ({', '.join('?' * len(chunk))})",  # noqa: S608
            chunk,
        )
        found += [str(row["name"]) for row in rows]
    return sorted(found)


async def keys_by_ids(r: Reader, ids: Iterable[str]) -> list[Key]:
    """The keys with these ids that exist (a deleted one is simply absent), by name."""
    wanted = sorted(set(ids))
    out: list[Key] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = tuple(wanted[start : start + _IN_CHUNK])
        out += await _keys_where(r, f"id IN ({', '.join('?' * len(chunk))})", chunk)
    return sorted(out, key=lambda k: k.name)


async def key_views_by_ids(r: Reader, ids: Iterable[str]) -> list[KeyView]:
    """Like :func:`keys_by_ids`, as key view entries."""
    wanted = sorted(set(ids))
    builder = ViewBuilder(r.row_key)
    out: list[KeyView] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = tuple(wanted[start : start + _IN_CHUNK])
        out += await _keys_where(
            r, f"id IN ({', '.join('?' * len(chunk))})", chunk, build=builder.key
        )
    return sorted(out, key=lambda k: k.name)


NEVER_DUE: Final = "9999-12-31T23:59:59.999999Z"
"""``keys.next_due_at`` of a key with nothing pending (NULL: not computed yet, e.g. a key stored
before the column existed; the scheduler fills those in)."""


async def _keys_where(
    r: Reader,
    where: str,
    params: tuple[Any, ...],
    *,
    limit: int | None = None,
    build: Callable[[Any, list[Any], Any | None], Any] | None = None,
) -> list[Any]:
    """Keys matching ``where`` (on ``keys``) with their versions, by name, at most ``limit``
    (models, or what ``build`` makes of each key's rows)."""
    tail = "" if limit is None else f" LIMIT {int(limit)}"
    rows = await r.fetchall(f"SELECT * FROM keys WHERE {where} ORDER BY name{tail}", params)  # noqa: S608
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    by_key: dict[str, list[Any]] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for v in await r.fetchall(
            f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id IN ({marks}) "  # noqa: S608
            "ORDER BY key_id, version",
            chunk,
        ):
            by_key.setdefault(v["key_id"], []).append(v)
    rollouts: dict[str, Any] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for ro in await r.fetchall(
            f"SELECT * FROM rollouts WHERE key_id IN ({marks})",  # noqa: S608
            chunk,
        ):
            rollouts[ro["key_id"]] = ro
    out: list[Any] = []
    for i, row in enumerate(rows, 1):
        versions = by_key.get(row["id"], [])
        rollout = rollouts.get(row["id"])
        out.append(
            _key(row, versions, r.row_key, rollout)
            if build is None
            else build(row, versions, rollout)
        )
        if i % _MODEL_SLICE == 0:
            await asyncio.sleep(0)  # a page of a thousand keys is not built in one hold
    return out


_MODEL_SLICE: Final = 100
"""Key models built between two yields to the event loop."""

_IN_CHUNK: Final = 500
"""Ids bound per ``IN (...)`` query (well under SQLite's variable limit)."""


async def keys_due_by(r: Reader, now: datetime) -> list[Key]:
    """Keys whose next due time is at or before ``now`` (or not computed yet), via the index."""
    # Two indexed lookups: SQLite scans the whole table for "<= ? OR IS NULL".
    return await _keys_where(
        r,
        "id IN (SELECT id FROM keys WHERE next_due_at <= ? "
        "UNION ALL SELECT id FROM keys WHERE next_due_at IS NULL)",
        (format_time(now),),
    )


async def next_due_after(r: Reader, now: datetime) -> datetime | None:
    """The earliest next due time after ``now`` of any key (None: nothing pending)."""
    value = await r.fetchval(
        "SELECT MIN(next_due_at) FROM keys WHERE next_due_at > ?", (format_time(now),)
    )
    return None if value is None or value == NEVER_DUE else parse_time(value)


async def set_next_due(tx: Transaction, key_id: str, when: datetime | None) -> None:
    """Store a key's next due time (see :func:`ckms.controller.duework.next_due`)."""
    value = _due_text(when)
    # Unchanged values are not rewritten: the write would move the keys generation for nothing.
    await tx.execute(
        "UPDATE keys SET next_due_at = ? WHERE id = ? AND next_due_at IS DISTINCT FROM ?",
        (value, key_id, value),
    )


def _due_text(when: datetime | None) -> str:
    return NEVER_DUE if when is None else format_time(when)


async def keys_without_next_due(r: Reader, limit: int) -> list[Key]:
    """Up to ``limit`` keys whose next due time was never computed."""
    return await _keys_where(
        r, "id IN (SELECT id FROM keys WHERE next_due_at IS NULL LIMIT ?)", (limit,)
    )


async def load_sealed(r: Reader, name: str, version: int) -> tuple[Key, bytes | None]:
    """Return the key and one version's sealed material (None once destroyed)."""
    key = await load_key(r, name)
    key.version(version)  # NotFoundError for an unknown version
    sealed = await r.fetchval(
        "SELECT sealed_material FROM key_versions WHERE key_id = ? AND version = ?",
        (key.id, version),
    )
    return key, None if sealed is None else bytes(sealed)


def _json(model: Any) -> str:
    return str(model.model_dump_json())


class _Texts:
    """The stored text of times and models, each made once for a batch of rows (the keys of
    one onboarding share their policy, targets, install spec and times)."""

    def __init__(self) -> None:
        self._times: dict[datetime, str] = {}
        self._models: dict[int, tuple[Any, str]] = {}

    def time(self, when: datetime | None) -> str | None:
        if when is None:
            return None
        text = self._times.get(when)
        if text is None:
            text = self._times[when] = format_time(when)
        return text

    def json(self, model: Any) -> str:
        found = self._models.get(id(model))
        if found is None or found[0] is not model:
            found = self._models[id(model)] = (model, _json(model))
        return found[1]


def _key_row(
    key: Key, *, next_due_at: str | None = None, texts: _Texts | None = None
) -> dict[str, Any]:
    """The columns of a new ``keys`` row, as stored (and as its MAC covers them)."""
    texts = texts or _Texts()
    params = {}
    if key.secret_length is not None:
        params["length"] = key.secret_length
    if key.secret_alphabet is not None:
        params["alphabet"] = key.secret_alphabet
    return {
        "id": key.id,
        "name": key.name,
        "key_type": str(key.type),
        "usage": ",".join(key.usage_list),
        "params": json.dumps(params, sort_keys=True),
        "policy": texts.json(key.policy),
        "targets": texts.json(key.targets),
        "install": texts.json(key.install),
        "primary_version": key.primary_version,
        "created_at": texts.time(key.created_at),
        "created_by": key.created_by,
        "updated_at": texts.time(key.updated_at),
        "next_due_at": next_due_at,
    }


def _version_row(
    key_id: str, version: KeyVersion, sealed_material: bytes, texts: _Texts
) -> dict[str, Any]:
    """The columns of a new ``key_versions`` row, as stored (and as its MAC covers them)."""
    row: dict[str, Any] = {
        "key_id": key_id,
        "version": version.version,
        "state": str(version.state),
        "digest": version.digest,
        "sealed_material": sealed_material,
        "created_by": version.created_by,
        "revocation_reason": (
            None if version.revocation_reason is None else str(version.revocation_reason)
        ),
        "revocation_message": version.revocation_message,
        "origin": None if version.origin == "generated" else version.origin,
    }
    for col in _VERSION_TIME_COLUMNS:
        row[col] = texts.time(getattr(version, col))
    return row


def _insert_sql(table: str, row: dict[str, Any]) -> str:
    cols = list(row)  # the MAC included
    return (
        f"INSERT INTO {table}({', '.join(cols)}) "  # noqa: S608 - our own column names
        f"VALUES ({', '.join(':' + c for c in cols)})"
    )


async def insert_key(tx: Transaction, key: Key) -> None:
    """Insert a key row (its versions are inserted separately)."""
    rows = KeyInserts(await rowmac.write_key(tx))
    rows.add(NewKeyRows(key))
    await insert_new_keys(tx, rows)


@dataclass(frozen=True, slots=True)
class NewKeyRows:
    """A key to insert whole: the key with its versions (inserted when ``sealed`` is given,
    each with that sealed material), and the key's next due time."""

    key: Key
    sealed: bytes | None = None
    next_due: datetime | None = None
    operation: str = "create"


class KeyInserts:
    """The rows of new keys, each with its MAC under ``row_key``, built before the write
    transaction that inserts them (:func:`insert_new_keys`), so that building a batch of
    onboarded keys holds neither the writer nor, in one go, the event loop."""

    def __init__(self, row_key: bytes | None) -> None:
        self.row_key = row_key
        self.keys: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.history: list[tuple[Any, ...]] = []
        self._texts = _Texts()

    def add(self, item: NewKeyRows) -> None:
        """Build the rows of one key (and of its versions when ``item.sealed`` is given)."""
        key, sealed, row_key, texts = item.key, item.sealed, self.row_key, self._texts
        # A key inserted alone has its next due time set by the caller (None: not computed).
        due = None if sealed is None else (texts.time(item.next_due) or NEVER_DUE)
        row = _key_row(key, next_due_at=due, texts=texts)
        row["mac"] = None if row_key is None else rowmac.key_row_mac(row_key, row)
        self.keys.append(row)
        if sealed is None:
            return
        for version in key.versions:
            vrow = _version_row(key.id, version, sealed, texts)
            vrow["mac"] = None if row_key is None else rowmac.version_row_mac(row_key, vrow)
            self.versions.append(vrow)
            self.history.append(
                (
                    key.id,
                    version.version,
                    None,
                    str(version.state),
                    item.operation,
                    texts.time(version.created_at),
                    version.created_by,
                    None,
                )
            )


async def insert_new_keys(tx: Transaction, rows: KeyInserts) -> None:
    """Insert the keys of ``rows`` (with their versions and the history entry of each
    version's creation) in a few statements: a batch of onboarded keys costs a handful of
    trips to the database, not a dozen per key. SealedError if the rows were MAC'd under a
    row key the store no longer has (sealed meanwhile)."""
    if not rows.keys:
        return
    if await rowmac.write_key(tx) != rows.row_key:
        raise SealedError("the controller was sealed while these keys were being prepared")
    await tx.executemany(_insert_sql("keys", rows.keys[0]), rows.keys)
    if rows.versions:
        await tx.executemany(_insert_sql("key_versions", rows.versions[0]), rows.versions)
        await tx.executemany(_INSERT_TRANSITION, rows.history)


async def update_key(tx: Transaction, key_id: str, *, now: datetime, **changes: Any) -> None:
    """Update policy, targets, install or primary_version of a key."""
    allowed = {"policy", "targets", "install", "primary_version"}
    if set(changes) - allowed:
        raise ValueError(f"cannot update key columns {sorted(set(changes) - allowed)}")
    values = {
        col: (_json(v) if col in ("policy", "targets", "install") else v)
        for col, v in changes.items()
    }
    values["updated_at"] = format_time(now)
    assignments = ", ".join(f"{col} = ?" for col in values)
    await tx.execute(
        f"UPDATE keys SET {assignments} WHERE id = ?",  # noqa: S608 - columns are whitelisted
        (*values.values(), key_id),
    )
    await rowmac.stamp_key(tx, key_id)


async def insert_version(
    tx: Transaction, key_id: str, version: KeyVersion, sealed_material: bytes
) -> None:
    """Insert a version row with its sealed material."""
    await tx.execute(
        "INSERT INTO key_versions(key_id, version, state, digest, sealed_material, created_at, "
        "created_by, activation_at, activated_at, state_changed_at, origin) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key_id,
            version.version,
            str(version.state),
            version.digest,
            sealed_material,
            format_time(version.created_at),
            version.created_by,
            None if version.activation_at is None else format_time(version.activation_at),
            None if version.activated_at is None else format_time(version.activated_at),
            format_time(version.state_changed_at),
            None if version.origin == "generated" else version.origin,
        ),
    )
    await rowmac.stamp_version(tx, key_id, version.version)


async def update_version(tx: Transaction, key_id: str, version: int, **changes: Any) -> None:
    """Update columns of one version; datetimes are stored in the store's time format."""
    if set(changes) - _VERSION_UPDATABLE:
        raise ValueError(
            f"cannot update version columns {sorted(set(changes) - _VERSION_UPDATABLE)}"
        )
    values = [
        format_time(v) if isinstance(v, datetime) else (str(v) if isinstance(v, KeyState) else v)
        for v in changes.values()
    ]
    assignments = ", ".join(f"{col} = ?" for col in changes)
    count = await tx.execute(
        f"UPDATE key_versions SET {assignments} WHERE key_id = ? AND version = ?",  # noqa: S608
        (*values, key_id, version),
    )
    if count != 1:
        raise StoreError(f"version {version} of key id {key_id} was not updated")
    await rowmac.stamp_version(tx, key_id, version)


_INSERT_TRANSITION: Final = (
    "INSERT INTO version_transitions(key_id, version, from_state, to_state, operation, at, "
    "actor, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


async def insert_transition(
    tx: Transaction,
    *,
    key_id: str,
    version: int,
    from_state: KeyState | None,
    to_state: KeyState,
    operation: str,
    now: datetime,
    actor: str,
    reason: str | None,
) -> None:
    """Record one state transition (UTC time, actor, reason) in the version's history."""
    await tx.execute(
        _INSERT_TRANSITION,
        (
            key_id,
            version,
            None if from_state is None else str(from_state),
            str(to_state),
            operation,
            format_time(now),
            actor,
            reason,
        ),
    )


async def transitions(r: Reader, name: str) -> list[dict[str, Any]]:
    """Return the transition history of every version of a key, oldest first."""
    rows = await r.fetchall(
        "SELECT t.version, t.from_state, t.to_state, t.operation, t.at, t.actor, t.reason "
        "FROM version_transitions t JOIN keys k ON k.id = t.key_id WHERE k.name = ? "
        "ORDER BY t.id",
        (name,),
    )
    return [dict(row) for row in rows]


def _host(row: Any, row_key: bytes | None) -> Host:
    """The host of one ``hosts`` row, checked against its MAC once unsealed."""
    rowmac.check_host(row_key, row)
    return Host(
        id=row["id"],
        name=row["name"],
        labels=json.loads(row["labels"]),
        identity_public_key=bytes(row["identity_public_key"]),
        wrapping_public_key=bytes(row["wrapping_public_key"]),
        enrolled_at=parse_time(row["enrolled_at"]),
        revoked=bool(row["revoked"]),
    )


async def list_hosts(r: Reader) -> list[Host]:
    """Return every enrolled host (revoked ones included), by id."""
    rows = await r.fetchall("SELECT * FROM hosts ORDER BY id")
    return [_host(row, r.row_key) for row in rows]


async def hosts_by_ids(r: Reader, ids: Iterable[str]) -> list[Host]:
    """The hosts with these ids that exist (revoked ones included), by id."""
    wanted = sorted(set(ids))
    out: list[Host] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = tuple(wanted[start : start + _IN_CHUNK])
        rows = await r.fetchall(
            f"SELECT * FROM hosts WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id",  # noqa: S608
            chunk,
        )
        out += [_host(row, r.row_key) for row in rows]
    return out


async def page_hosts(r: Reader, after: str | None, limit: int) -> list[Host]:
    """Up to ``limit`` hosts whose id sorts after ``after`` (from the first when None), by id:
    one range read of the primary key, whatever the fleet's size."""
    rows = await r.fetchall(
        "SELECT * FROM hosts WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit)
    )
    return [_host(row, r.row_key) for row in rows]
def _rollout_values(rollout: Rollout) -> tuple[Any, ...]:
    released = None if rollout.released is None else json.dumps(sorted(rollout.released))
    return (
        rollout.version,
        json.dumps(list(rollout.stages)),
        str(rollout.gate),
        rollout.spread,
        rollout.stage,
        str(rollout.state),
        released,
        rollout.threshold_pct,
        format_time(rollout.started_at),
        rollout.started_by,
        format_time(rollout.stage_started_at),
        format_time(rollout.deadline_at),
        format_time(rollout.updated_at),
        rollout.reason,
        rollout.max_failures,
    )


async def put_rollout(tx: Transaction, rollout: Rollout) -> None:
    """Write the key's rollout row (replacing its last one) and stamp its MAC."""
    await tx.execute(
        "INSERT INTO rollouts(key_id, version, stages, gate, spread, stage, state, released, "
        "threshold_pct, started_at, started_by, stage_started_at, deadline_at, updated_at, "
        "reason, max_failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(key_id) DO UPDATE SET version = excluded.version, "
        "stages = excluded.stages, gate = excluded.gate, spread = excluded.spread, "
        "stage = excluded.stage, state = excluded.state, released = excluded.released, "
        "threshold_pct = excluded.threshold_pct, started_at = excluded.started_at, "
        "started_by = excluded.started_by, stage_started_at = excluded.stage_started_at, "
        "deadline_at = excluded.deadline_at, updated_at = excluded.updated_at, "
        "reason = excluded.reason, max_failures = excluded.max_failures, mac = NULL",
        (rollout.key_id, *_rollout_values(rollout)),
    )
    await rowmac.stamp_rollout(tx, rollout.key_id)


async def live_rollout_keys(r: Reader) -> list[str]:
    """Names of the keys whose rollout is running (the ones the driver watches), by name."""
    rows = await r.fetchall(
        "SELECT k.name FROM rollouts o JOIN keys k ON k.id = o.key_id WHERE o.state = ? "
        "ORDER BY k.name",
        (str(RolloutState.RUNNING),),
    )
    return [str(row["name"]) for row in rows]


async def rollout_keys(r: Reader) -> list[str]:
    """Names of the keys with a rollout not ended (running, halted, rolled back, expired)."""
    rows = await r.fetchall(
        "SELECT k.name FROM rollouts o JOIN keys k ON k.id = o.key_id "
        "WHERE o.state NOT IN (?, ?) ORDER BY k.name",
        (str(RolloutState.COMPLETED), str(RolloutState.CANCELLED)),
    )
    return [str(row["name"]) for row in rows]
