"""Install formats: how a version's canonical material is written to a file on a host.

- ``raw``: the canonical bytes (PKCS#8 DER for private keys, UTF-8 for ``secret``).
- ``base64``: standard base64 of the canonical bytes, with one trailing newline.
- ``pem``: unencrypted PKCS#8 PEM (private key types only).
- ``openssh``: OpenSSH private key format (ed25519, ecdsa-p256/p384, rsa only; OpenSSH has no
  X25519 keys). The encoding holds a random check integer, so it differs on every call.
- ``jwk``: one JWK (RFC 7517/7518/8037) as canonical JSON, ``kid`` = ``"<key name>#<version>"``:
  ``oct`` for aes-256 (``alg`` A256GCM), hmac-sha256 (HS256) and secret (its UTF-8 bytes);
  ``OKP`` for ed25519 (EdDSA) and x25519; ``EC`` for P-256 (ES256) and P-384 (ES384); ``RSA``
  with all CRT parameters and no ``alg`` (the same key may serve RS256 or PS256).
- ``keyring-json``: every usable version in one file, made by :func:`encode_keyring` and read
  back by :func:`decode_keyring` (canonical JSON)::

      {"format": "ckms-keyring", "v": 1, "key": <name>, "type": <key type>,
       "primary": <primary version>,
       "versions": [{"version": n, "state": s, "primary": bool, "material": b64}, ...]}

  ``versions`` is sorted by version number; exactly one entry is primary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ckms.crypto._encoding import (
    b64,
    b64decode_strict,
    b64url,
    canonical,
    require_bytes,
    require_text,
    require_version,
)
from ckms.crypto._keytypes import (
    PRIVATE_KEY_TYPES,
    KeyType,
    coerce_key_type,
    load_private_key,
    validate_material,
)
from ckms.errors import ConfigError


class InstallFormat(StrEnum):
    """The file formats an install spec can name."""

    RAW = "raw"
    BASE64 = "base64"
    PEM = "pem"
    OPENSSH = "openssh"
    JWK = "jwk"
    KEYRING_JSON = "keyring-json"
    TLS_PEM = "tls-pem"
    """A ``tls-cert``: the agent writes its own key, the certificate, chain and CA bundle as PEM
    files in the directory the path names (see ``ckms_agent.certs``)."""


KEYRING_FORMAT: Final = "ckms-keyring"
KEYRING_VERSION: Final = 1

_COMMON: Final = frozenset(
    {InstallFormat.RAW, InstallFormat.BASE64, InstallFormat.JWK, InstallFormat.KEYRING_JSON}
)
_PRIVATE: Final = _COMMON | {InstallFormat.PEM}
_SSH: Final = _PRIVATE | {InstallFormat.OPENSSH}

ALLOWED_FORMATS: Final[Mapping[KeyType, frozenset[InstallFormat]]] = {
    KeyType.AES_256: _COMMON,
    KeyType.HMAC_SHA256: _COMMON,
    KeyType.SECRET: _COMMON,
    KeyType.ED25519: _SSH,
    KeyType.ECDSA_P256: _SSH,
    KeyType.ECDSA_P384: _SSH,
    KeyType.RSA_3072: _SSH,
    KeyType.RSA_4096: _SSH,
    KeyType.X25519: _PRIVATE,
    KeyType.TLS_CERT: frozenset({InstallFormat.TLS_PEM}),
}

_JWK_OCT_ALG: Final = {KeyType.AES_256: "A256GCM", KeyType.HMAC_SHA256: "HS256"}
_JWK_EC: Final = {KeyType.ECDSA_P256: ("P-256", "ES256"), KeyType.ECDSA_P384: ("P-384", "ES384")}


def allowed_formats(key_type: KeyType) -> frozenset[InstallFormat]:
    """Return the install formats that can carry ``key_type``, so specs are checked when written."""
    return ALLOWED_FORMATS[coerce_key_type(key_type)]


def _coerce_format(fmt: object) -> InstallFormat:
    """Accept an InstallFormat or its string value, refusing unknown formats."""
    try:
        return InstallFormat(fmt)
    except ValueError:
        raise ConfigError(f"unsupported install format {fmt!r}") from None


def _check_allowed(kt: KeyType, fmt: InstallFormat) -> None:
    """Refuse a format that cannot carry the key type, naming both."""
    allowed = ALLOWED_FORMATS[kt]
    if fmt not in allowed:
        names = ", ".join(sorted(allowed))
        raise ConfigError(
            f"install format '{fmt}' is not available for key type '{kt}' (allowed: {names})"
        )


def _uint(value: int, size: int | None = None) -> str:
    """Encode a non-negative integer as a JWK Base64urlUInt (fixed ``size`` for EC coordinates)."""
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(length, "big"))


def _jwk(kt: KeyType, material: bytes, key: PrivateKeyTypes | None, kid: str) -> dict[str, Any]:
    """Build the JWK members for one version's material (``key`` is its loaded private key)."""
    if key is None:
        jwk: dict[str, Any] = {"kty": "oct", "k": b64url(material), "kid": kid}
        if kt in _JWK_OCT_ALG:
            jwk["alg"] = _JWK_OCT_ALG[kt]
        return jwk
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url(key.public_key().public_bytes_raw()),
            "d": b64url(key.private_bytes_raw()),
            "kid": kid,
            "alg": "EdDSA",
        }
    if isinstance(key, x25519.X25519PrivateKey):
        return {
            "kty": "OKP",
            "crv": "X25519",
            "x": b64url(key.public_key().public_bytes_raw()),
            "d": b64url(key.private_bytes_raw()),
            "kid": kid,
        }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        crv, alg = _JWK_EC[kt]
        size = (key.curve.key_size + 7) // 8
        numbers = key.private_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _uint(numbers.public_numbers.x, size),
            "y": _uint(numbers.public_numbers.y, size),
            "d": _uint(numbers.private_value, size),
            "kid": kid,
            "alg": alg,
        }
    assert isinstance(key, rsa.RSAPrivateKey)
    priv = key.private_numbers()
    return {
        "kty": "RSA",
        "n": _uint(priv.public_numbers.n),
        "e": _uint(priv.public_numbers.e),
        "d": _uint(priv.d),
        "p": _uint(priv.p),
        "q": _uint(priv.q),
        "dp": _uint(priv.dmp1),
        "dq": _uint(priv.dmq1),
        "qi": _uint(priv.iqmp),
        "kid": kid,
    }


