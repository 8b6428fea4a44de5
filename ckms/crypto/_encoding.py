"""Small byte and text helpers shared by the crypto recipes (no cryptography here)."""

from __future__ import annotations

import base64
import binascii

from ckms._canonical import canonical_json
from ckms.errors import ConfigError


def b64(data: bytes) -> str:
    """Standard base64 with padding, the form JSON fields and install files use."""
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWK (RFC 7515 §2) and key ids use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode_strict(text: object) -> bytes | None:
    """Decode standard base64, returning None instead of guessing on anything malformed."""
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def require_bytes(value: object, what: str) -> bytes:
    """Return ``value`` as bytes, refusing ``str`` and other types so text never passes as a key."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise ConfigError(f"{what} must be bytes, not {type(value).__name__}")


def require_version(version: object) -> int:
    """Return a key version number, refusing bools and negatives that would bind the wrong row."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError("key version must be a non-negative integer")
    return version


def require_text(value: object, what: str) -> str:
    """Return a non-empty string used as a name in bound context (AAD, HPKE info, kid)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string")
    return value


def canonical(obj: object) -> bytes:
    """Encode ``obj`` with ckms's canonical JSON, the form every bound context (AAD, info) uses."""
    return canonical_json(obj)
