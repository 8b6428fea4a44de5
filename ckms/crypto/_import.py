"""Bring your own key: material from a file, checked and converted to its canonical encoding.

:func:`import_material` reads what an operator brings (KMIP's Register) and returns exactly what
:func:`~ckms.crypto.generate` would have produced for the type (see ``_keytypes.py``), so an
imported version is sealed, digested, wrapped and installed like a generated one.

Formats, by type (``auto`` recognises each from its first bytes):

- ``aes-256``, ``hmac-sha256``: ``raw`` (the 32 bytes), ``hex`` or ``base64`` (text, one
  trailing newline allowed), ``jwk`` (``kty`` ``oct``).
- ``secret``: ``raw`` (its UTF-8 text; one trailing newline is dropped), ``jwk`` (``oct``).
- private keys: ``pem`` (PKCS#8, or the traditional ``RSA``/``EC PRIVATE KEY`` blocks),
  ``der`` (PKCS#8 or traditional), ``openssh`` (not for x25519), ``jwk`` (``OKP``, ``EC``,
  ``RSA`` with every CRT parameter). ``raw`` is the canonical PKCS#8 DER itself.

Refused, each with a message that says what was found, never what the bytes are: the wrong type
(an ECDSA P-384 key for ``ecdsa-p256``), size, curve or RSA exponent; public keys, certificates
and encrypted files; RSA keys that fail OpenSSL's consistency check; a JWK whose public part
does not match its private part, or whose ``use``/``key_ops``/``alg`` exclude the key's usage;
symmetric keys with fewer than :data:`MIN_DISTINCT_BYTES` distinct bytes (all zero, a repeated
pattern); secrets whose entropy estimate is under :data:`~ckms.crypto.MIN_SECRET_BITS`.
Every refusal is a ConfigError raised ``from None``: no parser's text (which may quote input)
is chained to it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import string
from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ckms.crypto._encoding import require_bytes
from ckms.crypto._keytypes import (
    _EC_CURVES,
    _RSA_BITS,
    _RSA_PUBLIC_EXPONENT,
    HOST_KEYED_TYPES,
    MIN_SECRET_BITS,
    PRIVATE_KEY_TYPES,
    SECRET_MAX_LENGTH,
    SECRET_MIN_LENGTH,
    SYMMETRIC_KEY_BYTES,
    SYMMETRIC_TYPES,
    KeyType,
    _is_secret_char,
    _pkcs8_der,
    coerce_key_type,
    validate_material,
)
from ckms.errors import ConfigError

__all__ = [
    "IMPORT_FORMATS",
    "MAX_IMPORT_BYTES",
    "MIN_DISTINCT_BYTES",
    "ImportFormat",
    "import_formats",
    "import_material",
]


class ImportFormat(StrEnum):
    """The file formats ``ckms key import`` reads."""

    AUTO = "auto"
    RAW = "raw"
    HEX = "hex"
    BASE64 = "base64"
    PEM = "pem"
    DER = "der"
    OPENSSH = "openssh"
    JWK = "jwk"


MAX_IMPORT_BYTES: Final = 16 * 1024
"""Largest file read for an import (an RSA-4096 JWK is about 3.2 KiB)."""

MIN_DISTINCT_BYTES: Final = 8
"""Fewest distinct byte values a 32-byte symmetric key may have. Random keys have about 30;
fewer than 8 happens by chance with probability under 2^-100, and is what an all-zero key, a
repeated pattern or a hand-typed string looks like."""

_F = ImportFormat
_SYMMETRIC_FORMATS: Final = frozenset({_F.RAW, _F.HEX, _F.BASE64, _F.JWK})
_PRIVATE_FORMATS: Final = frozenset({_F.RAW, _F.PEM, _F.DER, _F.JWK})
IMPORT_FORMATS: Final[Mapping[KeyType, frozenset[ImportFormat]]] = {
    KeyType.AES_256: _SYMMETRIC_FORMATS,
    KeyType.HMAC_SHA256: _SYMMETRIC_FORMATS,
    KeyType.SECRET: frozenset({_F.RAW, _F.JWK}),
    KeyType.ED25519: _PRIVATE_FORMATS | {_F.OPENSSH},
    KeyType.ECDSA_P256: _PRIVATE_FORMATS | {_F.OPENSSH},
    KeyType.ECDSA_P384: _PRIVATE_FORMATS | {_F.OPENSSH},
    KeyType.RSA_3072: _PRIVATE_FORMATS | {_F.OPENSSH},
    KeyType.RSA_4096: _PRIVATE_FORMATS | {_F.OPENSSH},
    KeyType.X25519: _PRIVATE_FORMATS,
}

# What a JWK's ``use``/``key_ops`` permit, in ckms usage names (RFC 7517 §4.2, §4.3).
_SIG_USAGE: Final = frozenset({"sign", "verify", "mac-generate", "mac-verify", "authenticate"})
_ENC_USAGE: Final = frozenset(
    {"encrypt", "decrypt", "wrap-key", "unwrap-key", "key-agreement", "derive-key"}
)
_JWK_USE: Final = {"sig": _SIG_USAGE, "enc": _ENC_USAGE}
_JWK_OPS: Final = {
    "sign": frozenset({"sign", "mac-generate", "authenticate"}),
    "verify": frozenset({"verify", "mac-verify", "authenticate"}),
    "encrypt": frozenset({"encrypt"}),
    "decrypt": frozenset({"decrypt"}),
    "wrapKey": frozenset({"wrap-key"}),
    "unwrapKey": frozenset({"unwrap-key"}),
    "deriveKey": frozenset({"derive-key", "key-agreement"}),
    "deriveBits": frozenset({"derive-key", "key-agreement"}),
}
_RSA_ALGS: Final = {
    **{a: _SIG_USAGE for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    **{a: _ENC_USAGE for a in ("RSA-OAEP", "RSA-OAEP-256")},
}
_JWK_ALGS: Final[Mapping[KeyType, Mapping[str, frozenset[str]]]] = {
    KeyType.AES_256: {a: _ENC_USAGE for a in ("A256GCM", "A256KW", "A256GCMKW", "dir")},
    KeyType.HMAC_SHA256: {"HS256": _SIG_USAGE},
    KeyType.ED25519: {"EdDSA": _SIG_USAGE, "Ed25519": _SIG_USAGE},
    KeyType.ECDSA_P256: {"ES256": _SIG_USAGE},
    KeyType.ECDSA_P384: {"ES384": _SIG_USAGE},
    KeyType.RSA_3072: _RSA_ALGS,
    KeyType.RSA_4096: _RSA_ALGS,
    KeyType.X25519: {a: _ENC_USAGE for a in ("ECDH-ES", "ECDH-ES+A256KW")},
}
_JWK_CRV: Final = {
    KeyType.ED25519: ("OKP", "Ed25519"),
    KeyType.X25519: ("OKP", "X25519"),
    KeyType.ECDSA_P256: ("EC", "P-256"),
    KeyType.ECDSA_P384: ("EC", "P-384"),
}
_EC_NAMES: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def import_formats(key_type: KeyType | str) -> frozenset[ImportFormat]:
    """The formats an import of ``key_type`` accepts (``auto`` besides)."""
    return IMPORT_FORMATS[_importable(key_type)]


def _importable(key_type: KeyType | str) -> KeyType:
    kt = coerce_key_type(key_type)
    if kt in HOST_KEYED_TYPES:
        raise ConfigError(
            f"key type '{kt}' cannot be imported: each host makes its own private key and the "
            "controller's CA certifies it, so no key material exists to bring"
        )
    if kt not in IMPORT_FORMATS:
        raise ConfigError(f"key type '{kt}' cannot be imported")
    return kt


def _refuse(message: str) -> ConfigError:
    return ConfigError(f"cannot import: {message}")


def import_material(
    key_type: KeyType | str,
    data: bytes,
    fmt: ImportFormat | str = ImportFormat.AUTO,
    *,
    usage: Collection[str] = (),
) -> bytes:
    """Read ``data`` in ``fmt`` as material of ``key_type``; return its canonical encoding.

    ``usage`` is the key's usage mask (ckms names), checked against what a JWK permits. The full
    :func:`~ckms.crypto.validate_material` check (RSA consistency included) runs on the result.
    """
    kt = _importable(key_type)
    raw = require_bytes(data, "imported file")
    try:
        f = ImportFormat(fmt)
    except ValueError:
        raise _refuse(f"unknown format {str(fmt)[:20]!r}") from None
    if not raw:
        raise _refuse("the file is empty")
    if len(raw) > MAX_IMPORT_BYTES:
        raise _refuse(f"the file is larger than {MAX_IMPORT_BYTES} bytes")
    if f is ImportFormat.AUTO:
        f = _detect(kt, raw)
    allowed = IMPORT_FORMATS[kt]
    if f not in allowed:
        names = ", ".join(sorted(allowed))
        raise _refuse(f"format '{f}' cannot carry a {kt} key (formats: {names})")
    if f is ImportFormat.JWK:
        material = _from_jwk(kt, raw, frozenset(usage))
    elif kt in SYMMETRIC_TYPES:
        material = _symmetric(kt, raw, f)
    elif kt is KeyType.SECRET:
        material = _secret(_strip_newline(raw))
    else:
        material = _canonical_private(kt, _load_private(kt, raw, f))
    try:
        validate_material(kt, material)
    except Exception:  # IntegrityError/ConfigError: say what, not which bytes
        raise _refuse(f"the material is not a valid {kt} key") from None
    return material


def _detect(kt: KeyType, raw: bytes) -> ImportFormat:
    """Guess the format from the first bytes; ambiguous files must name their format."""
    head = raw.lstrip()[:40]
    if kt in SYMMETRIC_TYPES and len(raw) == SYMMETRIC_KEY_BYTES:
        return ImportFormat.RAW
    if kt is KeyType.SECRET:
        return ImportFormat.JWK if head.startswith(b"{") else ImportFormat.RAW
    if head.startswith(b"{"):
        return ImportFormat.JWK
    if head.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        return ImportFormat.OPENSSH
    if head.startswith(b"-----BEGIN"):
        return ImportFormat.PEM
    if kt in PRIVATE_KEY_TYPES and raw[:1] == b"\x30":
        return ImportFormat.DER
    if kt in SYMMETRIC_TYPES:
        raise _refuse(
            f"a raw {kt} key is exactly {SYMMETRIC_KEY_BYTES} bytes; for text give --format hex "
            "or base64"
        )
    raise _refuse(f"the file is not PEM, DER, OpenSSH or JWK (for {kt})")


def _strip_newline(raw: bytes) -> bytes:
    """Drop the one line ending an editor or ``echo`` leaves at the end of a text file."""
    for ending in (b"\r\n", b"\n"):
        if raw.endswith(ending):
            return raw[: -len(ending)]
    return raw


# -- symmetric and secret ------------------------------------------------------------------


def _symmetric(kt: KeyType, raw: bytes, f: ImportFormat) -> bytes:
    if f is ImportFormat.RAW:
        key = raw
    else:
        text = _strip_newline(raw).strip()
        try:
            if f is ImportFormat.HEX:
                key = bytes.fromhex(text.decode("ascii"))
            else:
                key = base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise _refuse(f"the file is not {f} text") from None
    return _check_symmetric(kt, key)


def _check_symmetric(kt: KeyType, key: bytes) -> bytes:
    if len(key) != SYMMETRIC_KEY_BYTES:
        raise _refuse(
            f"a {kt} key is {SYMMETRIC_KEY_BYTES} bytes ({8 * SYMMETRIC_KEY_BYTES} bits); the "
            f"file holds {len(key)} bytes"
        )
    if len(set(key)) < MIN_DISTINCT_BYTES:
        raise _refuse(
            f"the {kt} key has fewer than {MIN_DISTINCT_BYTES} distinct byte values: it is not "
            "random (all zero, a repeated pattern or typed text); generate keys with a CSPRNG"
        )
    return key


def secret_entropy_estimate(text: str) -> float:
    """An upper bound of a secret's entropy: length x log2(size of the character classes used).

    Classes: lower-case letters, upper-case letters, digits, other printable ASCII, and any
    other character counted as a class of its own size 1,000. A secret refused under this bound
    is weak for certain; one that passes may still be a guessable phrase (ckms cannot know).
    """
    pool = 0
    if any(c in string.ascii_lowercase for c in text):
        pool += 26
    if any(c in string.ascii_uppercase for c in text):
        pool += 26
    if any(c in string.digits for c in text):
        pool += 10
    if any(c in string.punctuation for c in text):
        pool += len(string.punctuation)
    if any(not c.isascii() for c in text):
        pool += 1000
    distinct = len(set(text))
    return len(text) * math.log2(max(pool, 2)) if distinct > 1 else 0.0


def _secret(raw: bytes) -> bytes:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("a secret must be UTF-8 text") from None
    if not SECRET_MIN_LENGTH <= len(text) <= SECRET_MAX_LENGTH:
        raise _refuse(
            f"a secret is {SECRET_MIN_LENGTH} to {SECRET_MAX_LENGTH} characters; the file "
            f"holds {len(text)}"
        )
    if not all(_is_secret_char(c) for c in text):
        raise _refuse("a secret may only hold printable characters without spaces")
    bits = secret_entropy_estimate(text)
    if bits < MIN_SECRET_BITS:
        raise _refuse(
            f"the secret carries at most {bits:.0f} bits of entropy (length x log2 of the "
            f"character classes it uses); at least {MIN_SECRET_BITS} are required, since every "
            "host holds the key its digest is made with"
        )
    return raw


# -- private keys --------------------------------------------------------------------------


def _load_private(kt: KeyType, raw: bytes, f: ImportFormat) -> PrivateKeyTypes:
    """Load a private key from PEM, DER (raw) or OpenSSH, naming what else the file holds."""
    if f in (ImportFormat.PEM, ImportFormat.OPENSSH):
        text = raw.lstrip()
        if b"ENCRYPTED" in text[:64] or b"Proc-Type: 4,ENCRYPTED" in text:
            raise _refuse("the file is encrypted: decrypt it first (import takes no passphrase)")
        if text.startswith((b"-----BEGIN PUBLIC KEY", b"-----BEGIN RSA PUBLIC KEY")):
            raise _refuse("the file holds a public key; import needs the private key")
        if text.startswith(b"-----BEGIN CERTIFICATE"):
            raise _refuse("the file holds a certificate; import needs the private key")
    try:
        if f is ImportFormat.OPENSSH:
            key: Any = serialization.load_ssh_private_key(raw, password=None)
        elif f is ImportFormat.PEM:
            key = serialization.load_pem_private_key(
                raw, password=None, unsafe_skip_rsa_key_validation=True
            )
        else:
            key = serialization.load_der_private_key(
                raw, password=None, unsafe_skip_rsa_key_validation=True
            )
    except TypeError:  # pyca: the key is encrypted and no password was given
        raise _refuse(
            "the file is encrypted: decrypt it first (import takes no passphrase)"
        ) from None
    except Exception:  # ValueError/UnsupportedAlgorithm: their text may quote the input
        if f is ImportFormat.DER and _is_public_der(raw):
            raise _refuse("the file holds a public key; import needs the private key") from None
        raise _refuse(f"the file is not a readable unencrypted {f} private key") from None
    return _check_kind(kt, key)


def _is_public_der(raw: bytes) -> bool:
    try:
        serialization.load_der_public_key(raw)
    except Exception:
        return False
    return True


def _describe(key: object) -> str:
    """What kind of key was found, for a mismatch message (never any of its values)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 private key"
    if isinstance(key, x25519.X25519PrivateKey):
        return "an X25519 private key"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an ECDSA {_EC_NAMES.get(key.curve.name, key.curve.name)} private key"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} private key"
    return f"a {type(key).__name__.removeprefix('_')} key"


