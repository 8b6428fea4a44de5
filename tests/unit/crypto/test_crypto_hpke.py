"""HPKE wrapping of material for one agent, both suites."""

from __future__ import annotations

import pytest

from ckms.crypto import (
    WrapSuite,
    generate_wrapping_keypair,
    unwrap_for_agent,
    wrap_for_agent,
    wrapping_public_key,
)
from ckms.errors import ConfigError, CryptoError, IntegrityError

CTX = {"key_name": "payments/db", "version": 7, "agent_id": "web-01"}
MESSAGE = r"^wrapped key failed integrity check$"
SUITES = list(WrapSuite)


@pytest.fixture(scope="module", params=SUITES, ids=[s.value for s in SUITES])
def keypair(request: pytest.FixtureRequest) -> tuple[WrapSuite, bytes, bytes]:
    private, public = generate_wrapping_keypair(request.param)
    return request.param, private, public


def test_key_sizes() -> None:
    private, public = generate_wrapping_keypair()
    assert (len(private), len(public)) == (32, 32)
    private, public = generate_wrapping_keypair(WrapSuite.MLKEM768_X25519)
    assert (len(private), len(public)) == (96, 1216)


def test_public_key_is_recomputable(keypair: tuple[WrapSuite, bytes, bytes]) -> None:
    suite, private, public = keypair
    assert wrapping_public_key(private, suite) == public


def test_round_trip(keypair: tuple[WrapSuite, bytes, bytes]) -> None:
    suite, private, public = keypair
    material = b"\x00secret material\xff" * 10
    blob = wrap_for_agent(public, material, suite=suite, **CTX)
    assert blob[0] == 0x01 and blob[1] == {WrapSuite.X25519: 1, WrapSuite.MLKEM768_X25519: 2}[suite]
    assert material not in blob
    assert unwrap_for_agent(private, blob, **CTX) == material
    # Randomized: wrapping twice gives different blobs.
    assert wrap_for_agent(public, material, suite=suite, **CTX) != blob


@pytest.mark.parametrize(
    "override",
    [
        {"agent_id": "web-02"},
        {"agent_id": "web-01 "},
        {"version": 6},
        {"version": 8},
        {"key_name": "payments/dc"},
        {"key_name": "Payments/db"},
    ],
)
def test_wrong_context_fails(
    keypair: tuple[WrapSuite, bytes, bytes], override: dict[str, object]
) -> None:
    suite, private, public = keypair
    blob = wrap_for_agent(public, b"material", suite=suite, **CTX)
    with pytest.raises(IntegrityError, match=MESSAGE):
        unwrap_for_agent(private, blob, **{**CTX, **override})  # type: ignore[arg-type]


@pytest.mark.requirement("SP800-130-DISTRIBUTE")
def test_another_agents_key_fails(keypair: tuple[WrapSuite, bytes, bytes]) -> None:
    suite, _, public = keypair
    blob = wrap_for_agent(public, b"material", suite=suite, **CTX)
    for other_suite in SUITES:
        other_private, _ = generate_wrapping_keypair(other_suite)
        with pytest.raises(IntegrityError, match=MESSAGE):
            unwrap_for_agent(other_private, blob, **CTX)


def test_tampered_blobs_fail(keypair: tuple[WrapSuite, bytes, bytes]) -> None:
    suite, private, public = keypair
    blob = wrap_for_agent(public, b"material", suite=suite, **CTX)
    positions = sorted({0, 1, 2, 3, len(blob) // 2, len(blob) - 17, len(blob) - 1})
    for i in positions:
        broken = bytearray(blob)
        broken[i] ^= 0x01
        with pytest.raises(IntegrityError, match=MESSAGE):
            unwrap_for_agent(private, bytes(broken), **CTX)
    for candidate in (b"", blob[:1], blob[:2], blob[:-1], blob + b"\x00"):
        with pytest.raises(IntegrityError, match=MESSAGE):
            unwrap_for_agent(private, candidate, **CTX)


def test_suite_byte_swap_fails(keypair: tuple[WrapSuite, bytes, bytes]) -> None:
    suite, private, public = keypair
    blob = wrap_for_agent(public, b"material", suite=suite, **CTX)
    for suite_id in (0, 1, 2, 3, 255):
        if suite_id == blob[1]:
            continue
        with pytest.raises(IntegrityError, match=MESSAGE):
            unwrap_for_agent(private, blob[:1] + bytes([suite_id]) + blob[2:], **CTX)


@pytest.mark.parametrize("bad_private", [b"", bytes(31), bytes(95), "k" * 32])
def test_malformed_private_keys_fail_the_same_way(bad_private: object) -> None:
    _, public = generate_wrapping_keypair()
    blob = wrap_for_agent(public, b"material", **CTX)
    with pytest.raises(IntegrityError, match=MESSAGE):
        unwrap_for_agent(bad_private, blob, **CTX)  # type: ignore[arg-type]


def test_wrap_refuses_a_mismatched_or_malformed_public_key() -> None:
    _, x_public = generate_wrapping_keypair(WrapSuite.X25519)
    _, pq_public = generate_wrapping_keypair(WrapSuite.MLKEM768_X25519)
    with pytest.raises(CryptoError):
        wrap_for_agent(x_public, b"m", suite=WrapSuite.MLKEM768_X25519, **CTX)
    with pytest.raises(CryptoError):
        wrap_for_agent(pq_public, b"m", suite=WrapSuite.X25519, **CTX)
    with pytest.raises(CryptoError):
        wrap_for_agent(bytes(32), b"m", **CTX)  # low-order point: no shared secret


def test_wrap_refuses_bad_context_and_suite() -> None:
    _, public = generate_wrapping_keypair()
    for override in ({"agent_id": ""}, {"key_name": ""}, {"version": -1}, {"version": "7"}):
        with pytest.raises(ConfigError):
            wrap_for_agent(public, b"m", **{**CTX, **override})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        wrap_for_agent(public, b"m", suite="p256", **CTX)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        generate_wrapping_keypair("x448")  # type: ignore[arg-type]
