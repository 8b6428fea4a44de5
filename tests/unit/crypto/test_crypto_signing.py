"""Ed25519 signing, verification and signer key ids."""

from __future__ import annotations

import base64
import hashlib

import pytest

from ckms.crypto import (
    generate_signing_key,
    sign,
    signer_key_id,
    signing_public_key,
    verify_signature,
)
from ckms.errors import CryptoError, IntegrityError

MESSAGE = r"^signature failed integrity check$"


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    private = generate_signing_key()
    return private, signing_public_key(private)


def test_keys_are_raw_32_bytes(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    assert len(private) == len(public) == 32
    assert generate_signing_key() != private


def test_sign_and_verify(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    signature = sign(private, b"event bytes")
    assert len(signature) == 64
    assert sign(private, b"event bytes") == signature  # deterministic
    verify_signature(public, b"event bytes", signature)


def test_tampered_data_or_signature_fails(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    data = b'{"seq":1,"type":"key.rotated"}'
    signature = sign(private, data)
    with pytest.raises(IntegrityError, match=MESSAGE):
        verify_signature(public, data + b" ", signature)
    with pytest.raises(IntegrityError, match=MESSAGE):
        verify_signature(public, data.replace(b"1", b"2"), signature)
    for i in (0, 31, 32, 63):
        broken = bytearray(signature)
        broken[i] ^= 0x01
        with pytest.raises(IntegrityError, match=MESSAGE):
            verify_signature(public, data, bytes(broken))


def test_another_key_fails(keys: tuple[bytes, bytes]) -> None:
    private, _ = keys
    other_public = signing_public_key(generate_signing_key())
    with pytest.raises(IntegrityError, match=MESSAGE):
        verify_signature(other_public, b"x", sign(private, b"x"))


@pytest.mark.parametrize(
    ("public", "signature"),
    [
        (b"", None),
        (bytes(31), None),
        (bytes(33), None),
        (None, b""),
        (None, bytes(63)),
        (None, bytes(65)),
        ("k" * 32, None),
        (None, "s" * 64),
    ],
)
def test_malformed_keys_and_signatures_fail_the_same_way(
    keys: tuple[bytes, bytes], public: object, signature: object
) -> None:
    private, good_public = keys
    good_signature = sign(private, b"x")
    with pytest.raises(IntegrityError, match=MESSAGE):
        verify_signature(
            good_public if public is None else public,  # type: ignore[arg-type]
            b"x",
            good_signature if signature is None else signature,  # type: ignore[arg-type]
        )


def test_key_id_scheme(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    kid = signer_key_id(public)
    expected = base64.urlsafe_b64encode(hashlib.sha256(public).digest()[:16]).rstrip(b"=")
    assert kid == "ed25519:" + expected.decode()
    assert len(kid) == len("ed25519:") + 22 and "=" not in kid


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(64)])
def test_bad_private_or_public_lengths_are_refused(bad: bytes) -> None:
    with pytest.raises(CryptoError):
        sign(bad, b"x")
    with pytest.raises(CryptoError):
        signing_public_key(bad)
    with pytest.raises(CryptoError):
        signer_key_id(bad)


def test_signing_key_in_openssh_form_is_the_same_key() -> None:
    import asyncssh

    from ckms.crypto import signing_key_openssh, signing_public_openssh

    private = generate_signing_key()
    ssh_key = asyncssh.import_private_key(signing_key_openssh(private))
    line = ssh_key.export_public_key("openssh").decode().split()
    assert " ".join(line[:2]) == signing_public_openssh(signing_public_key(private))
    other = signing_public_openssh(signing_public_key(generate_signing_key()))
    assert other != signing_public_openssh(signing_public_key(private))