def _check_kind(kt: KeyType, key: object) -> PrivateKeyTypes:
    """Refuse a key of another algorithm, curve, size or RSA exponent than ``kt``."""
    if kt is KeyType.ED25519:
        ok = isinstance(key, ed25519.Ed25519PrivateKey)
    elif kt is KeyType.X25519:
        ok = isinstance(key, x25519.X25519PrivateKey)
    elif kt in _EC_CURVES:
        ok = isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _EC_CURVES[kt])
    else:
        ok = isinstance(key, rsa.RSAPrivateKey) and key.key_size == _RSA_BITS[kt]
    if not ok:
        raise _refuse(f"the file holds {_describe(key)}, not a {kt} key")
    if isinstance(key, rsa.RSAPrivateKey):
        e = key.public_key().public_numbers().e
        if e != _RSA_PUBLIC_EXPONENT:
            raise _refuse(
                f"the RSA public exponent is {e}; ckms uses {_RSA_PUBLIC_EXPONENT} only (small "
                "exponents invite padding attacks)"
            )
    return key  # type: ignore[return-value]  # one of the four classes checked above


def _canonical_private(kt: KeyType, key: PrivateKeyTypes) -> bytes:
    """The canonical PKCS#8 DER; an RSA key must pass OpenSSL's full consistency check."""
    der = _pkcs8_der(key)
    if isinstance(key, rsa.RSAPrivateKey):
        try:
            serialization.load_der_private_key(der, password=None)
        except Exception:
            raise _refuse("the RSA key fails its consistency check (p, q, d, CRT values)") from None
    return der


