"""AES-256-GCM sealing at rest and the version AAD that binds a row's metadata."""

from __future__ import annotations

import pytest

from ckms.crypto import new_data_kek, open_sealed, seal, version_aad
from ckms.errors import ConfigError, CryptoError, IntegrityError

AAD = version_aad("payments/db", 3, "aes-256", ["encrypt", "decrypt"])


def test_round_trip_and_layout() -> None:
    key = new_data_kek()
    blob = seal(key, b"material", AAD)
    assert blob[0] == 0x01
    assert len(blob) == 1 + 12 + len(b"material") + 16
    assert open_sealed(key, blob, AAD) == b"material"


def test_nonces_are_fresh() -> None:
    key = new_data_kek()
    blobs = {seal(key, b"same", AAD) for _ in range(50)}
    assert len(blobs) == 50
    assert len({b[1:13] for b in blobs}) == 50


def test_empty_plaintext_round_trips() -> None:
    key = new_data_kek()
    assert open_sealed(key, seal(key, b"", b""), b"") == b""


def test_every_flipped_byte_fails() -> None:
    key = new_data_kek()
    blob = seal(key, b"some key material", AAD)
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            broken = bytearray(blob)
            broken[i] ^= bit
            with pytest.raises(IntegrityError, match=r"^sealed data failed integrity check$"):
                open_sealed(key, bytes(broken), AAD)


def test_truncated_or_extended_blobs_fail() -> None:
    key = new_data_kek()
    blob = seal(key, b"x", AAD)
    for candidate in (b"", blob[:1], blob[:13], blob[:-1], blob + b"\x00", b"\x02" + blob[1:]):
        with pytest.raises(IntegrityError):
            open_sealed(key, candidate, AAD)


@pytest.mark.requirement("SP800-130-STORE")
def test_changed_aad_fails() -> None:
    key = new_data_kek()
    blob = seal(key, b"material", AAD)
    for aad in (
        b"",
        AAD + b" ",
        version_aad("payments/dc", 3, "aes-256", ["encrypt", "decrypt"]),
        version_aad("payments/db", 4, "aes-256", ["encrypt", "decrypt"]),
        version_aad("payments/db", 3, "hmac-sha256", ["encrypt", "decrypt"]),
        version_aad("payments/db", 3, "aes-256", ["encrypt"]),
        version_aad("payments/db", 3, "aes-256", ["encrypt", "decrypt", "wrap"]),
    ):
        with pytest.raises(IntegrityError):
            open_sealed(key, blob, aad)


def test_wrong_key_fails_with_the_callers_label() -> None:
    blob = seal(new_data_kek(), b"material", AAD)
    with pytest.raises(IntegrityError, match=r"^data KEK failed integrity check$"):
        open_sealed(new_data_kek(), blob, AAD, what="data KEK")
    for bad_key in (b"", bytes(16), bytes(33), "k" * 32):
        with pytest.raises(IntegrityError, match=r"^data KEK failed integrity check$"):
            open_sealed(bad_key, blob, AAD, what="data KEK")  # type: ignore[arg-type]


def test_seal_refuses_a_wrong_size_key() -> None:
    for bad_key in (b"", bytes(16), bytes(31)):
        with pytest.raises(CryptoError):
            seal(bad_key, b"x", b"")


def test_version_aad_is_canonical_and_sorts_usage() -> None:
    a = version_aad("payments/db", 3, "aes-256", ["encrypt", "decrypt"])
    b = version_aad("payments/db", 3, "aes-256", ("decrypt", "encrypt"))
    assert (
        a
        == b
        == (
            b'{"ctx":"ckms.version.v1","key":"payments/db","type":"aes-256",'
            b'"usage":["decrypt","encrypt"],"version":3}'
        )
    )


@pytest.mark.parametrize(
    "args",
    [
        ("", 1, "aes-256", ["encrypt"]),
        ("k", -1, "aes-256", ["encrypt"]),
        ("k", True, "aes-256", ["encrypt"]),
        ("k", 1, "", ["encrypt"]),
        ("k", 1, "aes-256", "encrypt"),
        ("k", 1, "aes-256", [""]),
        ("k", 1, "aes-256", [1]),
    ],
)
def test_version_aad_refuses_bad_input(args: tuple[object, ...]) -> None:
    with pytest.raises(ConfigError):
        version_aad(*args)  # type: ignore[arg-type]
