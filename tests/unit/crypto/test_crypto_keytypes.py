"""Key generation, canonical encodings, validation, digests and public keys."""

from __future__ import annotations

import hashlib
import hmac
import math
import string

import pytest

# Tests are the independent second opinion on formats, so they load keys with pyca directly.
from cryptography.hazmat.primitives import serialization  # noqa: TID251
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519  # noqa: TID251

from ckms.crypto import (
    KeyType,
    generate,
    hmac_identifier,
    is_keyed_digest,
    material_digest,
    public_key_pem,
    validate_material,
)
from ckms.errors import ConfigError, IntegrityError

PRIVATE_TYPES = [
    KeyType.ED25519,
    KeyType.ECDSA_P256,
    KeyType.ECDSA_P384,
    KeyType.RSA_3072,
    KeyType.RSA_4096,
    KeyType.X25519,
]


@pytest.mark.parametrize("key_type", list(KeyType))
@pytest.mark.requirement("SP800-130-GENERATE")
def test_every_type_generates_validates_and_digests(
    key_type: KeyType, materials: dict[KeyType, bytes]
) -> None:
    material = materials[key_type]
    validate_material(key_type, material)
    validate_material(key_type.value, material)  # the stored string value works too
    key = bytes(range(32))
    digest = material_digest(key, material)
    assert digest == "hmac-sha256:" + hmac.new(key, material, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("key_type", [KeyType.AES_256, KeyType.HMAC_SHA256])
@pytest.mark.requirement("PCI-3.7.1")
def test_symmetric_material_is_32_random_bytes(key_type: KeyType) -> None:
    a, b = generate(key_type), generate(key_type)
    assert len(a) == len(b) == 32
    assert a != b


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [
        (KeyType.ED25519, ed25519.Ed25519PrivateKey),
        (KeyType.X25519, x25519.X25519PrivateKey),
        (KeyType.ECDSA_P256, ec.EllipticCurvePrivateKey),
        (KeyType.ECDSA_P384, ec.EllipticCurvePrivateKey),
        (KeyType.RSA_3072, rsa.RSAPrivateKey),
        (KeyType.RSA_4096, rsa.RSAPrivateKey),
    ],
)
def test_private_material_is_unencrypted_pkcs8_der(
    key_type: KeyType, expected: type, materials: dict[KeyType, bytes]
) -> None:
    key = serialization.load_der_private_key(materials[key_type], password=None)
    assert isinstance(key, expected)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert key.curve.name == {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1"}[key_type]
    if isinstance(key, rsa.RSAPrivateKey):
        assert key.key_size == int(key_type.value.split("-")[1])
        assert key.public_key().public_numbers().e == 65537


def test_secret_defaults_to_32_url_safe_alphanumerics() -> None:
    secret = generate(KeyType.SECRET).decode("ascii")
    assert len(secret) == 32
    assert set(secret) <= set(string.ascii_letters + string.digits)


def test_secret_honours_length_and_alphabet() -> None:
    secret = generate(KeyType.SECRET, length=4096, alphabet="ab").decode()
    assert len(secret) == 4096
    assert set(secret) == {"a", "b"}  # 2**-4095 chance of a false failure
    unicode_secret = generate(KeyType.SECRET, length=56, alphabet="äöüß€")
    validate_material(KeyType.SECRET, unicode_secret)
    assert len(unicode_secret.decode("utf-8")) == 56


@pytest.mark.parametrize(
    ("length", "alphabet", "bits", "needed"),
    [(8, "0123456789", "26.6", 39), (20, "abcdef", "51.7", 50), (127, "ab", "127.0", 128)],
)
@pytest.mark.requirement("SP800-130-GENERATE", "PCI-3.7.1")
def test_a_secret_spec_below_128_bits_is_refused_saying_why(
    length: int, alphabet: str, bits: str, needed: int
) -> None:
    with pytest.raises(ConfigError) as refused:
        generate(KeyType.SECRET, length=length, alphabet=alphabet)
    message = str(refused.value)
    assert f"{bits} bits of entropy" in message and "at least 128" in message
    assert f"at least {needed} characters" in message
    assert len(generate(KeyType.SECRET, length=needed, alphabet=alphabet)) == needed


@pytest.mark.parametrize("length", [7, 4097, 0, -1, True, "32", 8.0])
def test_secret_length_out_of_bounds_is_refused(length: object) -> None:
    with pytest.raises(ConfigError):
        generate(KeyType.SECRET, length=length)  # type: ignore[arg-type]


@pytest.mark.parametrize("alphabet", ["", "a", "aab", "ab c", "ab\n", "ab\x00", b"ab"])
def test_bad_alphabets_are_refused(alphabet: object) -> None:
    with pytest.raises(ConfigError):
        generate(KeyType.SECRET, alphabet=alphabet)  # type: ignore[arg-type]


@pytest.mark.parametrize("key_type", [kt for kt in KeyType if kt is not KeyType.SECRET])
def test_length_and_alphabet_are_refused_for_other_types(key_type: KeyType) -> None:
    with pytest.raises(ConfigError, match="secret"):
        generate(key_type, length=32)
    with pytest.raises(ConfigError, match="secret"):
        generate(key_type, alphabet="abc")


@pytest.mark.parametrize("name", ["x509", "aes-128", "", "AES-256"])
def test_unknown_key_types_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        generate(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("key_type", list(KeyType))
def test_material_of_another_type_is_refused(
    key_type: KeyType, materials: dict[KeyType, bytes]
) -> None:
    for other, material in materials.items():
        if other is key_type:
            continue
        # Any 32 bytes are a valid aes-256 / hmac-sha256 key (a default 32-character secret
        # too), and random bytes are sometimes printable UTF-8: those pairs cannot be told apart.
        # A tls-cert version is 32 random bytes too (a version id; the key lives on the host).
        symmetric = {KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.TLS_CERT}
        if key_type in symmetric and other in symmetric | {KeyType.SECRET}:
            continue
        if key_type is KeyType.SECRET and other in symmetric:
            continue
        with pytest.raises(IntegrityError):
            validate_material(key_type, material)


@pytest.mark.parametrize(
    ("key_type", "material"),
    [
        (KeyType.AES_256, b"\x00" * 31),
        (KeyType.AES_256, b"\x00" * 33),
        (KeyType.HMAC_SHA256, b""),
        (KeyType.SECRET, b"short"),
        (KeyType.SECRET, b"\xff" * 16),
        (KeyType.SECRET, b"has a space here"),
        (KeyType.SECRET, b"\x00" * 16),
        (KeyType.SECRET, b"a" * 4097),
        (KeyType.ED25519, b""),
        (KeyType.ED25519, b"\x30" * 48),
        (KeyType.RSA_3072, b"not der at all"),
    ],
)
def test_malformed_material_is_refused(key_type: KeyType, material: bytes) -> None:
    with pytest.raises(IntegrityError, match=f"^{key_type.value} key material"):
        validate_material(key_type, material)


def test_non_canonical_encodings_are_refused(materials: dict[KeyType, bytes]) -> None:
    key = serialization.load_der_private_key(materials[KeyType.ED25519], password=None)
    # Traditional OpenSSL (not PKCS#8) and PEM encodings load but are not canonical.
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(IntegrityError):
        validate_material(KeyType.ED25519, pem)
    ec_key = serialization.load_der_private_key(materials[KeyType.ECDSA_P256], password=None)
    traditional = ec_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(IntegrityError):
        validate_material(KeyType.ECDSA_P256, traditional)
    with pytest.raises(IntegrityError):
        validate_material(KeyType.ED25519, materials[KeyType.ED25519] + b"\x00")


def _with_exponent(material: bytes, e: int) -> bytes:
    """Re-key an RSA private key with another public exponent (same primes), as PKCS#8 DER."""
    key = serialization.load_der_private_key(material, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    numbers = key.private_numbers()
    p, q = numbers.p, numbers.q
    d = pow(e, -1, (p - 1) * (q - 1) // math.gcd(p - 1, q - 1))
    rebuilt = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    ).private_key()
    return rebuilt.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_rsa_with_wrong_size_or_exponent_is_refused(materials: dict[KeyType, bytes]) -> None:
    with pytest.raises(IntegrityError):
        validate_material(KeyType.RSA_3072, materials[KeyType.RSA_4096])
    with pytest.raises(IntegrityError):
        validate_material(KeyType.RSA_4096, materials[KeyType.RSA_3072])
    material = materials[KeyType.RSA_3072]
    for e in (65539, 65543, 65551):  # primes; one is coprime to lambda(n) in practice
        try:
            other = _with_exponent(material, e)
        except ValueError:
            continue
        validate_material(KeyType.RSA_3072, _with_exponent(material, 65537))  # control
        with pytest.raises(IntegrityError):
            validate_material(KeyType.RSA_3072, other)
        return
    pytest.fail("no usable exponent")


def test_inconsistent_rsa_key_is_refused_by_the_full_check(
    materials: dict[KeyType, bytes],
) -> None:
    key = serialization.load_der_private_key(materials[KeyType.RSA_3072], password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    n = key.private_numbers()
    broken = rsa.RSAPrivateNumbers(
        p=n.p,
        q=n.q,
        d=n.d + 2,  # wrong private exponent: the structure is fine, the math is not
        dmp1=n.dmp1,
        dmq1=n.dmq1,
        iqmp=n.iqmp,
        public_numbers=n.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)
    der = broken.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(IntegrityError):
        validate_material(KeyType.RSA_3072, der)


def test_text_is_never_taken_as_material() -> None:
    with pytest.raises(ConfigError):
        validate_material(KeyType.SECRET, "a-secret-as-str")  # type: ignore[arg-type]


@pytest.mark.parametrize("key_type", PRIVATE_TYPES)
def test_public_key_pem_matches_the_private_key(
    key_type: KeyType, materials: dict[KeyType, bytes]
) -> None:
    pem = public_key_pem(key_type, materials[key_type])
    assert pem is not None and pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    private = serialization.load_der_private_key(materials[key_type], password=None)
    expected = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pem == expected


@pytest.mark.parametrize("key_type", [KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.SECRET])
def test_public_key_pem_is_none_for_symmetric_types(
    key_type: KeyType, materials: dict[KeyType, bytes]
) -> None:
    assert public_key_pem(key_type, materials[key_type]) is None


def test_material_digest_known_answer() -> None:
    assert material_digest(bytes(range(32)), b"abc") == (
        "hmac-sha256:f0133729c4163dede81e21cd47839256da58171238c8a0d874397c73b14e1e47"
    )
    assert is_keyed_digest(material_digest(bytes(32), b"abc"))
    assert not is_keyed_digest("sha256:" + "0" * 64)


def test_a_digest_in_an_event_does_not_give_away_a_low_entropy_secret() -> None:
    """The attack: read a digest off the events topic and try every 4-digit secret. Against
    the plain SHA-256 digests events carried before, it finds the secret at once; against the
    keyed digest, with every key the reader could know, it finds nothing."""
    secret = b"4821"
    candidates = [f"{n:04d}".encode() for n in range(10_000)]
    plain = "sha256:" + hashlib.sha256(secret).hexdigest()
    assert [c for c in candidates if "sha256:" + hashlib.sha256(c).hexdigest() == plain] == [secret]
    digest_key = bytes(range(1, 33))  # the fleet's; the reader does not have it
    keyed = material_digest(digest_key, secret)
    guessable_keys = [b"", bytes(32), b"ckms", b"4821"]
    hits = [
        c
        for c in candidates
        for k in guessable_keys
        if "hmac-sha256:" + hmac.new(k, c, hashlib.sha256).hexdigest() == keyed
        or "sha256:" + hashlib.sha256(c).hexdigest() == keyed
    ]
    assert hits == []
    assert material_digest(digest_key, secret) == keyed  # the agent, holding the key, checks it


def test_hmac_identifier_is_keyed_prefixed_and_stable() -> None:
    key = bytes(range(32))
    value = "web-01.prod.example.com"
    first = hmac_identifier(key, value)
    assert first.startswith("hmac:") and len(first) == 5 + 64
    assert hmac_identifier(key, value) == first
    assert hmac_identifier(bytes(32), value) != first
    assert hmac_identifier(key, value + ".") != first
    assert value not in first
    # RFC 4231 test case 2 with a 16+ byte key is not available; check against hashlib instead.
    import hmac as std_hmac

    assert first == "hmac:" + std_hmac.new(key, value.encode(), "sha256").hexdigest()


@pytest.mark.parametrize("key", [b"", b"short", "x" * 32])
def test_hmac_identifier_refuses_weak_or_textual_keys(key: object) -> None:
    with pytest.raises(ConfigError):
        hmac_identifier(key, "value")  # type: ignore[arg-type]
