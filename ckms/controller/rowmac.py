"""Rows whose meaning matters, bound to the root KEK: a MAC on each, checked on every read.

Sealed material already fails to open when its row is edited (its AAD binds name, version,
type and usage). What decides *who gets what* lives in clear columns, though: a key's targets,
install spec, policy and primary; a version's state, digest and activation time; an operator's
key, role and whether it is disabled. Each such row carries ``mac`` = ``row_mac(row key,
table, id, fields)`` (``ckms.crypto``), the row key derived from the root KEK with HKDF, so
only an unsealed controller can make one. Reads refuse a row whose MAC does not match with
:class:`~ckms.errors.IntegrityError`, like sealed material; writes stamp the MAC in the same
transaction, right after reading (and so checking) the row they change.

The event-signing public key is bound differently: unseal checks it against the private key,
which is sealed under the root KEK, and refuses a mismatch with IntegrityError.

While sealed there is no row key: reads are not checked, and nothing is done with them that
needs the vault (no material leaves, nothing is signed or changed, agents' sync is refused, so
no host acts on an unchecked target). Rows written before MACs existed are stamped once, at the
first unseal that finds none bound (:func:`bind_existing`), which also stores a marker MAC and
audits it; after that, a row without a MAC is refused, and a store whose marker was removed
after it was written (the audit log says it was) is refused at unseal.
"""

from __future__ import annotations

from typing import Any, Final

from ckms.crypto import row_mac, row_mac_matches
from ckms.errors import IntegrityError, SealedError
from ckms.store import Transaction
from ckms.store import audit as audit_log

KEY_FIELDS: Final = (
    "name",
    "key_type",
    "usage",
    "params",
    "policy",
    "targets",
    "install",
    "primary_version",
)
VERSION_FIELDS: Final = ("state", "digest", "activation_at", "revocation_reason")
OPERATOR_FIELDS: Final = ("ssh_public_key", "role", "disabled")

META_MARKER: Final = "rows.bound"
BIND_ACTION: Final = "controller.bind_rows"


def _fields(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: row[name] for name in names}


def _version_id(key_id: str, version: int) -> str:
    return f"{key_id}:{version}"


def key_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``keys`` row."""
    return row_mac(row_key, "keys", str(row["id"]), _fields(row, KEY_FIELDS))


def version_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``key_versions`` row."""
    rid = _version_id(str(row["key_id"]), int(row["version"]))
    return row_mac(row_key, "key_versions", rid, _fields(row, VERSION_FIELDS))


def operator_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``operators`` row."""
    return row_mac(row_key, "operators", str(row["name"]), _fields(row, OPERATOR_FIELDS))


def check_key(row_key: bytes | None, row: Any) -> None:
    """Refuse a ``keys`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "keys", str(row["id"]), _fields(row, KEY_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"key {row['name']} failed integrity check")


def check_version(row_key: bytes | None, name: str, row: Any) -> None:
    """Refuse a ``key_versions`` row edited outside the controller (no check while sealed)."""
    rid = _version_id(str(row["key_id"]), int(row["version"]))
    if row_key is not None and not row_mac_matches(
        row_key, "key_versions", rid, _fields(row, VERSION_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"key {name} version {row['version']} failed integrity check")


def check_operator(row_key: bytes | None, row: Any) -> None:
    """Refuse an ``operators`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "operators", str(row["name"]), _fields(row, OPERATOR_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"operator {row['name']} failed integrity check")


async def _require_key(tx: Transaction) -> bytes | None:
    """The row key; None for a store not bound yet (``ckms init`` adds the first operators
    before the first unseal binds them); SealedError for a bound store while sealed."""
    if tx.row_key is not None:
        return tx.row_key
    if await tx.get_meta(META_MARKER) is None:
        return None
    raise SealedError("controller is sealed: cannot bind a changed row; unseal it first")


async def stamp_key(tx: Transaction, key_id: str) -> None:
    """Stamp the MAC of a ``keys`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone("SELECT * FROM keys WHERE id = ?", (key_id,))
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE keys SET mac = ? WHERE id = ?", (key_row_mac(row_key, row), key_id)
        )


async def stamp_version(tx: Transaction, key_id: str, version: int) -> None:
    """Stamp the MAC of a ``key_versions`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone(
        "SELECT * FROM key_versions WHERE key_id = ? AND version = ?", (key_id, version)
    )
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE key_versions SET mac = ? WHERE key_id = ? AND version = ?",
            (version_row_mac(row_key, row), key_id, version),
        )


async def stamp_operator(tx: Transaction, name: str) -> None:
    """Stamp the MAC of an ``operators`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone("SELECT * FROM operators WHERE name = ?", (name,))
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE operators SET mac = ? WHERE name = ?", (operator_row_mac(row_key, row), name)
        )


def _marker(row_key: bytes) -> bytes:
    return row_mac(row_key, "meta", META_MARKER, {}).encode()


async def bind_existing(tx: Transaction, row_key: bytes, *, now: Any) -> int | None:
    """Stamp every row written before rows were bound (once per store); return how many, or
    None when the store was bound already. IntegrityError if its marker was tampered with."""
    marker = await tx.get_meta(META_MARKER)
    if marker is not None:
        if marker != _marker(row_key):
            raise IntegrityError("the store's row binding marker failed integrity check")
        return None
    bound = await tx.fetchval(
        "SELECT count(*) FROM audit WHERE action = ? AND outcome = 'ok'", (BIND_ACTION,)
    )
    if bound:
        raise IntegrityError(
            "the store's rows were bound to the root KEK before, but its marker is gone: "
            "refusing to trust its rows again"
        )
    count = 0
    for row in await tx.fetchall("SELECT * FROM keys WHERE mac IS NULL"):
        await tx.execute(
            "UPDATE keys SET mac = ? WHERE id = ?", (key_row_mac(row_key, row), row["id"])
        )
        count += 1
    for row in await tx.fetchall("SELECT * FROM key_versions WHERE mac IS NULL"):
        await tx.execute(
            "UPDATE key_versions SET mac = ? WHERE key_id = ? AND version = ?",
            (version_row_mac(row_key, row), row["key_id"], row["version"]),
        )
        count += 1
    for row in await tx.fetchall("SELECT * FROM operators WHERE mac IS NULL"):
        await tx.execute(
            "UPDATE operators SET mac = ? WHERE name = ?",
            (operator_row_mac(row_key, row), row["name"]),
        )
        count += 1
    await tx.set_meta(META_MARKER, _marker(row_key))
    await audit_log.append(
        tx,
        now=now,
        actor="controller",
        action=BIND_ACTION,
        object="controller",
        details={"rows": count},
    )
    return count
