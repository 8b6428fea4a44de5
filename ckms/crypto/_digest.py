"""Digests of key material and keyed hashes of sensitive identifiers."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, hmac

from ckms.crypto._encoding import require_bytes
from ckms.errors import ConfigError

MIN_HMAC_KEY_BYTES = 16


def material_digest(material: bytes) -> str:
    """Return ``"sha256:" + hex`` of canonical material, which events carry and agents check."""
    h = hashes.Hash(hashes.SHA256())
    h.update(require_bytes(material, "key material"))
    return "sha256:" + h.finalize().hex()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256, the keyed hash behind audit identifiers and the KEK check value."""
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def hmac_identifier(key: bytes, value: str) -> str:
    """Return ``"hmac:"`` + hex HMAC-SHA256 of ``value``: audit records can match, not reveal it."""
    k = require_bytes(key, "audit HMAC key")
    if len(k) < MIN_HMAC_KEY_BYTES:
        raise ConfigError(f"audit HMAC key must be at least {MIN_HMAC_KEY_BYTES} bytes")
    if not isinstance(value, str):
        raise ConfigError("identifier to HMAC must be a string")
    return "hmac:" + hmac_sha256(k, value.encode("utf-8")).hex()
