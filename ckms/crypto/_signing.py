"""Ed25519 signing of events, acks and audit checkpoints.

Keys are raw: a 32-byte private seed and a 32-byte public key. A signer's key id is
``"ed25519:" + base64url(sha256(public)[:16])`` without padding (22 characters): short enough
for a Kafka header, long enough (128 bits) that two keys never share one.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ed25519

from ckms.crypto._encoding import b64url, require_bytes
from ckms.errors import ConfigError, CryptoError, IntegrityError

ED25519_KEY_BYTES: Final = 32
ED25519_SIGNATURE_BYTES: Final = 64
KEY_ID_PREFIX: Final = "ed25519:"
_KEY_ID_DIGEST_BYTES: Final = 16
_BAD_SIGNATURE: Final = "signature failed integrity check"


def _private(private: bytes) -> ed25519.Ed25519PrivateKey:
    """Load a raw Ed25519 private key, refusing any other length."""
    data = require_bytes(private, "signing key")
    if len(data) != ED25519_KEY_BYTES:
        raise CryptoError(f"signing key must be {ED25519_KEY_BYTES} raw bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(data)


def generate_signing_key() -> bytes:
    """Create a raw 32-byte Ed25519 private key for the controller or an agent identity."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()


def signing_public_key(private: bytes) -> bytes:
    """Return the raw 32-byte public key that peers pin for ``private``."""
    return _private(private).public_key().public_bytes_raw()


def signer_key_id(public: bytes) -> str:
    """Return the short id (``ed25519:`` + base64url of 16 bytes of SHA-256) that names a signer."""
    data = require_bytes(public, "public key")
    if len(data) != ED25519_KEY_BYTES:
        raise CryptoError(f"Ed25519 public key must be {ED25519_KEY_BYTES} raw bytes")
    return KEY_ID_PREFIX + b64url(hashlib.sha256(data).digest()[:_KEY_ID_DIGEST_BYTES])


def sign(private: bytes, data: bytes) -> bytes:
    """Sign the exact bytes ``data``; Ed25519 is deterministic, so equal inputs sign equally."""
    return _private(private).sign(require_bytes(data, "data to sign"))


def verify_signature(public: bytes, data: bytes, signature: bytes) -> None:
    """Verify an Ed25519 signature; any failure, malformed input included, raises IntegrityError."""
    try:
        key_bytes = require_bytes(public, "public key")
        message = require_bytes(data, "signed data")
        sig = require_bytes(signature, "signature")
    except ConfigError:
        raise IntegrityError(_BAD_SIGNATURE) from None
    if len(key_bytes) != ED25519_KEY_BYTES or len(sig) != ED25519_SIGNATURE_BYTES:
        raise IntegrityError(_BAD_SIGNATURE)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key_bytes).verify(sig, message)
    except Exception:  # InvalidSignature, or a public key that is not a curve point
        raise IntegrityError(_BAD_SIGNATURE) from None
