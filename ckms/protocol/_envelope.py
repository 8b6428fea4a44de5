"""The signed envelope of every event and ack (docs/architecture.md §3), and its verification.

The Kafka value is the canonical JSON of ``{"v":1,"id":..,"seq":..,"type":..,"at":..,"data":..}``;
header ``ckms-sig`` is the Ed25519 signature over exactly those bytes and ``ckms-kid`` names the
signer. :func:`verify_message` checks size, headers and signature on the raw bytes *before*
anything is parsed, then the version, the type and the typed data. Each refusal raises a
:class:`MessageRejected` subclass whose ``reason`` is a stable code for logs and metrics.
``docs/events.md`` §2 is this order written down for other implementations: change both.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ckms.crypto import sign, signer_key_id, signing_public_key, verify_signature
from ckms.errors import IntegrityError, ProtocolError
from ckms.protocol._events import (
    CA_SUBJECT,
    EVENT_DATA_MODELS,
    CaRotated,
    EventData,
    EventType,
)
from ckms.protocol._keyspec import WIRE_CONTEXT
from ckms.protocol._topics import KEY_ID_HEADER, MAX_MESSAGE_BYTES, SIGNATURE_HEADER
from ckms.protocol.canonical import canonical_json, parse_canonical_json

ENVELOPE_VERSION = 1
MAX_SEQ = (1 << 63) - 1
"""Largest ``seq`` (a signed 64-bit integer, so every language holds it exactly)."""

Headers = Sequence[tuple[str, bytes]]


class MessageRejected(ProtocolError):
    """Raised when an event or ack is refused; ``reason`` says why in one stable word."""

    reason: ClassVar[str] = "rejected"


class OversizedMessage(MessageRejected):
    """Raised when a value is larger than the bound, before it is read."""

    reason = "oversized"


class UnsignedMessage(MessageRejected):
    """Raised when the signature or signer header is missing or repeated."""

    reason = "unsigned"


class UnknownSigner(MessageRejected):
    """Raised when the signer key id is not one this reader trusts."""

    reason = "unknown-signer"


class BadSignature(MessageRejected):
    """Raised when the signature does not verify over the exact value bytes."""

    reason = "bad-signature"


class MalformedMessage(MessageRejected):
    """Raised when a signed value is not canonical JSON of an envelope."""

    reason = "malformed"


class UnsupportedVersion(MessageRejected):
    """Raised when the envelope's ``v`` is not one this reader speaks."""

    reason = "unsupported-version"


class UnknownEventType(MessageRejected):
    """Raised when the envelope's ``type`` is not a known event type."""

    reason = "unknown-type"


class InvalidEventData(MessageRejected):
    """Raised when ``data`` does not match the model of its type."""

    reason = "invalid-data"


class ReplayedEvent(MessageRejected):
    """Raised when an event is not newer than what the reader already applied."""

    reason = "replayed"


