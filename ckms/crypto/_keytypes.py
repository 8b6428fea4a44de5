"""Key types, their generation and their canonical encodings.

The canonical encoding of a version's material is what the store seals, what ``material_digest``
hashes and what agents check after unwrapping:

- ``aes-256``, ``hmac-sha256``: the raw 32 key bytes.
- ``ed25519``, ``x25519``, ``ecdsa-p256``, ``ecdsa-p384``, ``rsa-3072``, ``rsa-4096``: the
  unencrypted PKCS#8 DER of the private key exactly as pyca/cryptography writes it (RSA with
  public exponent 65537). Bytes that load but re-encode differently are not canonical.
- ``secret``: the UTF-8 bytes of 8..4096 printable, non-space characters, generated with at
  least 128 bits of entropy (length x log2(alphabet size); weaker specs are refused).
- ``tls-cert``: 32 random bytes naming the version (its digest tells versions apart). A
  certificate's private key is made on each host and never reaches the controller, which
  only signs the host's CSR (``ckms.crypto._x509``); these bytes are no key and are never
  installed.
"""

from __future__ import annotations

import hmac
import math
import secrets
import string
from enum import StrEnum
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ckms.crypto._encoding import require_bytes
from ckms.errors import ConfigError, IntegrityError


class KeyType(StrEnum):
    """The key types ckms can generate; the value names the type in specs, the store and events."""

    AES_256 = "aes-256"
    HMAC_SHA256 = "hmac-sha256"
    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    X25519 = "x25519"
    SECRET = "secret"  # noqa: S105 - a type name, not a credential
    TLS_CERT = "tls-cert"


SYMMETRIC_TYPES: Final = frozenset({KeyType.AES_256, KeyType.HMAC_SHA256})
HOST_KEYED_TYPES: Final = frozenset({KeyType.TLS_CERT})
"""Types whose private key each host makes for itself: the controller holds only a version id."""
PRIVATE_KEY_TYPES: Final = frozenset(
    {
        KeyType.ED25519,
        KeyType.ECDSA_P256,
        KeyType.ECDSA_P384,
        KeyType.RSA_3072,
        KeyType.RSA_4096,
        KeyType.X25519,
    }
)

SYMMETRIC_KEY_BYTES: Final = 32
SECRET_DEFAULT_LENGTH: Final = 32
SECRET_MIN_LENGTH: Final = 8
SECRET_MAX_LENGTH: Final = 4096
SECRET_DEFAULT_ALPHABET: Final = string.ascii_letters + string.digits
"""URL-safe alphanumerics: 62 symbols, so the default 32 characters carry about 190 bits."""
MIN_SECRET_BITS: Final = 128
"""Least entropy (length x log2(alphabet size)) of a generated secret: below it, a guess per
candidate, against a digest or the service the secret guards, is within reach."""

_RSA_PUBLIC_EXPONENT: Final = 65537
_RSA_BITS: Final = {KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}
_EC_CURVES: Final[dict[KeyType, type[ec.EllipticCurve]]] = {
    KeyType.ECDSA_P256: ec.SECP256R1,
    KeyType.ECDSA_P384: ec.SECP384R1,
}


def coerce_key_type(key_type: object) -> KeyType:
    """Accept a KeyType or its string value (as stored), refusing unknown or unbuilt types."""
    try:
        return KeyType(key_type)
    except ValueError:
        raise ConfigError(f"unsupported key type {key_type!r}") from None


def _check_alphabet(alphabet: object) -> str:
    """Refuse alphabets that would bias or break the draw (duplicates, spaces, control chars)."""
    if not isinstance(alphabet, str):
        raise ConfigError("secret alphabet must be a string")
    if len(set(alphabet)) != len(alphabet):
        raise ConfigError("secret alphabet must not repeat a character (it would bias the draw)")
    if len(alphabet) < 2:
        raise ConfigError("secret alphabet needs at least 2 characters")
    if not all(_is_secret_char(c) for c in alphabet):
        raise ConfigError("secret alphabet may only hold printable, non-space characters")
    return alphabet


def _is_secret_char(char: str) -> bool:
    """Say whether a character may appear in a generated secret (copy-pastable, no whitespace)."""
    return char.isprintable() and not char.isspace()


