"""Install formats: every allowed (type, format) round-trips through pyca's own loaders."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

# Tests are the independent second opinion on formats, so they load keys with pyca directly.
from cryptography.hazmat.primitives import serialization  # noqa: TID251
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519  # noqa: TID251

from ckms.crypto import (
    InstallFormat,
    KeyringEntry,
    KeyType,
    allowed_formats,
    decode_keyring,
    encode_for_install,
    encode_keyring,
    generate,
)
from ckms.errors import ConfigError, IntegrityError
from ckms.protocol.canonical import parse_canonical_json

F = InstallFormat
SINGLE = {F.RAW, F.BASE64, F.JWK, F.KEYRING_JSON}
# Written out by hand so the test does not just restate the code's table.
EXPECTED_ALLOWED = {
    KeyType.AES_256: SINGLE,
    KeyType.HMAC_SHA256: SINGLE,
    KeyType.SECRET: SINGLE,
    KeyType.X25519: SINGLE | {F.PEM},
    KeyType.ED25519: SINGLE | {F.PEM, F.OPENSSH},
    KeyType.ECDSA_P256: SINGLE | {F.PEM, F.OPENSSH},
    KeyType.ECDSA_P384: SINGLE | {F.PEM, F.OPENSSH},
    KeyType.RSA_3072: SINGLE | {F.PEM, F.OPENSSH},
    KeyType.RSA_4096: SINGLE | {F.PEM, F.OPENSSH},
    KeyType.TLS_CERT: {F.TLS_PEM},
}
SINGLE_VERSION_COMBOS = [
    (kt, fmt)
    for kt, fmts in EXPECTED_ALLOWED.items()
    for fmt in sorted(fmts)
    if fmt not in (F.KEYRING_JSON, F.TLS_PEM)
]
REFUSED_COMBOS = [
    (kt, fmt) for kt in KeyType for fmt in InstallFormat if fmt not in EXPECTED_ALLOWED[kt]
]


def _pkcs8(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _b64url_int(text: str) -> int:
    assert "=" not in text
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _b64url_bytes(text: str) -> bytes:
    assert "=" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_tls_cert_is_never_rendered_from_controller_material(
    materials: dict[KeyType, bytes],
) -> None:
    with pytest.raises(ConfigError, match="installed by the agent from its own key"):
        encode_for_install(
            KeyType.TLS_CERT, materials[KeyType.TLS_CERT], F.TLS_PEM, key_name="a/b", version=1
        )


def test_allowed_formats_table() -> None:
    for kt in KeyType:
        assert allowed_formats(kt) == EXPECTED_ALLOWED[kt], kt
        assert allowed_formats(kt.value) == EXPECTED_ALLOWED[kt]  # type: ignore[arg-type]
        assert isinstance(allowed_formats(kt), frozenset)


@pytest.mark.parametrize(("key_type", "fmt"), SINGLE_VERSION_COMBOS)
def test_install_format_round_trips(
    key_type: KeyType, fmt: InstallFormat, materials: dict[KeyType, bytes]
) -> None:
    material = materials[key_type]
    out = encode_for_install(key_type, material, fmt, key_name="team/purpose", version=7)
    if fmt is F.RAW:
        assert out == material
    elif fmt is F.BASE64:
        assert out.endswith(b"\n") and out.count(b"\n") == 1
        assert base64.b64decode(out.strip(), validate=True) == material
    elif fmt is F.PEM:
        assert out.startswith(b"-----BEGIN PRIVATE KEY-----\n")
        key = serialization.load_pem_private_key(out, password=None)
        assert _pkcs8(key) == material
    elif fmt is F.OPENSSH:
        assert out.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
        key = serialization.load_ssh_private_key(out, password=None)
        assert _pkcs8(key) == material
    else:
        _check_jwk(key_type, material, out)


def _check_jwk(key_type: KeyType, material: bytes, out: bytes) -> None:
    jwk = parse_canonical_json(out)  # also proves the JWK is canonical JSON
    assert jwk["kid"] == "team/purpose#7"
    if key_type in (KeyType.AES_256, KeyType.HMAC_SHA256, KeyType.SECRET):
        assert jwk["kty"] == "oct"
        assert _b64url_bytes(jwk["k"]) == material
        expected_alg = {KeyType.AES_256: "A256GCM", KeyType.HMAC_SHA256: "HS256"}.get(key_type)
        assert jwk.get("alg") == expected_alg
        assert set(jwk) <= {"kty", "k", "kid", "alg"}
        return
    original = serialization.load_der_private_key(
        material, password=None, unsafe_skip_rsa_key_validation=True
    )
    if key_type in (KeyType.ED25519, KeyType.X25519):
        assert jwk["kty"] == "OKP"
        cls = ed25519.Ed25519PrivateKey if key_type is KeyType.ED25519 else x25519.X25519PrivateKey
        assert jwk["crv"] == {"ed25519": "Ed25519", "x25519": "X25519"}[key_type]
        rebuilt = cls.from_private_bytes(_b64url_bytes(jwk["d"]))
        assert _b64url_bytes(jwk["x"]) == rebuilt.public_key().public_bytes_raw()
        assert jwk.get("alg") == ("EdDSA" if key_type is KeyType.ED25519 else None)
    elif key_type in (KeyType.ECDSA_P256, KeyType.ECDSA_P384):
        crv, curve, size, alg = {
            KeyType.ECDSA_P256: ("P-256", ec.SECP256R1(), 32, "ES256"),
            KeyType.ECDSA_P384: ("P-384", ec.SECP384R1(), 48, "ES384"),
        }[key_type]
        assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", crv, alg)
        for member in ("x", "y", "d"):  # RFC 7518 §6.2: full-length coordinates
            assert len(_b64url_bytes(jwk[member])) == size
        rebuilt = ec.EllipticCurvePrivateNumbers(
            _b64url_int(jwk["d"]),
            ec.EllipticCurvePublicNumbers(_b64url_int(jwk["x"]), _b64url_int(jwk["y"]), curve),
        ).private_key()
    else:
        assert jwk["kty"] == "RSA" and "alg" not in jwk
        assert _b64url_bytes(jwk["e"]) == b"\x01\x00\x01"
        rebuilt = rsa.RSAPrivateNumbers(
            p=_b64url_int(jwk["p"]),
            q=_b64url_int(jwk["q"]),
            d=_b64url_int(jwk["d"]),
            dmp1=_b64url_int(jwk["dp"]),
            dmq1=_b64url_int(jwk["dq"]),
            iqmp=_b64url_int(jwk["qi"]),
            public_numbers=rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])),
        ).private_key(unsafe_skip_rsa_key_validation=True)
        assert _b64url_bytes(jwk["n"])[0] != 0, "Base64urlUInt has no leading zero octet"
    assert _pkcs8(rebuilt) == _pkcs8(original) == material


@pytest.mark.parametrize(("key_type", "fmt"), REFUSED_COMBOS)
def test_refused_combinations_name_type_and_format(
    key_type: KeyType, fmt: InstallFormat, materials: dict[KeyType, bytes]
) -> None:
    with pytest.raises(ConfigError) as info:
        encode_for_install(key_type, materials[key_type], fmt, key_name="k/n", version=1)
    assert key_type.value in str(info.value) and fmt.value in str(info.value)


@pytest.mark.parametrize("key_type", [k for k in KeyType if k is not KeyType.TLS_CERT])
def test_keyring_json_needs_encode_keyring(
    key_type: KeyType, materials: dict[KeyType, bytes]
) -> None:
    with pytest.raises(ConfigError, match="encode_keyring"):
        encode_for_install(key_type, materials[key_type], F.KEYRING_JSON, key_name="k", version=1)


def test_invalid_material_is_refused_at_install(materials: dict[KeyType, bytes]) -> None:
    with pytest.raises(IntegrityError):
        encode_for_install(KeyType.AES_256, b"\x00" * 16, F.RAW, key_name="k", version=1)
    with pytest.raises(IntegrityError):
        encode_for_install(
            KeyType.ECDSA_P384, materials[KeyType.ECDSA_P256], F.PEM, key_name="k", version=1
        )


@pytest.mark.parametrize(
    ("name", "version"), [("", 1), ("k", -1), ("k", True), ("k", "1"), (None, 1)]
)
def test_bad_name_or_version_is_refused(name: object, version: object) -> None:
    with pytest.raises(ConfigError):
        encode_for_install(
            KeyType.AES_256,
            bytes(32),
            F.JWK,
            key_name=name,  # type: ignore[arg-type]
            version=version,  # type: ignore[arg-type]
        )


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigError):
        encode_for_install(KeyType.AES_256, bytes(32), "der", key_name="k", version=1)  # type: ignore[arg-type]


def _entries(key_type: KeyType) -> list[KeyringEntry]:
    from ckms.crypto import generate

    return [
        KeyringEntry(version=3, material=generate(key_type), primary=True, state="Active"),
        KeyringEntry(version=1, material=generate(key_type), primary=False, state="Deactivated"),
        KeyringEntry(version=2, material=generate(key_type), primary=False, state="Active"),
    ]


@pytest.mark.parametrize("key_type", [KeyType.AES_256, KeyType.SECRET, KeyType.ED25519])
def test_keyring_json_lists_every_version_and_the_primary(key_type: KeyType) -> None:
    entries = _entries(key_type)
    out = encode_keyring(key_type, entries, key_name="payments/db")
    doc = parse_canonical_json(out)
    assert doc["format"] == "ckms-keyring" and doc["v"] == 1
    assert doc["key"] == "payments/db" and doc["type"] == key_type.value
    assert doc["primary"] == 3
    assert [v["version"] for v in doc["versions"]] == [1, 2, 3]
    by_version = {e.version: e for e in entries}
    for v in doc["versions"]:
        entry = by_version[v["version"]]
        assert base64.b64decode(v["material"], validate=True) == entry.material
        assert v["state"] == entry.state and v["primary"] is entry.primary
        assert set(v) == {"version", "state", "primary", "material"}


def test_keyring_needs_exactly_one_primary() -> None:
    entries = _entries(KeyType.AES_256)
    none = [KeyringEntry(e.version, e.material, False, e.state) for e in entries]
    two = [KeyringEntry(e.version, e.material, e.version != 1, e.state) for e in entries]
    for bad in (none, two, []):
        with pytest.raises(ConfigError, match=r"primary|at least one"):
            encode_keyring(KeyType.AES_256, bad, key_name="k")


def test_keyring_refuses_repeated_versions_and_bad_material() -> None:
    entries = _entries(KeyType.AES_256)
    with pytest.raises(ConfigError, match="twice"):
        encode_keyring(KeyType.AES_256, [*entries, entries[1]], key_name="k")
    bad = [*entries[:2], KeyringEntry(9, b"short", False, "Active")]
    with pytest.raises(IntegrityError):
        encode_keyring(KeyType.AES_256, bad, key_name="k")


def test_keyring_entry_repr_hides_material() -> None:
    material = bytes(range(32))
    entry = KeyringEntry(version=1, material=material, primary=True, state="Active")
    for text in (repr(entry), str(entry)):
        assert material.hex() not in text
        assert base64.b64encode(material).decode() not in text
        assert repr(material) not in text
        assert "material" not in text
    assert "version=1" in repr(entry)


@pytest.mark.parametrize(
    ("key_type", "curve", "size"),
    [(KeyType.ECDSA_P256, ec.SECP256R1(), 32), (KeyType.ECDSA_P384, ec.SECP384R1(), 48)],
)
def test_jwk_ec_members_keep_leading_zero_octets(
    key_type: KeyType, curve: ec.EllipticCurve, size: int
) -> None:
    # A random key has a short coordinate only 1 time in 256, so search for one on purpose.
    for _ in range(20_000):
        key = ec.generate_private_key(curve)
        numbers = key.private_numbers()
        if numbers.public_numbers.x < 1 << (8 * (size - 1)):
            break
    else:
        pytest.fail("no key with a short x coordinate found")
    out = encode_for_install(key_type, _pkcs8(key), F.JWK, key_name="k", version=1)
    jwk = parse_canonical_json(out)
    assert len(_b64url_bytes(jwk["x"])) == size
    assert _b64url_bytes(jwk["x"])[0] == 0


def test_a_keyring_reads_back_and_anything_else_is_refused_without_material() -> None:
    m1, m2 = generate(KeyType.AES_256), generate(KeyType.AES_256)
    ring = encode_keyring(
        KeyType.AES_256,
        [KeyringEntry(1, m1, False, "Active"), KeyringEntry(2, m2, True, "Active")],
        key_name="a/b",
    )
    assert decode_keyring(ring) == {1: m1, 2: m2}
    doc = json.loads(ring)
    bad = [
        b"{not json",
        json.dumps({**doc, "format": "other"}).encode(),
        json.dumps({**doc, "v": 2}).encode(),
        json.dumps({**doc, "versions": [{"version": 1, "material": "!!"}]}).encode(),
        json.dumps({**doc, "versions": [{"version": -1, "material": "AA=="}]}).encode(),
    ]
    for data in bad:
        with pytest.raises(ConfigError, match="not a readable ckms keyring") as caught:
            decode_keyring(data)
        assert m1.hex() not in str(caught.value)