# -- JWK -----------------------------------------------------------------------------------


def _b64url_member(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise _refuse(f"the JWK has no '{name}' member")
    if "=" in value or not all(c.isalnum() or c in "-_" for c in value):
        raise _refuse(f"the JWK member '{name}' is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error):
        raise _refuse(f"the JWK member '{name}' is not base64url") from None


def _uint(jwk: Mapping[str, Any], name: str) -> int:
    return int.from_bytes(_b64url_member(jwk, name), "big")


def _from_jwk(kt: KeyType, raw: bytes, usage: frozenset[str]) -> bytes:
    try:
        jwk = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refuse("the file is not JSON (a JWK)") from None
    if isinstance(jwk, dict) and isinstance(jwk.get("keys"), list):
        if len(jwk["keys"]) != 1:
            raise _refuse("the JWK set must hold exactly one key")
        jwk = jwk["keys"][0]
    if not isinstance(jwk, dict):
        raise _refuse("the JWK is not a JSON object")
    kty = jwk.get("kty")
    want_kty = "oct" if kt in SYMMETRIC_TYPES or kt is KeyType.SECRET else None
    if kt in _JWK_CRV:
        want_kty, want_crv = _JWK_CRV[kt]
        if kty != want_kty or jwk.get("crv") != want_crv:
            raise _refuse(
                f"the JWK is kty {str(kty)[:10]!r} crv {str(jwk.get('crv'))[:10]!r}, not a {kt} "
                f"key ({want_kty} {want_crv})"
            )
    elif kt in _RSA_BITS:
        want_kty = "RSA"
    if kty != want_kty:
        raise _refuse(f"the JWK is kty {str(kty)[:10]!r}, not a {kt} key ({want_kty})")
    _check_jwk_usage(kt, jwk, usage)
    if kty == "oct":
        k = _b64url_member(jwk, "k")
        return _secret(k) if kt is KeyType.SECRET else _check_symmetric(kt, k)
    if "d" not in jwk:
        raise _refuse("the JWK holds a public key only; import needs the private key ('d')")
    key: PrivateKeyTypes
    if kty == "OKP":
        d = _b64url_member(jwk, "d")
        try:
            key = (
                ed25519.Ed25519PrivateKey.from_private_bytes(d)
                if kt is KeyType.ED25519
                else x25519.X25519PrivateKey.from_private_bytes(d)
            )
        except ValueError:
            raise _refuse(f"the JWK 'd' is not a {kt} private key") from None
        x = _b64url_member(jwk, "x")
        if not hmac.compare_digest(key.public_key().public_bytes_raw(), x):
            raise _refuse("the JWK public key 'x' does not belong to its private key 'd'")
    elif kty == "EC":
        curve = _EC_CURVES[kt]()
        public = ec.EllipticCurvePublicNumbers(_uint(jwk, "x"), _uint(jwk, "y"), curve)
        try:
            key = ec.EllipticCurvePrivateNumbers(_uint(jwk, "d"), public).private_key()
        except ValueError:
            raise _refuse(
                "the JWK EC key is invalid (its point is not on the curve, or "
                "'x'/'y' do not belong to 'd')"
            ) from None
        if key.public_key().public_numbers() != public:
            raise _refuse("the JWK public point 'x'/'y' does not belong to its private key 'd'")
    else:
        members = ("n", "e", "d", "p", "q", "dp", "dq", "qi")
        missing = [m for m in members if m not in jwk]
        if missing:
            raise _refuse(f"the RSA JWK lacks {', '.join(missing)} (every CRT member is needed)")
        n, e, d, p, q, dp, dq, qi = (_uint(jwk, m) for m in members)
        if e != _RSA_PUBLIC_EXPONENT:
            raise _refuse(f"the RSA public exponent is {e}; ckms uses {_RSA_PUBLIC_EXPONENT} only")
        try:
            key = rsa.RSAPrivateNumbers(
                p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)
            ).private_key()
        except ValueError:
            raise _refuse("the RSA JWK is inconsistent (n, d, p, q or a CRT value)") from None
        _check_kind(kt, key)
    return _canonical_private(kt, key)


def _check_jwk_usage(kt: KeyType, jwk: Mapping[str, Any], usage: frozenset[str]) -> None:
    """Refuse a JWK whose ``use``, ``key_ops`` or ``alg`` exclude part of the key's usage."""
    kt_algs = _JWK_ALGS.get(kt, {})
    limits: list[tuple[str, frozenset[str]]] = []
    use = jwk.get("use")
    if use is not None:
        if use not in _JWK_USE:
            raise _refuse(f"the JWK 'use' {str(use)[:10]!r} is not 'sig' or 'enc'")
        limits.append((f"'use' {use}", _JWK_USE[use]))
    ops = jwk.get("key_ops")
    if ops is not None:
        if not isinstance(ops, list) or not all(isinstance(o, str) and o in _JWK_OPS for o in ops):
            raise _refuse("the JWK 'key_ops' is not a list of RFC 7517 operations")
        allowed: frozenset[str] = frozenset().union(*(_JWK_OPS[o] for o in ops))
        limits.append((f"'key_ops' {','.join(ops)}", allowed))
    alg = jwk.get("alg")
    if alg is not None:
        if kt is KeyType.SECRET:
            raise _refuse("a secret's JWK names no 'alg'")
        if not isinstance(alg, str) or alg not in kt_algs:
            known = ", ".join(sorted(kt_algs))
            raise _refuse(f"the JWK 'alg' {str(alg)[:16]!r} is not one of a {kt} key ({known})")
        limits.append((f"'alg' {alg}", kt_algs[alg]))
    for what, allowed in limits:
        outside = sorted(usage - allowed)
        if outside:
            raise _refuse(
                f"the JWK's {what} excludes this key's usage {', '.join(outside)}: import it as "
                "a key of the usage the JWK was made for"
            )
