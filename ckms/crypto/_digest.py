"""Keyed digests of key material, MACs of store rows, keyed hashes of sensitive identifiers.

Material digest: ``"hmac-sha256:" + hex(HMAC-SHA256(digest_key, canonical material))``. Events,
sync replies and acks carry it so an agent can check what it fetched and the controller can tell
drift. It is keyed (the fleet digest key, derived from the root KEK, which agents learn wrapped
to their own key at enrollment) because events are read by everyone with access to the topic:
a plain hash of a short ``secret`` is a lookup away from the secret itself. A per-version salt
in the event would stop precomputed tables but not one guess per candidate, which is all a
low-entropy secret needs; a key the reader does not hold stops both. Enrolled hosts hold the
key, which is why generated secrets must also carry at least 128 bits (see ``generate``).
Digests written before keyed digests (``"sha256:" + hex``) are recognised by
:func:`is_keyed_digest` so they are never compared with keyed ones.

Row MAC: ``hex(HMAC-SHA256(row_key, canonical_json({"ctx": "ckms.row.v1", "table", "id",
"fields"})))``; see ``ckms.controller.rowmac`` for which rows and fields.
"""

from __future__ import annotations

import hmac as _hmac
from typing import Any, Final

from ckms.crypto._encoding import canonical, require_bytes, require_text
from ckms.errors import ConfigError

MIN_HMAC_KEY_BYTES = 16
KEYED_DIGEST_PREFIX: Final = "hmac-sha256:"
LEGACY_DIGEST_PREFIX: Final = "sha256:"
_ROW_CONTEXT: Final = "ckms.row.v1"


def _key(key: bytes, what: str) -> bytes:
    k = require_bytes(key, what)
    if len(k) < MIN_HMAC_KEY_BYTES:
        raise ConfigError(f"{what} must be at least {MIN_HMAC_KEY_BYTES} bytes")
    return k


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256, the keyed hash behind digests, row MACs, audit ids and the KEK check value.

    The standard library's one-shot HMAC (OpenSSL's, through hashlib): the same bytes as
    pyca's ``hmac.HMAC``, in half the time, which counts when every row of 100,000 keys is
    checked against its MAC as the key view loads.
    """
    return _hmac.digest(key, data, "sha256")


def material_digest(digest_key: bytes, material: bytes) -> str:
    """Return the keyed digest of canonical material, which events carry and agents check."""
    k = _key(digest_key, "digest key")
    return KEYED_DIGEST_PREFIX + hmac_sha256(k, require_bytes(material, "key material")).hex()


def is_keyed_digest(digest: str) -> bool:
    """Say whether ``digest`` is a keyed digest (not one written before digests were keyed)."""
    return isinstance(digest, str) and digest.startswith(KEYED_DIGEST_PREFIX)


def row_mac(row_key: bytes, table: str, row_id: str, fields: dict[str, Any]) -> str:
    """Return the MAC binding ``fields`` of one row (``table``, ``row_id``) to the root KEK."""
    k = _key(row_key, "row MAC key")
    body = canonical(
        {
            "ctx": _ROW_CONTEXT,
            "table": require_text(table, "table"),
            "id": require_text(row_id, "row id"),
            "fields": fields,
        }
    )
    return hmac_sha256(k, body).hex()


def row_mac_matches(
    row_key: bytes, table: str, row_id: str, fields: dict[str, Any], mac: object
) -> bool:
    """Say, in constant time, whether ``mac`` is the row MAC of these fields."""
    if not isinstance(mac, str):
        return False
    return _hmac.compare_digest(row_mac(row_key, table, row_id, fields), mac)


def hmac_identifier(key: bytes, value: str) -> str:
    """Return ``"hmac:"`` + hex HMAC-SHA256 of ``value``: audit records can match, not reveal it."""
    k = _key(key, "audit HMAC key")
    if not isinstance(value, str):
        raise ConfigError("identifier to HMAC must be a string")
    return "hmac:" + hmac_sha256(k, value.encode("utf-8")).hex()
