"""HPKE (RFC 9180) wrapping of key material for exactly one agent.

Suites (all base mode, HKDF-SHA256, AES-256-GCM):

- ``x25519``: DHKEM(X25519, HKDF-SHA256). Private key: 32 raw bytes; public key: 32 raw bytes.
- ``mlkem768-x25519``: the hybrid post-quantum KEM ``MLKEM768-X25519`` of pyca/cryptography.
  Private key: ML-KEM-768 seed (64 bytes) || X25519 private key (32 bytes), 96 bytes. Public
  key: ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32 bytes), 1216 bytes.

Wrapped blob layout (format version 1)::

    0x01 || suite id (0x01 x25519, 0x02 mlkem768-x25519) || HPKE enc || ciphertext || tag

where ``enc || ciphertext || tag`` is exactly what ``hpke.Suite.encrypt`` returns. The HPKE
``info`` is the canonical JSON of ``{"agent", "ctx": "ckms.wrap.v1", "key", "suite",
"version"}``, so a blob opens only for the agent, key name, version and suite it was made for.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from ckms.crypto._encoding import canonical, require_bytes, require_text, require_version
from ckms.errors import ConfigError, CryptoError, IntegrityError


class WrapSuite(StrEnum):
    """The HPKE suites an agent's wrapping key can use; the value names it in config and state."""

    X25519 = "x25519"
    MLKEM768_X25519 = "mlkem768-x25519"


WRAP_FORMAT_V1: Final = 0x01
WRAP_CONTEXT: Final = "ckms.wrap.v1"
_SUITE_IDS: Final = {WrapSuite.X25519: 0x01, WrapSuite.MLKEM768_X25519: 0x02}
_SUITES_BY_ID: Final = {v: k for k, v in _SUITE_IDS.items()}
_KEMS: Final = {
    WrapSuite.X25519: hpke.KEM.X25519,
    WrapSuite.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519,
}

X25519_BYTES: Final = 32
MLKEM768_SEED_BYTES: Final = 64
MLKEM768_PUBLIC_BYTES: Final = 1184
PRIVATE_KEY_BYTES: Final = {
    WrapSuite.X25519: X25519_BYTES,
    WrapSuite.MLKEM768_X25519: MLKEM768_SEED_BYTES + X25519_BYTES,
}
PUBLIC_KEY_BYTES: Final = {
    WrapSuite.X25519: X25519_BYTES,
    WrapSuite.MLKEM768_X25519: MLKEM768_PUBLIC_BYTES + X25519_BYTES,
}
_TAG_BYTES: Final = 16
_WRAP_FAILED: Final = "wrapped key failed integrity check"


def _coerce_suite(suite: object) -> WrapSuite:
    """Accept a WrapSuite or its string value, refusing unknown suites."""
    try:
        return WrapSuite(suite)
    except ValueError:
        raise ConfigError(f"unsupported wrapping suite {suite!r}") from None


def _hpke_suite(suite: WrapSuite) -> hpke.Suite:
    """Build the RFC 9180 suite: the KEM of ``suite`` with HKDF-SHA256 and AES-256-GCM."""
    return hpke.Suite(_KEMS[suite], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(*, key_name: str, version: int, agent_id: str, suite: WrapSuite) -> bytes:
    """Build the HPKE info that binds the blob to one key version, one agent and one suite."""
    return canonical(
        {
            "agent": require_text(agent_id, "agent id"),
            "ctx": WRAP_CONTEXT,
            "key": require_text(key_name, "key name"),
            "suite": suite.value,
            "version": require_version(version),
        }
    )


def _private_parts(
    suite: WrapSuite, data: bytes
) -> tuple[mlkem.MLKEM768PrivateKey | None, x25519.X25519PrivateKey]:
    """Split a serialized wrapping private key into its ML-KEM and X25519 halves (ValueError)."""
    if len(data) != PRIVATE_KEY_BYTES[suite]:
        raise ValueError("wrong private key length")
    if suite is WrapSuite.X25519:
        return None, x25519.X25519PrivateKey.from_private_bytes(data)
    return (
        mlkem.MLKEM768PrivateKey.from_seed_bytes(data[:MLKEM768_SEED_BYTES]),
        x25519.X25519PrivateKey.from_private_bytes(data[MLKEM768_SEED_BYTES:]),
    )


def _private_key(
    suite: WrapSuite, data: bytes
) -> x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey:
    """Load a serialized wrapping private key as the object HPKE decrypts with."""
    mlkem_key, x_key = _private_parts(suite, data)
    return x_key if mlkem_key is None else hpke.MLKEM768X25519PrivateKey(mlkem_key, x_key)


def _public_key(
    suite: WrapSuite, data: bytes
) -> x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey:
    """Load a raw wrapping public key (ValueError if it has the wrong shape)."""
    if len(data) != PUBLIC_KEY_BYTES[suite]:
        raise ValueError("wrong public key length")
    if suite is WrapSuite.X25519:
        return x25519.X25519PublicKey.from_public_bytes(data)
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(data[:MLKEM768_PUBLIC_BYTES]),
        x25519.X25519PublicKey.from_public_bytes(data[MLKEM768_PUBLIC_BYTES:]),
    )


