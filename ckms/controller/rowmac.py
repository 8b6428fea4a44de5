"""Rows whose meaning matters, bound to the root KEK: a MAC on each, checked on every read.

Sealed material already fails to open when its row is edited (its AAD binds name, version,
type and usage). What decides *who gets what* lives in clear columns, though: a key's targets,
install spec, policy and primary; a version's state, digest and lifecycle times; an operator's
key, role and whether it is disabled; a host's keys, labels and revoked state; an enrollment
token's host and labels; a dual-control request's operation, parameters, requester, expiry,
state and decisions; a rollout's stage, state, released hosts and deadline. Each such row
carries ``mac`` = ``row_mac(row key, table, id, fields)`` (``ckms.crypto``), the row key
derived from the root KEK with HKDF, so only an unsealed controller can make one. Reads refuse
a row whose MAC does not match with :class:`~ckms.errors.IntegrityError`, like sealed material;
writes stamp the MAC in the same transaction, right after reading (and so checking) the row
they change.

The event-signing public key is bound differently: unseal checks it against the private key,
which is sealed under the root KEK, and refuses a mismatch with IntegrityError.

While sealed there is no row key: reads are not checked, and nothing is done with them that
needs the vault (no material leaves, nothing is signed or changed, agents' sync is refused, so
no host acts on an unchecked target). Rows written before MACs existed are stamped once, at the
first unseal that finds none bound (:func:`bind_existing`), which also stores a marker MAC and
audits it; after that, a row without a MAC is refused, and a store whose marker was removed
after it was written (the audit log says it was) is refused at unseal. The marker names a
binding level (:data:`BIND_LEVEL`): a store bound at an earlier level is brought up once, its
existing MACs checked under the old fields before they are re-stamped.
"""

from __future__ import annotations

from collections.abc import KeysView
from typing import Any, Final

from ckms.crypto import row_mac, row_mac_matches
from ckms.errors import IntegrityError, SealedError
from ckms.store import Reader, Store, Transaction
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
VERSION_FIELDS_V1: Final = ("state", "digest", "activation_at", "revocation_reason")
"""What a version's MAC covered at binding level 1 (re-bound to :data:`VERSION_FIELDS`)."""
VERSION_FIELDS: Final = (
    *VERSION_FIELDS_V1,
    "created_at",
    "state_changed_at",
    "activated_at",
    "superseded_at",
    "deactivated_at",
    "compromised_at",
    "destroyed_at",
    "revocation_message",
)
"""A version's state and every time the lifecycle reads to decide what is due or served."""
VERSION_OPTIONAL_FIELDS: Final = ("origin",)
"""Version fields added after binding level 3, covered by the MAC whenever they are set (NULL
leaves the MAC what it was, so existing rows need no re-binding; setting or clearing one in
the file changes what the MAC covers and fails the check)."""
OPERATOR_FIELDS: Final = ("ssh_public_key", "role", "disabled")
HOST_FIELDS: Final = (
    "name",
    "labels",
    "identity_public_key",
    "wrapping_public_key",
    "wrap_suite",
    "signer_key_id",
    "enrolled_at",
    "revoked",
    "revoked_at",
)
"""Who a host is (its keys, which decide who logs in and who may open what is wrapped to it),
what it is (labels, which decide which keys target it) and whether it is revoked. Not bound:
``last_seen_at``, ``reported`` and ``last_ack_seq`` (the fleet view's, written on every
heartbeat and ack)."""
TOKEN_FIELDS: Final = ("host_name", "labels", "expires_at", "used_at")
"""An enrollment token row, keyed by its hash: a row the controller did not write (a token of
the file owner's own) or whose labels or host were changed lets nobody enroll."""
APPROVAL_FIELDS: Final = (
    "operation",
    "params",
    "requester",
    "created_at",
    "expires_at",
    "state",
    "approvals",
)
"""A dual-control request: what runs (operation and its parameters), as whom, until when, and
the decisions so far; a swapped parameter or requester would have an approver run something
else than what they were shown."""
ROLLOUT_FIELDS: Final = (
    "version",
    "stages",
    "gate",
    "spread",
    "stage",
    "state",
    "released",
    "threshold_pct",
    "started_at",
    "started_by",
    "stage_started_at",
    "deadline_at",
    "updated_at",
    "reason",
)
"""A rollout (one row per key): which version, which stage is out to which hosts, in what state,
until when. Edited, a stage could be advanced or a host released by whoever owns the DB file;
a rollout row is only ever written by an unsealed controller, so there is no unbound row to
bring up (no binding level)."""