def _check_installable(kt: KeyType, material: bytes) -> PrivateKeyTypes | None:
    """Check material before it is written, returning the loaded private key if it has one."""
    if kt not in PRIVATE_KEY_TYPES:
        validate_material(kt, material)
        return None
    # All checks except RSA key math, which validate_material ran before the material was
    # sealed; at install time the material is digest-checked and 0.35 s per RSA-4096 is too dear.
    return load_private_key(kt, material, check_rsa_math=False)


def encode_for_install(
    key_type: KeyType, material: bytes, fmt: InstallFormat, *, key_name: str, version: int
) -> bytes:
    """Render one version's material in an install format, refusing formats that cannot carry it.

    The material must be canonical for ``key_type`` (IntegrityError otherwise); the RSA
    consistency check of :func:`validate_material` is skipped, as material reaching an install
    has already passed it and is digest-checked.
    """
    kt = coerce_key_type(key_type)
    f = _coerce_format(fmt)
    _check_allowed(kt, f)
    name = require_text(key_name, "key name")
    number = require_version(version)
    if f is InstallFormat.KEYRING_JSON:
        raise ConfigError("keyring-json holds every usable version: build it with encode_keyring")
    if f is InstallFormat.TLS_PEM:
        raise ConfigError("a tls-cert is installed by the agent from its own key and certificate")
    data = require_bytes(material, "key material")
    key = _check_installable(kt, data)
    if f is InstallFormat.RAW:
        return data
    if f is InstallFormat.BASE64:
        return b64(data).encode("ascii") + b"\n"
    if f is InstallFormat.JWK:
        return canonical(_jwk(kt, data, key, f"{name}#{number}"))
    if key is None:  # unreachable: the table allows pem and openssh only for private keys
        raise ConfigError(f"install format '{f}' is not available for key type '{kt}'")
    private_format = (
        serialization.PrivateFormat.PKCS8
        if f is InstallFormat.PEM
        else serialization.PrivateFormat.OpenSSH
    )
    return key.private_bytes(
        serialization.Encoding.PEM, private_format, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class KeyringEntry:
    """One version in a keyring file; ``material`` (canonical encoding) is kept out of the repr."""

    version: int
    material: bytes = field(repr=False)
    primary: bool
    state: str


def encode_keyring(key_type: KeyType, entries: Sequence[KeyringEntry], *, key_name: str) -> bytes:
    """Render the ``keyring-json`` file: every usable version, exactly one marked primary."""
    kt = coerce_key_type(key_type)
    name = require_text(key_name, "key name")
    if not entries:
        raise ConfigError("a keyring needs at least one version")
    seen: set[int] = set()
    primaries: list[int] = []
    versions: list[dict[str, Any]] = []
    for entry in sorted(entries, key=lambda e: require_version(e.version)):
        if entry.version in seen:
            raise ConfigError(f"version {entry.version} appears twice in the keyring")
        seen.add(entry.version)
        if not isinstance(entry.primary, bool):
            raise ConfigError("keyring entry primary flag must be a bool")
        state = require_text(entry.state, "version state")
        _check_installable(kt, entry.material)
        if entry.primary:
            primaries.append(entry.version)
        versions.append(
            {
                "version": entry.version,
                "state": state,
                "primary": entry.primary,
                "material": b64(bytes(entry.material)),
            }
        )
    if len(primaries) != 1:
        raise ConfigError(f"a keyring needs exactly one primary version, got {len(primaries)}")
    return canonical(
        {
            "format": KEYRING_FORMAT,
            "v": KEYRING_VERSION,
            "key": name,
            "type": kt.value,
            "primary": primaries[0],
            "versions": versions,
        }
    )


def decode_keyring(data: bytes) -> dict[int, bytes]:
    """Read a ``keyring-json`` file back: its versions' material by version number.

    The reverse of :func:`encode_keyring` (the agent rewrites a keyring from it when a version is
    revoked offline). Anything that is not such a file raises ConfigError, naming no material.
    """
    try:
        ring = json.loads(require_bytes(data, "keyring"))
        if ring.get("format") != KEYRING_FORMAT or ring.get("v") != KEYRING_VERSION:
            raise ValueError("not a ckms keyring")
        out: dict[int, bytes] = {}
        for entry in ring["versions"]:
            material = b64decode_strict(entry["material"])
            if material is None:
                raise ValueError("material is not base64")
            out[require_version(entry["version"])] = material
        return out
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError):
        raise ConfigError("the file is not a readable ckms keyring") from None
