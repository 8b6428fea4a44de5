"""AES-256-GCM sealing of material at rest, bound to the row it belongs to.

Sealed blob layout (format version 1)::

    0x01 || nonce (12 random bytes) || AES-256-GCM ciphertext || tag (16 bytes)

The GCM associated data is the format-version byte followed by the caller's ``aad``, so a blob
can never be opened as another format version. ``version_aad`` builds the ``aad`` that binds a
key version's name, number, type and usage: a database row edited to change any of them no
longer opens.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ckms.crypto._encoding import canonical, require_bytes, require_text, require_version
from ckms.errors import ConfigError, CryptoError, IntegrityError

SEAL_FORMAT_V1: Final = 0x01
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
VERSION_AAD_CONTEXT: Final = "ckms.version.v1"
STAGED_AAD_CONTEXT: Final = "ckms.staged-import.v1"


def new_data_kek() -> bytes:
    """Return a fresh 256-bit data KEK; it is stored only sealed under the root KEK."""
    return secrets.token_bytes(KEY_BYTES)


def _cipher(key: bytes) -> AESGCM:
    """Build the AES-256-GCM cipher, refusing anything but a 32-byte key."""
    k = require_bytes(key, "sealing key")
    if len(k) != KEY_BYTES:
        raise CryptoError(f"sealing key must be {KEY_BYTES} bytes")
    return AESGCM(k)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``key`` with a fresh nonce, binding ``aad``, to store it."""
    cipher = _cipher(key)
    data = require_bytes(plaintext, "plaintext")
    bound = require_bytes(aad, "associated data")
    header = bytes([SEAL_FORMAT_V1])
    # 96-bit random nonces: the store seals far fewer than 2**32 blobs under one data KEK.
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + cipher.encrypt(nonce, data, header + bound)


def open_sealed(key: bytes, blob: bytes, aad: bytes, *, what: str = "sealed data") -> bytes:
    """Decrypt a :func:`seal` blob; every failure raises the same IntegrityError naming ``what``."""
    error = IntegrityError(f"{what} failed integrity check")
    try:
        cipher = _cipher(key)
        data = require_bytes(blob, "sealed blob")
        bound = require_bytes(aad, "associated data")
    except (ConfigError, CryptoError):
        raise error from None
    if len(data) < 1 + NONCE_BYTES + TAG_BYTES or data[0] != SEAL_FORMAT_V1:
        raise error
    nonce = data[1 : 1 + NONCE_BYTES]
    try:
        return cipher.decrypt(nonce, data[1 + NONCE_BYTES :], data[:1] + bound)
    except Exception:  # InvalidTag, or anything else pyca raises: all look the same
        raise error from None


def version_aad(key_name: str, version: int, key_type: str, usage: Sequence[str]) -> bytes:
    """Return canonical JSON binding a version's identity and usage, to use as its sealing AAD."""
    name = require_text(key_name, "key name")
    number = require_version(version)
    kind = str(require_text(key_type, "key type"))
    if isinstance(usage, str) or not all(isinstance(u, str) and u for u in usage):
        raise ConfigError("usage must be a sequence of non-empty strings")
    return canonical(
        {
            "ctx": VERSION_AAD_CONTEXT,
            "key": name,
            "version": number,
            "type": kind,
            "usage": sorted(usage),
        }
    )


def staged_aad(operation: str, key_name: str, key_type: str, usage: Sequence[str]) -> bytes:
    """AAD of imported material sealed while its operation waits (dual control): bound to the
    operation and the key it is for, so it opens for nothing else."""
    if isinstance(usage, str) or not all(isinstance(u, str) and u for u in usage):
        raise ConfigError("usage must be a sequence of non-empty strings")
    return canonical(
        {
            "ctx": STAGED_AAD_CONTEXT,
            "operation": require_text(operation, "operation"),
            "key": require_text(key_name, "key name"),
            "type": require_text(key_type, "key type"),
            "usage": sorted(usage),
        }
    )