def _check_length(length: object) -> int:
    """Refuse secret lengths outside the documented bounds."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise ConfigError("secret length must be an integer")
    if not SECRET_MIN_LENGTH <= length <= SECRET_MAX_LENGTH:
        raise ConfigError(
            f"secret length must be between {SECRET_MIN_LENGTH} and {SECRET_MAX_LENGTH} characters"
        )
    return length


def secret_entropy_bits(length: int, alphabet: str) -> float:
    """Entropy of a secret of ``length`` characters drawn uniformly from ``alphabet``."""
    return length * math.log2(len(alphabet))


def check_secret_spec(length: int | None, alphabet: str | None) -> tuple[int, str]:
    """Return the (length, alphabet) a ``secret`` is generated with, refusing weak specs."""
    n = _check_length(SECRET_DEFAULT_LENGTH if length is None else length)
    chars = _check_alphabet(SECRET_DEFAULT_ALPHABET if alphabet is None else alphabet)
    bits = secret_entropy_bits(n, chars)
    if bits < MIN_SECRET_BITS:
        needed = math.ceil(MIN_SECRET_BITS / math.log2(len(chars)))
        raise ConfigError(
            f"a secret of {n} characters from an alphabet of {len(chars)} carries {bits:.1f} "
            f"bits of entropy (length x log2(alphabet size)); at least {MIN_SECRET_BITS} are "
            "required so that neither a digest nor guessing can recover it: use at least "
            f"{needed} characters with this alphabet, or a larger alphabet"
        )
    return n, chars


def _pkcs8_der(key: PrivateKeyTypes) -> bytes:
    """Serialize a private key to the canonical unencrypted PKCS#8 DER."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate(key_type: KeyType, *, length: int | None = None, alphabet: str | None = None) -> bytes:
    """Generate fresh material for a new version and return its canonical encoding."""
    kt = coerce_key_type(key_type)
    if kt is not KeyType.SECRET and (length is not None or alphabet is not None):
        raise ConfigError(f"length and alphabet apply only to key type 'secret', not '{kt}'")
    if kt in SYMMETRIC_TYPES or kt in HOST_KEYED_TYPES:
        return secrets.token_bytes(SYMMETRIC_KEY_BYTES)
    if kt is KeyType.SECRET:
        n, chars = check_secret_spec(length, alphabet)
        return "".join(secrets.choice(chars) for _ in range(n)).encode("utf-8")
    key: PrivateKeyTypes
    if kt is KeyType.ED25519:
        key = ed25519.Ed25519PrivateKey.generate()
    elif kt is KeyType.X25519:
        key = x25519.X25519PrivateKey.generate()
    elif kt in _EC_CURVES:
        key = ec.generate_private_key(_EC_CURVES[kt]())
    else:
        key = rsa.generate_private_key(_RSA_PUBLIC_EXPONENT, _RSA_BITS[kt])
    return _pkcs8_der(key)


def _invalid(kt: KeyType) -> IntegrityError:
    """Build the one error for material that is not a canonical encoding of its type."""
    return IntegrityError(f"{kt} key material is not a valid canonical encoding")


def load_private_key(
    key_type: KeyType, material: bytes, *, check_rsa_math: bool = True
) -> PrivateKeyTypes:
    """Load canonical private-key material, checking algorithm, size and exact encoding.

    ``check_rsa_math=False`` skips OpenSSL's RSA consistency check (primality of p and q, which
    costs ~0.15 s for RSA-3072 and ~0.35 s for RSA-4096). Only callers whose material already
    passed :func:`validate_material` and is integrity-protected since (sealed at rest, or
    digest-checked after unwrapping) may skip it; everything else is still checked.
    """
    kt = coerce_key_type(key_type)
    if kt not in PRIVATE_KEY_TYPES:
        raise ConfigError(f"key type '{kt}' has no private key")
    data = require_bytes(material, "key material")
    try:
        # Cheap structural load first; the costly RSA math check runs only on a key that
        # already has the right type, size and encoding.
        key = serialization.load_der_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=True
        )
    except Exception:  # pyca raises ValueError/TypeError/UnsupportedAlgorithm; all mean "bad"
        raise _invalid(kt) from None
    if kt is KeyType.ED25519:
        ok = isinstance(key, ed25519.Ed25519PrivateKey)
    elif kt is KeyType.X25519:
        ok = isinstance(key, x25519.X25519PrivateKey)
    elif kt in _EC_CURVES:
        ok = isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _EC_CURVES[kt])
    else:
        ok = (
            isinstance(key, rsa.RSAPrivateKey)
            and key.key_size == _RSA_BITS[kt]
            and key.public_key().public_numbers().e == _RSA_PUBLIC_EXPONENT
        )
    if not ok or not hmac.compare_digest(_pkcs8_der(key), data):
        raise _invalid(kt)
    if check_rsa_math and isinstance(key, rsa.RSAPrivateKey):
        try:
            key = serialization.load_der_private_key(data, password=None)
        except Exception:
            raise _invalid(kt) from None
    return key


def validate_material(key_type: KeyType, material: bytes) -> None:
    """Check that bytes are a canonical encoding of ``key_type``, so bad material is never stored.

    This is the full check, RSA key consistency included; run it when material is generated or
    imported, before it is sealed.
    """
    kt = coerce_key_type(key_type)
    data = require_bytes(material, "key material")
    if kt in SYMMETRIC_TYPES or kt in HOST_KEYED_TYPES:
        if len(data) != SYMMETRIC_KEY_BYTES:
            raise _invalid(kt)
    elif kt is KeyType.SECRET:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(kt) from None
        if not SECRET_MIN_LENGTH <= len(text) <= SECRET_MAX_LENGTH or not all(
            _is_secret_char(c) for c in text
        ):
            raise _invalid(kt)
    else:
        load_private_key(kt, data)


def public_key_pem(key_type: KeyType, material: bytes) -> bytes | None:
    """Return the SubjectPublicKeyInfo PEM of a private key; None for symmetric and secret types."""
    kt = coerce_key_type(key_type)
    if kt not in PRIVATE_KEY_TYPES:
        return None
    key = load_private_key(kt, material, check_rsa_math=False)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
