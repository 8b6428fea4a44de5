"""Bring your own key: every type and format comes back canonical, and bad material is refused
with a message that names what was found and never the bytes (``ckms.crypto.import_material``).

Inputs are made by ckms's own install formats and by the tools operators use (``openssl``,
``ssh-keygen``), so import reads what those really write.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization  # noqa: TID251
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: TID251

from ckms.crypto import (
    ImportFormat,
    InstallFormat,
    KeyType,
    encode_for_install,
    generate,
    import_material,
    public_key_pem,
)
from ckms.errors import ConfigError

PRIVATE = [
    KeyType.ED25519,
    KeyType.ECDSA_P256,
    KeyType.ECDSA_P384,
    KeyType.RSA_3072,
    KeyType.X25519,
]
SIGNING = ("sign", "verify")


@pytest.fixture(scope="module")
def materials() -> dict[KeyType, bytes]:
    return {kt: generate(kt) for kt in (*PRIVATE, KeyType.RSA_4096)}


def render(kt: KeyType, material: bytes, fmt: InstallFormat) -> bytes:
    return encode_for_install(kt, material, fmt, key_name="t/k", version=1)


def refused(kt: KeyType | str, data: bytes, fmt: str = "auto", **kw: object) -> str:
    """Import must refuse; the error is clean (nothing chained) and quotes no input bytes."""
    with pytest.raises(ConfigError) as info:
        import_material(kt, data, fmt, **kw)  # type: ignore[arg-type]
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    message = str(exc)
    for chunk in (data[i : i + 12] for i in range(0, len(data) - 11, 7)):
        for shown in (chunk.hex(), base64.b64encode(chunk).decode()[:12]):
            assert shown not in message
    return message


@pytest.mark.parametrize("kt", [*PRIVATE, KeyType.RSA_4096])
@pytest.mark.parametrize(
    "fmt", [InstallFormat.RAW, InstallFormat.PEM, InstallFormat.OPENSSH, InstallFormat.JWK]
)
def test_every_private_format_round_trips(
    materials: dict[KeyType, bytes], kt: KeyType, fmt: InstallFormat
) -> None:
    if kt is KeyType.X25519 and fmt is InstallFormat.OPENSSH:
        pytest.skip("OpenSSH has no X25519 keys")
    material = materials[kt]
    data = render(kt, material, fmt)
    usage = ("key-agreement",) if kt is KeyType.X25519 else SIGNING
    assert import_material(kt, data, usage=usage) == material  # auto-detected
    named = {InstallFormat.RAW: ImportFormat.DER}.get(fmt, ImportFormat(str(fmt)))
    assert import_material(kt, data, named, usage=usage) == material


@pytest.mark.parametrize("kt", [KeyType.ECDSA_P256, KeyType.RSA_3072])
def test_traditional_pem_and_der_are_read(materials: dict[KeyType, bytes], kt: KeyType) -> None:
    key = serialization.load_der_private_key(materials[kt], None)
    for encoding in (serialization.Encoding.PEM, serialization.Encoding.DER):
        data = key.private_bytes(
            encoding, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        assert import_material(kt, data) == materials[kt]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.parametrize(
    ("kt", "args"),
    [
        (KeyType.ED25519, ["-algorithm", "ed25519"]),
        (KeyType.X25519, ["-algorithm", "x25519"]),
        (KeyType.ECDSA_P256, ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        (KeyType.ECDSA_P384, ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
        (KeyType.RSA_3072, ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"]),
    ],
)
def test_keys_openssl_made_are_imported(tmp_path: Path, kt: KeyType, args: list[str]) -> None:
    pem = tmp_path / "key.pem"
    subprocess.run(["openssl", "genpkey", *args, "-out", str(pem)], check=True)
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(pem), "-outform", "DER"], check=True, capture_output=True
    ).stdout
    public = subprocess.run(
        ["openssl", "pkey", "-in", str(pem), "-pubout"], check=True, capture_output=True
    ).stdout
    material = import_material(kt, pem.read_bytes())
    assert import_material(kt, der, "der") == material
    assert public_key_pem(kt, material) == public


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
@pytest.mark.parametrize(
    ("kt", "args"),
    [
        (KeyType.ED25519, ["-t", "ed25519"]),
        (KeyType.ECDSA_P256, ["-t", "ecdsa", "-b", "256"]),
        (KeyType.ECDSA_P384, ["-t", "ecdsa", "-b", "384"]),
        (KeyType.RSA_3072, ["-t", "rsa", "-b", "3072"]),
    ],
)
def test_keys_ssh_keygen_made_are_imported(tmp_path: Path, kt: KeyType, args: list[str]) -> None:
    path = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", *args, "-N", "", "-f", str(path)], check=True)
    material = import_material(kt, path.read_bytes())
    ours = render(kt, material, InstallFormat.OPENSSH)
    mine = tmp_path / "mine"
    mine.write_bytes(ours)
    mine.chmod(0o600)
    public = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(mine)], check=True, capture_output=True, text=True
    ).stdout
    assert public.split()[:2] == path.with_suffix(".pub").read_text().split()[:2]


@pytest.mark.parametrize("kt", [KeyType.AES_256, KeyType.HMAC_SHA256])
def test_symmetric_formats_round_trip(kt: KeyType) -> None:
    key = generate(kt)
    assert import_material(kt, key) == key
    assert import_material(kt, key.hex().encode() + b"\n", "hex") == key
    assert import_material(kt, base64.b64encode(key) + b"\n", "base64") == key
    jwk = render(kt, key, InstallFormat.JWK)
    assert import_material(kt, jwk) == key
    assert import_material(kt, json.dumps({"keys": [json.loads(jwk)]}).encode()) == key


def test_secrets_round_trip_and_lose_one_trailing_newline() -> None:
    secret = generate(KeyType.SECRET)
    assert import_material(KeyType.SECRET, secret + b"\n") == secret
    assert import_material(KeyType.SECRET, render(KeyType.SECRET, secret, InstallFormat.JWK)) == (
        secret
    )


def test_wrong_type_curve_and_size_are_refused(materials: dict[KeyType, bytes]) -> None:
    p384 = render(KeyType.ECDSA_P384, materials[KeyType.ECDSA_P384], InstallFormat.PEM)
    assert "ECDSA P-384 private key, not a ecdsa-p256" in refused(KeyType.ECDSA_P256, p384)
    ed = render(KeyType.ED25519, materials[KeyType.ED25519], InstallFormat.PEM)
    assert "Ed25519 private key, not a x25519" in refused(KeyType.X25519, ed)
    rsa4096 = render(KeyType.RSA_4096, materials[KeyType.RSA_4096], InstallFormat.RAW)
    assert "RSA-4096 private key, not a rsa-3072" in refused(KeyType.RSA_3072, rsa4096)
    k521 = ec.generate_private_key(ec.SECP521R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert "P-521" in refused(KeyType.ECDSA_P384, k521)
    assert "format 'openssh' cannot carry a x25519" in refused(
        KeyType.X25519, b"-----BEGIN OPENSSH PRIVATE KEY-----\n", "openssh"
    )


def test_weak_rsa_exponent_is_refused() -> None:
    weak = rsa.generate_private_key(3, 3072).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert "public exponent is 3" in refused(KeyType.RSA_3072, weak)


def test_public_keys_certificates_and_encrypted_files_are_refused(
    materials: dict[KeyType, bytes], tmp_path: Path
) -> None:
    key = serialization.load_der_private_key(materials[KeyType.ED25519], None)
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert "public key" in refused(KeyType.ED25519, pub_pem)
    assert "public key" in refused(KeyType.ED25519, pub_der)
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.OpenSSH):
        encrypted = key.private_bytes(
            serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"pw-1234567")
        )
        assert "encrypted" in refused(KeyType.ED25519, encrypted)
    if shutil.which("openssl"):
        pem = tmp_path / "k.pem"
        pem.write_bytes(render(KeyType.ED25519, materials[KeyType.ED25519], InstallFormat.PEM))
        cert = subprocess.run(
            ["openssl", "req", "-new", "-x509", "-key", str(pem), "-subj", "/CN=x", "-days", "1"],
            check=True,
            capture_output=True,
        ).stdout
        assert "certificate" in refused(KeyType.ED25519, cert)


def test_bad_jwks_are_refused(materials: dict[KeyType, bytes]) -> None:
    jwk = json.loads(render(KeyType.ED25519, materials[KeyType.ED25519], InstallFormat.JWK))
    public_only = {k: v for k, v in jwk.items() if k != "d"}
    assert "public key only" in refused(KeyType.ED25519, json.dumps(public_only).encode())
    other = json.loads(render(KeyType.ED25519, generate(KeyType.ED25519), InstallFormat.JWK))
    swapped = {**jwk, "x": other["x"]}
    assert "does not belong" in refused(KeyType.ED25519, json.dumps(swapped).encode())
    enc = {**jwk, "use": "enc"}
    message = refused(KeyType.ED25519, json.dumps(enc).encode(), usage=SIGNING)
    assert "'use' enc excludes this key's usage sign, verify" in message
    ops = {**jwk, "key_ops": ["verify"]}
    assert "excludes this key's usage sign" in refused(
        KeyType.ED25519, json.dumps(ops).encode(), usage=SIGNING
    )
    ec_jwk = json.loads(
        render(KeyType.ECDSA_P256, materials[KeyType.ECDSA_P256], InstallFormat.JWK)
    )
    assert "not a ecdsa-p384 key" in refused(KeyType.ECDSA_P384, json.dumps(ec_jwk).encode())
    other_ec = json.loads(render(KeyType.ECDSA_P256, generate(KeyType.ECDSA_P256), "jwk"))  # type: ignore[arg-type]
    moved = {**ec_jwk, "x": other_ec["x"], "y": other_ec["y"]}
    assert "EC key is invalid" in refused(KeyType.ECDSA_P256, json.dumps(moved).encode()) or (
        "does not belong" in refused(KeyType.ECDSA_P256, json.dumps(moved).encode())
    )
    rsa_jwk = json.loads(render(KeyType.RSA_3072, materials[KeyType.RSA_3072], InstallFormat.JWK))
    broken = {**rsa_jwk, "d": rsa_jwk["dp"]}
    assert "inconsistent" in refused(KeyType.RSA_3072, json.dumps(broken).encode())
    hs = json.loads(render(KeyType.HMAC_SHA256, generate(KeyType.HMAC_SHA256), "jwk"))  # type: ignore[arg-type]
    assert "'alg' 'HS256' is not one of a aes-256 key" in refused(
        KeyType.AES_256, json.dumps(hs).encode()
    )


def test_weak_symmetric_keys_and_secrets_are_refused() -> None:
    assert "fewer than 8 distinct" in refused(KeyType.AES_256, bytes(32))
    assert "fewer than 8 distinct" in refused(KeyType.HMAC_SHA256, b"abcd" * 8)
    assert "holds 31 bytes" in refused(KeyType.AES_256, generate(KeyType.AES_256)[:31], "raw")
    assert "holds 16 bytes" in refused(KeyType.AES_256, b"00" * 16, "hex")
    assert "at most" in refused(KeyType.SECRET, b"correcthorsebattery")
    assert "at least 128" in refused(KeyType.SECRET, b"Summer2024!")
    assert "printable" in refused(KeyType.SECRET, b"with a space in it and long enough")
    assert "empty" in refused(KeyType.AES_256, b"")


def test_an_unknown_or_unimportable_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="unsupported key type"):
        import_material("dsa-1024", b"x")
    with pytest.raises(ConfigError, match="each host makes its own private key"):
        import_material("tls-cert", b"-----BEGIN PRIVATE KEY-----\n")
