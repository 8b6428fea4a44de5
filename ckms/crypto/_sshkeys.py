"""One Ed25519 key for two jobs: an agent's SSH identity and its ack-signing key.

The raw 32-byte seed (as made by :func:`~ckms.crypto.generate_signing_key`) is stored once; these
recipes give the same key in OpenSSH form, so asyncssh can authenticate with it and the
controller can check that the SSH key of a connection is the key that signs its acks.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ckms.crypto._encoding import require_bytes
from ckms.errors import CryptoError


def signing_key_openssh(private: bytes) -> bytes:
    """The raw Ed25519 private key as an unencrypted OpenSSH private key file."""
    data = require_bytes(private, "signing key")
    if len(data) != 32:
        raise CryptoError("signing key must be 32 raw bytes")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(data)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def signing_public_openssh(public: bytes) -> str:
    """The raw Ed25519 public key as one OpenSSH public key line (``ssh-ed25519 AAAA...``)."""
    data = require_bytes(public, "public key")
    if len(data) != 32:
        raise CryptoError("Ed25519 public key must be 32 raw bytes")
    key = ed25519.Ed25519PublicKey.from_public_bytes(data)
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