def _serialize_pair(
    mlkem_key: mlkem.MLKEM768PrivateKey | None, x_key: x25519.X25519PrivateKey
) -> tuple[bytes, bytes]:
    """Serialize a (hybrid) wrapping key pair into the documented raw layouts."""
    x_private = x_key.private_bytes_raw()
    x_public = x_key.public_key().public_bytes_raw()
    if mlkem_key is None:
        return x_private, x_public
    return (
        mlkem_key.private_bytes_raw() + x_private,
        mlkem_key.public_key().public_bytes_raw() + x_public,
    )


def generate_wrapping_keypair(suite: WrapSuite = WrapSuite.X25519) -> tuple[bytes, bytes]:
    """Create a wrapping key pair: (private bytes kept on the host, public bytes to enrol)."""
    s = _coerce_suite(suite)
    mlkem_key = None
    if s is WrapSuite.MLKEM768_X25519:
        try:
            mlkem_key = mlkem.MLKEM768PrivateKey.generate()
        except UnsupportedAlgorithm:
            raise CryptoError(f"this OpenSSL build cannot do the {s} suite") from None
    return _serialize_pair(mlkem_key, x25519.X25519PrivateKey.generate())


def wrapping_public_key(agent_private: bytes, suite: WrapSuite = WrapSuite.X25519) -> bytes:
    """Recompute the public half of a wrapping key, so an agent can re-announce it after restart."""
    s = _coerce_suite(suite)
    data = require_bytes(agent_private, "wrapping private key")
    try:
        mlkem_key, x_key = _private_parts(s, data)
    except Exception:
        raise CryptoError(f"wrapping private key is not a valid {s} key") from None
    return _serialize_pair(mlkem_key, x_key)[1]


def wrap_for_agent(
    agent_public: bytes,
    material: bytes,
    *,
    key_name: str,
    version: int,
    agent_id: str,
    suite: WrapSuite = WrapSuite.X25519,
) -> bytes:
    """Encrypt material to one agent's wrapping key, bound to key name, version and agent id."""
    s = _coerce_suite(suite)
    public = require_bytes(agent_public, "agent wrapping public key")
    plaintext = require_bytes(material, "key material")
    info = _info(key_name=key_name, version=version, agent_id=agent_id, suite=s)
    try:
        recipient = _public_key(s, public)
    except Exception:
        raise CryptoError(f"agent wrapping public key is not a valid {s} key") from None
    try:
        body = _hpke_suite(s).encrypt(plaintext, recipient, info)
    except Exception:  # e.g. a low-order X25519 point
        raise CryptoError("could not wrap key material for agent") from None
    return bytes([WRAP_FORMAT_V1, _SUITE_IDS[s]]) + body


def unwrap_for_agent(
    agent_private: bytes, blob: bytes, *, key_name: str, version: int, agent_id: str
) -> bytes:
    """Decrypt a :func:`wrap_for_agent` blob; every failure raises the same IntegrityError."""
    error = IntegrityError(_WRAP_FAILED)
    try:
        private = require_bytes(agent_private, "wrapping private key")
        data = require_bytes(blob, "wrapped key")
    except ConfigError:
        raise error from None
    if len(data) < 2 or data[0] != WRAP_FORMAT_V1 or data[1] not in _SUITES_BY_ID:
        raise error
    s = _SUITES_BY_ID[data[1]]
    if len(data) < 2 + _KEMS[s].enc_length() + _TAG_BYTES:
        raise error
    try:
        info = _info(key_name=key_name, version=version, agent_id=agent_id, suite=s)
        recipient = _private_key(s, private)
        return _hpke_suite(s).decrypt(data[2:], recipient, info)
    except Exception:  # InvalidTag, wrong key shape, bad context: all look the same
        raise error from None