def format_time(at: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``: one spelling per instant, so bytes are stable."""
    if at.tzinfo is None:
        raise ProtocolError("event time must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


def parse_time(text: str) -> datetime:
    """Parse exactly the form :func:`format_time` writes (strptime alone would also take
    ``2026-1-2T3:4:5.1Z``: one instant, one spelling)."""
    try:
        if not _TIME_RE.fullmatch(text):
            raise ValueError(text)
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        shown = text[:40] if isinstance(text, str) else type(text).__name__
        raise ProtocolError(f"bad event time {shown!r}: expected RFC 3339 UTC") from None


class Envelope(BaseModel):
    """A verified, typed event or ack."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int
    id: str
    seq: int
    type: EventType
    at: str
    data: EventData
    signer: str = ""

    @property
    def time(self) -> datetime:
        """``at`` as an aware datetime."""
        return parse_time(self.at)

    @property
    def subject(self) -> str:
        """The key name (or host) the event is about; also the Kafka partitioning key."""
        return subject_of(self.data)


def subject_of(data: BaseModel) -> str:
    """The partitioning key: the agent of an ack (its acks stay in order), else key or host
    (``ca.rotated``: :data:`CA_SUBJECT`)."""
    if isinstance(data, CaRotated):
        return CA_SUBJECT
    for attr in ("agent", "key", "host"):
        value = getattr(data, attr, None)
        if isinstance(value, str):
            return value
    raise ProtocolError(f"{type(data).__name__} has no subject")


def envelope_dict(
    event_type: EventType | str,
    data: BaseModel | Mapping[str, Any],
    *,
    seq: int,
    at: datetime,
    event_id: str | None = None,
) -> dict[str, Any]:
    """Build (and validate) the envelope of one event, ready for canonical encoding."""
    try:
        etype = EventType(event_type)
    except ValueError:
        raise UnknownEventType(f"unknown event type {event_type!r}") from None
    model = EVENT_DATA_MODELS[etype]
    try:
        typed = data if isinstance(data, model) else model.model_validate(data)
    except ValidationError as exc:
        raise InvalidEventData(f"{etype} data is invalid: {_summary(exc)}") from None
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError("event sequence numbers run from 0 to 2**63-1")
    return {
        "v": ENVELOPE_VERSION,
        "id": event_id or str(uuid.uuid4()),
        "seq": seq,
        "type": str(etype),
        "at": format_time(at),
        "data": typed.model_dump(mode="json", by_alias=True),
    }


@dataclass(frozen=True)
class SignedMessage:
    """A Kafka-ready message: value bytes, signature headers, and the partitioning key."""

    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    key: bytes


def sign_envelope(envelope: Mapping[str, Any], signing_key: bytes) -> SignedMessage:
    """Encode an envelope canonically and sign the exact bytes."""
    kid = signer_key_id(signing_public_key(signing_key))
    return sign_envelope_with(envelope, lambda data: sign(signing_key, data), kid)


def sign_envelope_with(
    envelope: Mapping[str, Any], signer: Callable[[bytes], bytes], kid: str
) -> SignedMessage:
    """Like :func:`sign_envelope`, for a signer that keeps its key to itself (the vault)."""
    value = canonical_json(dict(envelope))
    if len(value) > MAX_MESSAGE_BYTES:
        raise OversizedMessage(
            f"{envelope.get('type')} message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}"
        )
    model = EVENT_DATA_MODELS[EventType(envelope["type"])]
    subject = subject_of(model.model_validate(envelope["data"]))
    return SignedMessage(
        value=value,
        headers=((SIGNATURE_HEADER, signer(value)), (KEY_ID_HEADER, kid.encode())),
        key=subject.encode(),
    )


def encode_event(
    event_type: EventType | str,
    data: BaseModel | Mapping[str, Any],
    *,
    seq: int,
    signing_key: bytes,
    at: datetime,
    event_id: str | None = None,
) -> SignedMessage:
    """Build, encode and sign one event or ack."""
    return sign_envelope(
        envelope_dict(event_type, data, seq=seq, at=at, event_id=event_id), signing_key
    )


def trust_keys(public_keys: Iterable[bytes]) -> dict[str, bytes]:
    """Map signer key ids to the raw Ed25519 public keys a reader trusts."""
    return {signer_key_id(key): bytes(key) for key in public_keys}


def _one_header(headers: Headers | None, name: str) -> bytes:
    values = [bytes(v) for k, v in (headers or ()) if k == name and v is not None]
    if len(values) != 1:
        what = "missing" if not values else "repeated"
        raise UnsignedMessage(f"header {name} is {what}")
    return values[0]


def verify_message(
    value: bytes | None,
    headers: Headers | None,
    trust: Mapping[str, bytes],
    *,
    types: Iterable[EventType] | None = None,
) -> Envelope:
    """Verify a raw Kafka message and return the typed envelope, or raise MessageRejected.

    The signature is checked over the raw bytes before any parsing; ``types`` (when given)
    restricts which event types this reader accepts.
    """
    if value is None:
        raise MalformedMessage("message has no value")
    if len(value) > MAX_MESSAGE_BYTES:
        raise OversizedMessage(f"message of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")
    signature = _one_header(headers, SIGNATURE_HEADER)
    kid = _one_header(headers, KEY_ID_HEADER).decode("ascii", "replace")
    public = trust.get(kid)
    if public is None:
        raise UnknownSigner(f"signer {kid[:40]!r} is not trusted")
    try:
        verify_signature(public, value, signature)
    except IntegrityError:
        raise BadSignature(f"signature by {kid} does not verify") from None
    try:
        raw = parse_canonical_json(value, max_bytes=MAX_MESSAGE_BYTES)
    except ProtocolError as exc:
        raise MalformedMessage(str(exc)) from None
    if not isinstance(raw, dict):
        raise MalformedMessage("message is not a JSON object")
    version = raw.get("v")
    # Exactly the integer 1: Python would also take true and 1.0 as equal to 1.
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise UnsupportedVersion(f"envelope version {str(version)[:16]!r} is not supported")
    try:
        etype = EventType(raw.get("type"))
    except ValueError:
        raise UnknownEventType(f"unknown event type {str(raw.get('type'))[:64]!r}") from None
    if types is not None and etype not in set(types):
        raise UnknownEventType(f"event type {etype} is not accepted here")
    missing = {"id", "seq", "at", "data"} - raw.keys()
    if missing or set(raw) - {"v", "id", "seq", "type", "at", "data"}:
        raise MalformedMessage(f"envelope fields are wrong (missing {sorted(missing)})")
    seq = raw["seq"]
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise MalformedMessage("envelope seq must be an integer from 0 to 2**63-1")
    if not isinstance(raw["id"], str) or not isinstance(raw["at"], str):
        raise MalformedMessage("envelope id and at must be strings")
    try:
        parse_time(raw["at"])
    except ProtocolError as exc:
        raise MalformedMessage(str(exc)) from None
    if not isinstance(raw["data"], dict):
        raise InvalidEventData(f"{etype} data is not a JSON object")
    try:
        # Strict JSON-mode validation: "3" is not an integer, 1 is not true, a hook is not a
        # string; exactly what docs/schemas/ says. Re-encoding costs microseconds per event.
        data = EVENT_DATA_MODELS[etype].model_validate_json(
            canonical_json(raw["data"]), strict=True, context=WIRE_CONTEXT
        )
    except ValidationError as exc:
        raise InvalidEventData(f"{etype} data is invalid: {_summary(exc)}") from None
    return Envelope(
        v=ENVELOPE_VERSION,
        id=raw["id"],
        seq=seq,
        type=etype,
        at=raw["at"],
        data=data,
        signer=kid,
    )


def _summary(exc: ValidationError) -> str:
    """A short, value-free description of a validation error (inputs could be hostile)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc or 'value'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class ReplayGuard:
    """Refuses events that are not newer than the last one applied in the same scope.

    A scope is a Kafka partition (events of one key share a partition, and the controller's
    ``seq`` grows in commit order), or an agent id for acks. Positions can be loaded from and
    saved to the reader's own store so replays are caught across restarts.
    """

    def __init__(self, last_seen: Mapping[str, int] | None = None) -> None:
        self._last: dict[str, int] = dict(last_seen or {})

    def check(self, scope: str, seq: int) -> None:
        """Raise ReplayedEvent when ``seq`` is not above the last accepted one in ``scope``."""
        last = self._last.get(scope)
        if last is not None and seq <= last:
            raise ReplayedEvent(f"seq {seq} is not newer than {last} already applied ({scope})")

    def accept(self, scope: str, seq: int) -> None:
        """Record ``seq`` as applied in ``scope``."""
        self._last[scope] = max(seq, self._last.get(scope, -1))

    def last(self, scope: str) -> int | None:
        """The last applied seq in ``scope``."""
        return self._last.get(scope)

    def snapshot(self) -> dict[str, int]:
        """A copy of every scope's last applied seq, for saving."""
        return dict(self._last)