ROLLOUT_OPTIONAL_FIELDS: Final = ("max_failures",)
"""Rollout fields added later, covered whenever set (a raised failure budget would let a
failing stage go on)."""

CERTIFICATE_FIELDS: Final = (
    "kind",
    "host_id",
    "key_id",
    "version",
    "ca_generation",
    "fingerprint",
    "not_before",
    "not_after",
    "issued_at",
    "revoked_at",
)
"""A certificate the CA issued: to whom, for what, until when, and whether it is revoked (a
cleared revocation would drop the serial from the CRL and let renewal status lie). Rows exist
only from an unsealed controller, so none predates its MAC (no binding level of its own)."""
CERTIFICATE_OPTIONAL_FIELDS: Final = ("public_key_sha256", "revocation_reason")
"""Certificate fields added later, covered whenever set (as :data:`VERSION_OPTIONAL_FIELDS`):
the certified key, which decides whether a CSR reuses a compromised pair, and the reason."""

FLEET_FIELDS: Final = ("status", "digest", "updated_at", "error")
"""A ``fleet_state`` row as a rollout's gate reads it: what the host acknowledged for the
version, when, and why it failed. Written on every ack (:func:`fleet_row_mac`); an
``installed`` row without its MAC counts for no gate (rows from before MACs, or written while
sealed), a forged one stops the rollout."""


def fleet_row_mac(
    row_key: bytes | None,
    host_id: str,
    key_id: str,
    version: int,
    fields: dict[str, Any],
) -> str | None:
    """The MAC of one ``fleet_state`` row with :data:`FLEET_FIELDS` ``fields`` (None while
    sealed: such a row counts for no gate)."""
    if row_key is None:
        return None
    values = {name: _value(fields.get(name)) for name in FLEET_FIELDS}
    return row_mac(row_key, "fleet_state", f"{host_id}:{key_id}:{version}", values)


def fleet_row_trusted(row_key: bytes | None, row: Any) -> bool:
    """Whether a ``fleet_state`` row carries its MAC (False: none, so it counts for nothing).

    IntegrityError when it carries one that does not match: edited outside the controller."""
    if row["mac"] is None:
        return False
    if row_key is None:
        return False
    rid = f"{row['host_id']}:{row['key_id']}:{row['version']}"
    if not row_mac_matches(row_key, "fleet_state", rid, _fields(row, FLEET_FIELDS), row["mac"]):
        raise IntegrityError(
            f"the fleet view's row of host {row['host_id']} failed integrity check"
        )
    return True


def seen_mac(row_key: bytes | None, host_id: str, last_seen_at: str | None) -> str | None:
    """The MAC of a host's ``last_seen_at`` (None while sealed or never seen)."""
    if row_key is None or last_seen_at is None:
        return None
    return row_mac(row_key, "hosts.seen", host_id, {"last_seen_at": last_seen_at})


def seen_trusted(row_key: bytes | None, row: Any) -> bool:
    """Whether a host row's ``last_seen_at`` carries its MAC (False: none; IntegrityError:
    one that does not match, a contact time edited outside the controller)."""
    if row["seen_mac"] is None or row_key is None or row["last_seen_at"] is None:
        return False
    if not row_mac_matches(
        row_key, "hosts.seen", str(row["id"]), {"last_seen_at": row["last_seen_at"]},
        row["seen_mac"],
    ):
        raise IntegrityError(f"the last contact of host {row['id']} failed integrity check")
    return True


META_MARKER: Final = "rows.bound"
BIND_ACTION: Final = "controller.bind_rows"
BIND_LEVEL: Final = 3
"""Level 1 bound keys, versions (:data:`VERSION_FIELDS_V1`) and operators; level 2 adds hosts,
enrollment tokens and the version times; level 3 approvals. A store is brought up to the
current level at unseal, once."""


