"""Fuzzing: generated and mutated events, acks and SSH requests never crash and never pass.

Each input either verifies (only the unmutated originals do) or is refused with a typed
:class:`~ckms.errors.ProtocolError`; no other exception escapes. 10,000 inputs in all.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckms.crypto import generate_signing_key, sign, signer_key_id, signing_public_key
from ckms.errors import ProtocolError
from ckms.protocol import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    Ack,
    AckStatus,
    EventType,
    KeyRevoked,
    MessageRejected,
    canonical_json,
    encode_event,
    trust_keys,
    verify_message,
)
from ckms.protocol._rpc import parse_request

SIGNER = generate_signing_key()
TRUST = trust_keys([signing_public_key(SIGNER)])
KID = signer_key_id(signing_public_key(SIGNER)).encode()
AT = datetime(2026, 11, 28, tzinfo=UTC)

ORIGINALS = [
    encode_event(
        EventType.KEY_REVOKED,
        KeyRevoked.model_validate(
            {
                "key": "payments/db",
                "key_id": "k-1",
                "version": 2,
                "from": "Active",
                "to": "Compromised",
                "reason": "keyCompromise",
                "compromise": True,
            }
        ),
        seq=7,
        signing_key=SIGNER,
        at=AT,
    ),
    encode_event(
        EventType.ACK,
        Ack(agent="web-1", key="payments/db", version=2, status=AckStatus.REMOVED, elapsed_ms=3),
        seq=1,
        signing_key=SIGNER,
        at=AT,
    ),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

FUZZ = settings(
    max_examples=2500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


def check(value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    try:
        verify_message(value, headers, TRUST)
    except MessageRejected:
        return
    # Only a byte-identical original may verify.
    assert any(value == m.value for m in ORIGINALS)


@FUZZ
@given(
    original=st.sampled_from(ORIGINALS),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4
    ),
)
def test_mutated_signed_events_are_refused(original, flips) -> None:  # type: ignore[no-untyped-def]
    value = bytearray(original.value)
    for position, mask in flips:
        value[position % len(value)] ^= mask
    check(bytes(value), list(original.headers))


@FUZZ
@given(
    envelope=st.dictionaries(
        st.sampled_from(["v", "id", "seq", "type", "at", "data", "x"]), json_values, max_size=7
    ),
    event_type=st.sampled_from([t.value for t in EventType] + ["key.bogus", ""]),
    data=json_values,
)
def test_generated_envelopes_signed_by_the_trusted_key_are_typed_refusals(  # type: ignore[no-untyped-def]
    envelope, event_type, data
) -> None:
    envelope = {**envelope, "type": event_type, "data": data, "v": envelope.get("v", 1)}
    try:
        raw = canonical_json(envelope)
    except ProtocolError:
        return
    check(raw, [(SIGNATURE_HEADER, sign(SIGNER, raw)), (KEY_ID_HEADER, KID)])


@FUZZ
@given(
    raw=st.binary(max_size=512),
    headers=st.lists(
        st.tuples(
            st.sampled_from([SIGNATURE_HEADER, KEY_ID_HEADER, "other"]), st.binary(max_size=80)
        ),
        max_size=4,
    ),
)
def test_arbitrary_bytes_and_headers_are_refused(raw, headers) -> None:  # type: ignore[no-untyped-def]
    check(raw, headers)


@FUZZ
@given(
    command=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda m, p: f"{m} {p}",
            st.sampled_from(["sync", "fetch", "enroll", "key.rotate", "Bad!"]),
            st.text(max_size=200),
        ),
    )
)
def test_ssh_requests_parse_or_are_refused_with_a_protocol_error(command: str) -> None:
    try:
        method, params = parse_request(command)
    except ProtocolError:
        return
    assert isinstance(params, dict) and method


@FUZZ
@given(
    method=st.sampled_from(["sync", "unseal", "enroll", "Bad!", ""]),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda t: t.encode(), st.text(max_size=300)),
        st.just(b'{"share":"x"}'),
        st.just(b"[1, 2]"),
        st.just(b"{" * 5000),
    ),
)
def test_ssh_request_bodies_parse_or_are_refused_with_a_protocol_error(
    method: str, body: bytes
) -> None:
    try:
        name, params = parse_request(method, body)
    except ProtocolError:
        return
    assert isinstance(params, dict) and name == method


@pytest.mark.parametrize("original", ORIGINALS)
def test_the_originals_verify(original) -> None:  # type: ignore[no-untyped-def]
    verify_message(original.value, list(original.headers), TRUST)
