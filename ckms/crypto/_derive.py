"""Keys derived from the root KEK with HKDF-SHA256, one per purpose, never stored.

``derive_from_root(root_kek, purpose)`` is HKDF-SHA256 (RFC 5869) with no salt, ``info`` =
``b"ckms.root-kek.derive.v1:" + purpose`` and a 32-byte output. Unseal derives each key once,
while it briefly holds the root KEK, and keeps it in memory with the other secrets; HKDF's
one-wayness means a derived key handed out (the digest key every agent holds) says nothing
about the root KEK or any other derived key. Purposes are fixed strings named here:

- :data:`DIGEST_KEY_PURPOSE`: the fleet's material-digest key (``material_digest``); agents
  learn it, wrapped to their own key, at enrollment;
- :data:`ROW_MAC_PURPOSE`: the key that MACs store rows whose meaning matters (``row_mac``);
  it never leaves the controller.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ckms.crypto._encoding import require_bytes, require_text
from ckms.errors import CryptoError

DERIVED_KEY_BYTES: Final = 32
DIGEST_KEY_PURPOSE: Final = "material-digest"
ROW_MAC_PURPOSE: Final = "row-mac"
_INFO_PREFIX: Final = b"ckms.root-kek.derive.v1:"


def derive_from_root(root_kek: bytes, purpose: str) -> bytes:
    """Return the 32-byte key for ``purpose`` derived from the root KEK (HKDF-SHA256)."""
    kek = require_bytes(root_kek, "root KEK")
    if len(kek) != DERIVED_KEY_BYTES:
        raise CryptoError("root KEK must be 32 bytes")
    info = _INFO_PREFIX + require_text(purpose, "derivation purpose").encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, salt=None, info=info).derive(
        kek
    )