def _value(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes | memoryview) else value


def _fields(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    fields = {name: row[name] for name in names}
    for name, value in fields.items():
        if type(value) is not str and isinstance(value, bytes | memoryview):
            fields[name] = value.hex()
    return fields


def _version_id(key_id: str, version: int) -> str:
    return f"{key_id}:{version}"


def key_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``keys`` row."""
    return row_mac(row_key, "keys", str(row["id"]), _fields(row, KEY_FIELDS))


def _version_fields(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """``names`` of a version row, plus each :data:`VERSION_OPTIONAL_FIELDS` that is set."""
    return _optional(row, _fields(row, names), VERSION_OPTIONAL_FIELDS)


def version_row_mac(row_key: bytes, row: Any, fields: tuple[str, ...] | None = None) -> str:
    """The MAC of one ``key_versions`` row (over :data:`VERSION_FIELDS` unless told)."""
    rid = _version_id(str(row["key_id"]), int(row["version"]))
    return row_mac(row_key, "key_versions", rid, _version_fields(row, fields or VERSION_FIELDS))


def operator_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``operators`` row."""
    return row_mac(row_key, "operators", str(row["name"]), _fields(row, OPERATOR_FIELDS))


def host_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``hosts`` row."""
    return row_mac(row_key, "hosts", str(row["id"]), _fields(row, HOST_FIELDS))


def token_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``enrollment_tokens`` row."""
    return row_mac(row_key, "enrollment_tokens", str(row["token_hash"]), _fields(row, TOKEN_FIELDS))


def approval_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``approvals`` row."""
    return row_mac(row_key, "approvals", str(row["id"]), _fields(row, APPROVAL_FIELDS))


def _optional(row: Any, fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``fields`` plus each of ``names`` that the row has and is set."""
    present = row.keys()  # a dict's view, a sqlite3.Row's list, or an asyncpg Record's...
    if not isinstance(present, KeysView | list | tuple):
        present = tuple(present)  # ...one-pass iterator: each `in` would consume it
    for name in names:
        if name in present and row[name] is not None:
            fields[name] = _value(row[name])
    return fields


def _certificate_fields(row: Any) -> dict[str, Any]:
    return _optional(row, _fields(row, CERTIFICATE_FIELDS), CERTIFICATE_OPTIONAL_FIELDS)


def certificate_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``certificates`` row."""
    return row_mac(row_key, "certificates", str(row["serial"]), _certificate_fields(row))


def check_certificate(row_key: bytes | None, row: Any) -> None:
    """Refuse a ``certificates`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "certificates", str(row["serial"]), _certificate_fields(row), row["mac"]
    ):
        raise IntegrityError(f"certificate {row['serial']} failed integrity check")


async def stamp_certificate(tx: Transaction, serial: str) -> None:
    """Stamp the MAC of a ``certificates`` row the caller just wrote (only ever unsealed)."""
    row_key = tx.row_key
    if row_key is None:
        raise SealedError("controller is sealed: cannot record a certificate; unseal it first")
    row = await tx.fetchone("SELECT * FROM certificates WHERE serial = ?", (serial,))
    if row is not None:
        await tx.execute(
            "UPDATE certificates SET mac = ? WHERE serial = ?",
            (certificate_row_mac(row_key, row), serial),
        )


def check_approval(row_key: bytes | None, row: Any) -> None:
    """Refuse an ``approvals`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "approvals", str(row["id"]), _fields(row, APPROVAL_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"request {row['id']} failed integrity check")


def rollout_row_mac(row_key: bytes, row: Any) -> str:
    """The MAC of one ``rollouts`` row."""
    return row_mac(row_key, "rollouts", str(row["key_id"]), _rollout_fields(row))


def _rollout_fields(row: Any) -> dict[str, Any]:
    return _optional(row, _fields(row, ROLLOUT_FIELDS), ROLLOUT_OPTIONAL_FIELDS)


def check_rollout(row_key: bytes | None, name: str, row: Any) -> None:
    """Refuse a ``rollouts`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "rollouts", str(row["key_id"]), _rollout_fields(row), row["mac"]
    ):
        raise IntegrityError(f"the rollout of key {name} failed integrity check")


def check_key(row_key: bytes | None, row: Any) -> None:
    """Refuse a ``keys`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "keys", str(row["id"]), _fields(row, KEY_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"key {row['name']} failed integrity check")


def check_version(row_key: bytes | None, name: str, row: Any) -> None:
    """Refuse a ``key_versions`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not _version_matches(row_key, row, VERSION_FIELDS):
        raise IntegrityError(f"key {name} version {row['version']} failed integrity check")


def _version_matches(row_key: bytes, row: Any, fields: tuple[str, ...]) -> bool:
    rid = _version_id(str(row["key_id"]), int(row["version"]))
    return row_mac_matches(row_key, "key_versions", rid, _version_fields(row, fields), row["mac"])


def check_operator(row_key: bytes | None, row: Any) -> None:
    """Refuse an ``operators`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "operators", str(row["name"]), _fields(row, OPERATOR_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"operator {row['name']} failed integrity check")


def check_host(row_key: bytes | None, row: Any) -> None:
    """Refuse a ``hosts`` row edited outside the controller (no check while sealed)."""
    if row_key is not None and not row_mac_matches(
        row_key, "hosts", str(row["id"]), _fields(row, HOST_FIELDS), row["mac"]
    ):
        raise IntegrityError(f"host {row['id']} failed integrity check")


def check_token(row_key: bytes | None, row: Any) -> None:
    """Refuse an ``enrollment_tokens`` row the controller did not write as it is."""
    if row_key is not None and not row_mac_matches(
        row_key,
        "enrollment_tokens",
        str(row["token_hash"]),
        _fields(row, TOKEN_FIELDS),
        row["mac"],
    ):
        raise IntegrityError(f"enrollment token for host {row['host_name']} failed integrity check")


async def is_bound(r: Reader | Store) -> bool:
    """Whether the store's rows were ever bound (a first unseal happened)."""
    return await r.get_meta(META_MARKER) is not None


async def write_key(tx: Transaction) -> bytes | None:
    """The key to MAC rows written in ``tx`` with (for writers that compute the MAC of rows
    they build, instead of stamping each after writing it); None and SealedError as for
    the ``stamp_*`` functions."""
    return await _require_key(tx)


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


async def stamp_host(tx: Transaction, host_id: str) -> None:
    """Stamp the MAC of a ``hosts`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone("SELECT * FROM hosts WHERE id = ?", (host_id,))
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE hosts SET mac = ? WHERE id = ?", (host_row_mac(row_key, row), host_id)
        )


async def stamp_approval(tx: Transaction, request_id: str) -> None:
    """Stamp the MAC of an ``approvals`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone("SELECT * FROM approvals WHERE id = ?", (request_id,))
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE approvals SET mac = ? WHERE id = ?",
            (approval_row_mac(row_key, row), request_id),
        )


async def stamp_rollout(tx: Transaction, key_id: str) -> None:
    """Stamp the MAC of a ``rollouts`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone("SELECT * FROM rollouts WHERE key_id = ?", (key_id,))
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE rollouts SET mac = ? WHERE key_id = ?", (rollout_row_mac(row_key, row), key_id)
        )


