"""Known-answer vectors: ckms.crypto must keep speaking the recorded wire formats."""

from __future__ import annotations

from typing import Any

import pytest

from ckms.crypto import (
    WrapSuite,
    combine_shares,
    kek_check_value,
    open_sealed,
    sign,
    signer_key_id,
    signing_public_key,
    unwrap_for_agent,
    unwrap_root_kek_with_passphrase,
    verify_signature,
    version_aad,
    wrapping_public_key,
)
from ckms.crypto._hpke import _info
from ckms.errors import IntegrityError
from tests.support.vectors import load_vectors

SIGNATURES = load_vectors("event_signatures.json")["vectors"]
WRAPPED = load_vectors("wrapped_key.json")


@pytest.mark.parametrize("vector", SIGNATURES, ids=[v["name"] for v in SIGNATURES])
def test_event_signature_vectors(vector: dict[str, Any]) -> None:
    seed = bytes.fromhex(vector["private_seed_hex"])
    public = bytes.fromhex(vector["public_hex"])
    message = bytes.fromhex(vector["message_hex"])
    signature = bytes.fromhex(vector["signature_hex"])
    assert signing_public_key(seed) == public
    assert signer_key_id(public) == vector["key_id"]
    assert sign(seed, message) == signature
    verify_signature(public, message, signature)
    with pytest.raises(IntegrityError):
        verify_signature(public, message + b"\x00", signature)


def test_signature_vectors_include_rfc8032() -> None:
    names = {v["name"] for v in SIGNATURES}
    assert {"rfc8032_test1", "rfc8032_test2", "rfc8032_test3"} <= names


@pytest.mark.parametrize("vector", WRAPPED["hpke"], ids=[v["name"] for v in WRAPPED["hpke"]])
def test_hpke_wrapped_key_vectors(vector: dict[str, Any]) -> None:
    suite = WrapSuite(vector["suite"])
    private = bytes.fromhex(vector["recipient_private_hex"])
    blob = bytes.fromhex(vector["blob_hex"])
    ctx = {k: vector[k] for k in ("key_name", "version", "agent_id")}
    assert wrapping_public_key(private, suite) == bytes.fromhex(vector["recipient_public_hex"])
    assert _info(suite=suite, **ctx).decode("utf-8") == vector["info"]
    assert unwrap_for_agent(private, blob, **ctx) == bytes.fromhex(vector["plaintext_hex"])
    for override in vector["must_fail"]:
        with pytest.raises(IntegrityError):
            unwrap_for_agent(private, blob, **{**ctx, **override})


@pytest.mark.parametrize("vector", WRAPPED["sealed"], ids=[v["name"] for v in WRAPPED["sealed"]])
def test_sealed_at_rest_vectors(vector: dict[str, Any]) -> None:
    aad = version_aad(vector["key_name"], vector["version"], vector["key_type"], vector["usage"])
    assert aad == bytes.fromhex(vector["aad_hex"]) == vector["aad"].encode("utf-8")
    key = bytes.fromhex(vector["key_hex"])
    blob = bytes.fromhex(vector["blob_hex"])
    assert open_sealed(key, blob, aad) == bytes.fromhex(vector["plaintext_hex"])
    other = version_aad(vector["key_name"], vector["version"] + 1, vector["key_type"], [])
    with pytest.raises(IntegrityError):
        open_sealed(key, blob, other)


def test_root_kek_passphrase_vector() -> None:
    vector = WRAPPED["root_kek_passphrase"]
    kek = unwrap_root_kek_with_passphrase(vector["blob"], vector["passphrase"])
    assert kek.hex() == vector["kek_hex"]
    assert kek_check_value(kek) == vector["check_value"]


def test_root_kek_shares_vector() -> None:
    vector = WRAPPED["root_kek_shares"]
    mnemonics = vector["mnemonics"]
    threshold = vector["threshold"]
    assert combine_shares(mnemonics[:threshold]).hex() == vector["kek_hex"]
    assert combine_shares(mnemonics[-threshold:]).hex() == vector["kek_hex"]
    assert kek_check_value(bytes.fromhex(vector["kek_hex"])) == vector["check_value"]
