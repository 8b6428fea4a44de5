"""Event envelope: signed over exact bytes, verified before parsing, every refusal typed."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from ckms.crypto import generate_signing_key, signer_key_id, signing_public_key
from ckms.protocol import (
    EVENTS_TOPIC,
    FLEET_TOPIC,
    KEY_ID_HEADER,
    MAX_MESSAGE_BYTES,
    SIGNATURE_HEADER,
    Ack,
    AckStatus,
    BadSignature,
    EventType,
    InstallSpec,
    InvalidEventData,
    KeyRevoked,
    KeyRotated,
    MalformedMessage,
    OversizedMessage,
    ReplayedEvent,
    ReplayGuard,
    RevocationReason,
    Targets,
    UnknownEventType,
    UnknownSigner,
    UnsignedMessage,
    UnsupportedVersion,
    VersionState,
    canonical_json,
    encode_event,
    sign_envelope,
    trust_keys,
    verify_message,
)
from tests.support.vectors import load_vectors

AT = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def signer() -> bytes:
    return generate_signing_key()


@pytest.fixture(scope="module")
def trust(signer: bytes) -> dict[str, bytes]:
    return trust_keys([signing_public_key(signer)])


def rotated() -> KeyRotated:
    return KeyRotated(
        key="payments/db",
        key_id="k-1",
        type="aes-256",
        version=2,
        primary=2,
        previous_primary=1,
        state=VersionState.ACTIVE,
        digest=DIGEST,
        targets=Targets(selectors=({"env": "prod", "role": "db"},)),
        install=InstallSpec(path="/etc/keys/{team}/{purpose}.key"),
    )


def test_topic_names() -> None:
    assert (EVENTS_TOPIC, FLEET_TOPIC) == ("ckms.events", "ckms.fleet")


def test_round_trip(signer: bytes, trust: dict[str, bytes]) -> None:
    msg = encode_event(EventType.KEY_ROTATED, rotated(), seq=7, signing_key=signer, at=AT)
    assert msg.key == b"payments/db"
    env = verify_message(msg.value, msg.headers, trust)
    assert env.type is EventType.KEY_ROTATED
    assert env.seq == 7
    assert env.data == rotated()
    assert env.time == AT
    assert env.signer == signer_key_id(signing_public_key(signer))
    # The value is exactly the canonical JSON of the envelope.
    assert msg.value == canonical_json(json.loads(msg.value))


def test_ack_round_trip(trust: dict[str, bytes]) -> None:
    agent_key = generate_signing_key()
    ack = Ack(
        agent="web-1",
        key="payments/db",
        version=2,
        status=AckStatus.INSTALLED,
        digest=DIGEST,
        elapsed_ms=12,
    )
    msg = encode_event(EventType.ACK, ack, seq=1, signing_key=agent_key, at=AT)
    assert msg.key == b"web-1"
    # The controller's trust does not include the agent: refused.
    with pytest.raises(UnknownSigner):
        verify_message(msg.value, msg.headers, trust)
    env = verify_message(msg.value, msg.headers, trust_keys([signing_public_key(agent_key)]))
    assert env.data == ack


@pytest.mark.requirement("PCI-3.7.7")
def test_forged_by_another_key_is_refused(trust: dict[str, bytes]) -> None:
    other = generate_signing_key()
    msg = encode_event(EventType.KEY_ROTATED, rotated(), seq=1, signing_key=other, at=AT)
    with pytest.raises(UnknownSigner):
        verify_message(msg.value, msg.headers, trust)
    # Claiming the trusted kid while signing with another key fails the signature.
    kid = next(iter(trust))
    signature = dict(msg.headers)[SIGNATURE_HEADER]
    forged = [(SIGNATURE_HEADER, signature), (KEY_ID_HEADER, kid.encode())]
    with pytest.raises(BadSignature):
        verify_message(msg.value, forged, trust)


@pytest.mark.parametrize("position", [0, 10, 50, -2])
def test_one_changed_byte_is_refused(signer: bytes, trust: dict[str, bytes], position: int) -> None:
    msg = encode_event(EventType.KEY_ROTATED, rotated(), seq=1, signing_key=signer, at=AT)
    value = bytearray(msg.value)
    value[position] ^= 0x01
    with pytest.raises(BadSignature):
        verify_message(bytes(value), msg.headers, trust)


def test_missing_or_repeated_headers_are_refused(signer: bytes, trust: dict[str, bytes]) -> None:
    msg = encode_event(EventType.KEY_ROTATED, rotated(), seq=1, signing_key=signer, at=AT)
    with pytest.raises(UnsignedMessage):
        verify_message(msg.value, [], trust)
    with pytest.raises(UnsignedMessage):
        verify_message(msg.value, [h for h in msg.headers if h[0] != SIGNATURE_HEADER], trust)
    with pytest.raises(UnsignedMessage):
        verify_message(msg.value, [*msg.headers, msg.headers[0]], trust)


def _signed_raw(value: dict[str, object] | bytes, signer: bytes) -> tuple[bytes, list]:
    """Sign arbitrary bytes as a hostile but key-holding writer would."""
    from ckms.crypto import sign

    raw = value if isinstance(value, bytes) else canonical_json(value)
    kid = signer_key_id(signing_public_key(signer))
    return raw, [(SIGNATURE_HEADER, sign(signer, raw)), (KEY_ID_HEADER, kid.encode())]


def _valid_dict() -> dict[str, object]:
    return {
        "v": 1,
        "id": "0b7e1b1c-7d7e-4b0c-9b8f-4f0f6b6c1a01",
        "seq": 1,
        "type": "key.revoked",
        "at": "2026-11-28T12:00:00.000000Z",
        "data": {
            "key": "payments/db",
            "key_id": "k-1",
            "version": 1,
            "from": "Active",
            "to": "Compromised",
            "reason": "keyCompromise",
            "compromise": True,
        },
    }


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: d.update(v=2), UnsupportedVersion),
        (lambda d: d.update(v="1"), UnsupportedVersion),
        (lambda d: d.update(type="key.exploded"), UnknownEventType),
        (lambda d: d.pop("seq"), MalformedMessage),
        (lambda d: d.update(seq=-1), MalformedMessage),
        (lambda d: d.update(extra=1), MalformedMessage),
        (lambda d: d.update(at="yesterday"), MalformedMessage),
        (lambda d: d["data"].update(material="c2VjcmV0"), InvalidEventData),
        (lambda d: d["data"].update(reason="bored"), InvalidEventData),
        (lambda d: d["data"].update(version=0), InvalidEventData),
        (lambda d: d["data"].update(to="Gone"), InvalidEventData),
    ],
)
def test_signed_but_invalid_envelopes_are_refused(signer, trust, mutate, error) -> None:
    value = _valid_dict()
    verify_message(*_signed_raw(value, signer), trust)  # the unmutated one is fine
    mutate(value)
    with pytest.raises(error):
        verify_message(*_signed_raw(value, signer), trust)


@pytest.mark.parametrize(
    "raw", [b"not json", b"", b"[1,2]", b'{"v": 1}', '{"v":1}\xff'.encode("latin-1")]
)
def test_non_json_values_are_refused(signer: bytes, trust: dict[str, bytes], raw: bytes) -> None:
    with pytest.raises((MalformedMessage, UnsupportedVersion)):
        verify_message(*_signed_raw(raw, signer), trust)


def test_oversized_values_are_refused_before_verification(trust: dict[str, bytes]) -> None:
    # No headers at all: the size check comes first, so the reason is the size.
    with pytest.raises(OversizedMessage):
        verify_message(b"{" * (MAX_MESSAGE_BYTES + 1), [], trust)
    with pytest.raises(MalformedMessage):
        verify_message(None, [], trust)


def test_types_filter(signer: bytes, trust: dict[str, bytes]) -> None:
    msg = encode_event(EventType.KEY_ROTATED, rotated(), seq=1, signing_key=signer, at=AT)
    with pytest.raises(UnknownEventType):
        verify_message(msg.value, msg.headers, trust, types={EventType.KEY_REVOKED})


def test_building_an_invalid_event_fails_before_signing(signer: bytes) -> None:
    with pytest.raises(InvalidEventData):
        encode_event("key.revoked", {"key": "payments/db"}, seq=1, signing_key=signer, at=AT)
    with pytest.raises(UnknownEventType):
        encode_event("nope", {}, seq=1, signing_key=signer, at=AT)
    big = KeyRevoked.model_validate(
        {
            "key": "payments/db",
            "key_id": "x" * (MAX_MESSAGE_BYTES + 1),
            "version": 1,
            "from": "Active",
            "to": "Deactivated",
            "reason": RevocationReason.SUPERSEDED,
            "compromise": False,
        }
    )
    with pytest.raises(OversizedMessage):
        encode_event(EventType.KEY_REVOKED, big, seq=1, signing_key=signer, at=AT)


def test_replay_guard() -> None:
    guard = ReplayGuard({"p0": 5})
    with pytest.raises(ReplayedEvent):
        guard.check("p0", 5)
    with pytest.raises(ReplayedEvent):
        guard.check("p0", 3)
    guard.check("p0", 6)
    guard.accept("p0", 6)
    guard.check("p1", 0)
    guard.accept("p1", 0)
    with pytest.raises(ReplayedEvent):
        guard.check("p1", 0)
    assert guard.snapshot() == {"p0": 6, "p1": 0}


def test_install_spec_refuses_loose_modes_and_relative_paths() -> None:
    with pytest.raises(ValueError, match="other users"):
        InstallSpec(path="/k", mode=0o644)
    with pytest.raises(ValueError, match="absolute"):
        InstallSpec(path="keys/k")
    with pytest.raises(ValueError, match=r"\.\."):
        InstallSpec(path="/etc/../k")
    assert InstallSpec(path="/k", mode=0o640).mode == 0o640


def test_targets_match() -> None:
    targets = Targets(selectors=({"env": "prod", "role": "web"},), hosts=("db-7",))
    assert targets.matches("web-1", {"env": "prod", "role": "web", "zone": "a"})
    assert not targets.matches("web-2", {"env": "staging", "role": "web"})
    assert targets.matches("db-7", {"env": "prod"})
    # The environment guard holds even for a host listed by id.
    assert not targets.matches("db-7", {})
    assert not targets.matches("db-7", {"env": "staging"})


# -- known-answer vectors: a second implementation must produce these exact bytes ------------


def test_envelope_vectors() -> None:
    vectors = load_vectors("event_envelopes.json")
    assert vectors["vectors"], "no vectors"
    for vector in vectors["vectors"]:
        seed = bytes.fromhex(vector["signing_key_hex"])
        msg = sign_envelope(vector["envelope"], seed)
        assert msg.value.decode() == vector["value"]
        headers = dict(msg.headers)
        assert headers[SIGNATURE_HEADER].hex() == vector["signature_hex"]
        assert headers[KEY_ID_HEADER].decode() == vector["kid"]
        env = verify_message(msg.value, msg.headers, trust_keys([signing_public_key(seed)]))
        assert env.id == vector["envelope"]["id"]