async def stamp_token(tx: Transaction, token_hash: str) -> None:
    """Stamp the MAC of an ``enrollment_tokens`` row the caller just wrote."""
    row_key = await _require_key(tx)
    row = await tx.fetchone("SELECT * FROM enrollment_tokens WHERE token_hash = ?", (token_hash,))
    if row is not None and row_key is not None:
        await tx.execute(
            "UPDATE enrollment_tokens SET mac = ? WHERE token_hash = ?",
            (token_row_mac(row_key, row), token_hash),
        )


def _marker(row_key: bytes, level: int) -> str:
    # Level 1's marker had no fields; keeping it lets a level-1 store be recognised.
    return row_mac(row_key, "meta", META_MARKER, {} if level == 1 else {"level": level})


async def _bound_before(tx: Transaction, level: int) -> bool:
    """Whether the audit log says the store was bound at ``level`` (or above) before."""
    level_field = tx.dialect.json_int("details", "level")
    count = await tx.fetchval(
        "SELECT count(*) FROM audit WHERE action = ? AND outcome = 'ok' "  # noqa: S608
        f"AND coalesce({level_field}, 1) >= ?",
        (BIND_ACTION, level),
    )
    return bool(count)


async def _stamp_unbound(tx: Transaction, row_key: bytes, *, from_level: int) -> int:
    """Stamp every row without a MAC of the tables bound after ``from_level``; return how
    many. (A row of a table bound already that lost its MAC stays refused.)"""
    count = 0
    if from_level < 1:
        count += await _stamp_level_1(tx, row_key)
    if from_level < 2:
        count += await _stamp_level_2(tx, row_key)
    for row in await tx.fetchall("SELECT * FROM approvals WHERE mac IS NULL"):
        await tx.execute(
            "UPDATE approvals SET mac = ? WHERE id = ?", (approval_row_mac(row_key, row), row["id"])
        )
        count += 1
    return count


async def _stamp_level_2(tx: Transaction, row_key: bytes) -> int:
    count = 0
    for row in await tx.fetchall("SELECT * FROM hosts WHERE mac IS NULL"):
        await tx.execute(
            "UPDATE hosts SET mac = ? WHERE id = ?", (host_row_mac(row_key, row), row["id"])
        )
        count += 1
    for row in await tx.fetchall("SELECT * FROM enrollment_tokens WHERE mac IS NULL"):
        await tx.execute(
            "UPDATE enrollment_tokens SET mac = ? WHERE token_hash = ?",
            (token_row_mac(row_key, row), row["token_hash"]),
        )
        count += 1
    return count


async def _stamp_level_1(tx: Transaction, row_key: bytes) -> int:
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
    return count


async def _rebind_versions_from_v1(tx: Transaction, row_key: bytes) -> int:
    """Re-stamp, under :data:`VERSION_FIELDS`, every version whose level-1 MAC still matches;
    one that does not keeps its MAC and so stays refused."""
    count = 0
    for row in await tx.fetchall("SELECT * FROM key_versions WHERE mac IS NOT NULL"):
        if _version_matches(row_key, row, VERSION_FIELDS_V1):
            await tx.execute(
                "UPDATE key_versions SET mac = ? WHERE key_id = ? AND version = ?",
                (version_row_mac(row_key, row), row["key_id"], row["version"]),
            )
            count += 1
    return count


async def bind_existing(tx: Transaction, row_key: bytes, *, now: Any) -> int | None:
    """Bring the store's rows up to :data:`BIND_LEVEL` (once per level); return how many rows
    were stamped, or None when it was there already.

    An unbound store has every row stamped as it is (trust on first unseal, audited). A
    level-1 store has its versions re-stamped with their times (only those whose level-1 MAC
    matches) and its hosts and tokens stamped as they are; a level-2 store its approvals.
    IntegrityError if the marker was tampered with, or is gone or older than the audit log
    says the store was bound at.
    """
    marker = await tx.get_meta(META_MARKER)
    if marker is not None and marker == _marker(row_key, BIND_LEVEL).encode():
        return None
    if marker is None:
        if await _bound_before(tx, 1):
            raise IntegrityError(
                "the store's rows were bound to the root KEK before, but its marker is gone: "
                "refusing to trust its rows again"
            )
        from_level = 0
    else:
        older = [n for n in range(1, BIND_LEVEL) if marker == _marker(row_key, n).encode()]
        if not older:
            raise IntegrityError("the store's row binding marker failed integrity check")
        from_level = older[0]
        if await _bound_before(tx, from_level + 1):
            raise IntegrityError(
                "the store's row binding marker is older than the audit log says it was bound "
                "at: refusing to trust its rows again"
            )
    count = await _rebind_versions_from_v1(tx, row_key) if from_level == 1 else 0
    count += await _stamp_unbound(tx, row_key, from_level=from_level)
    await tx.set_meta(META_MARKER, _marker(row_key, BIND_LEVEL).encode())
    await audit_log.append(
        tx,
        now=now,
        actor="controller",
        action=BIND_ACTION,
        object="controller",
        details={"rows": count, "level": BIND_LEVEL, "from_level": from_level},
    )
    return count
