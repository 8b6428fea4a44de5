"""The public Subscriber against a real broker: verified, typed, ordered, bad input dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from ckms._kafka import TopicSpec, ensure_topics
from ckms._kafka_security import KafkaLink
from ckms.consumer import Envelope, FileOffsetStore, Subscriber
from ckms.crypto import generate_signing_key, sign, signer_key_id, signing_public_key
from ckms.protocol import (
    KEY_ID_HEADER,
    MAX_MESSAGE_BYTES,
    SIGNATURE_HEADER,
    EventType,
    KeyRevoked,
    RevocationReason,
    SignedMessage,
    VersionState,
    canonical_json,
    encode_event,
)

pytestmark = pytest.mark.kafka
AT = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def revoked(seq: int, signer: bytes, key: str = "payments/db") -> SignedMessage:
    data = KeyRevoked.model_validate(
        {
            "key": key,
            "key_id": "k-1",
            "version": seq,
            "from": VersionState.ACTIVE,
            "to": VersionState.COMPROMISED,
            "reason": RevocationReason.KEY_COMPROMISE,
            "compromise": True,
        }
    )
    return encode_event(EventType.KEY_REVOKED, data, seq=seq, signing_key=signer, at=AT)


async def send_all(kafka: KafkaLink, topic: str, messages: list[tuple[bytes, bytes, list]]) -> None:
    producer = AIOKafkaProducer(**kafka.client_args(acks="all", enable_idempotence=True))
    await producer.start()
    try:
        for key, value, headers in messages:
            await producer.send_and_wait(topic, value, key=key, headers=headers, partition=0)
    finally:
        await producer.stop()


def as_record(msg: SignedMessage) -> tuple[bytes, bytes, list]:
    return (msg.key, msg.value, list(msg.headers))


async def take(sub: Subscriber, n: int, wait_s: float = 20.0) -> list[Envelope]:
    async def collect() -> list[Envelope]:
        out = []
        async for event in sub:
            out.append(event)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(collect(), wait_s)


@pytest.fixture
async def topic(controller_kafka: KafkaLink, unique_topic: Callable[[str], str]) -> str:
    name = unique_topic("events")
    await ensure_topics(controller_kafka, [TopicSpec(name, partitions=3)])
    await ensure_topics(controller_kafka, [TopicSpec(name, partitions=3)])  # idempotent
    return name


async def test_bad_events_are_dropped_with_a_reason_and_good_ones_delivered(
    controller_kafka: KafkaLink,
    reader_kafka: KafkaLink,
    topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    controller = generate_signing_key()
    intruder = generate_signing_key()
    kid = signer_key_id(signing_public_key(controller)).encode()

    first = revoked(1, controller)
    tampered = bytearray(revoked(2, controller).value)
    tampered[tampered.index(b"keyCompromise")] ^= 0x20
    unknown_v = canonical_json(
        {"v": 9, "id": "x", "seq": 3, "type": "key.revoked", "at": "", "data": {}}
    )
    not_json = b"\x00\x01 definitely not json"
    last = revoked(4, controller)

    def signed(raw: bytes) -> tuple[bytes, bytes, list]:
        return (
            b"payments/db",
            raw,
            [(SIGNATURE_HEADER, sign(controller, raw)), (KEY_ID_HEADER, kid)],
        )

    await send_all(controller_kafka,
        topic,
        [
            as_record(first),
            as_record(revoked(2, intruder)),  # forged: another key
            (b"payments/db", bytes(tampered), list(first.headers)),  # one byte changed
            as_record(first),  # replayed: same seq again
            signed(unknown_v),
            signed(not_json),
            (b"payments/db", b"{" * (MAX_MESSAGE_BYTES + 10), []),  # oversized
            as_record(last),
        ],
    )
    caplog.set_level(logging.WARNING, logger="ckms.consumer")
    async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security, trust=signing_public_key(controller), topic=topic
    ) as sub:
        events = await take(sub, 2)
        stats = dict(sub.stats)
    assert [e.seq for e in events] == [1, 4]
    assert all(isinstance(e.data, KeyRevoked) for e in events)
    reasons = [r.getMessage() for r in caplog.records if "dropped event" in r.getMessage()]
    for reason in (
        "unknown-signer",
        "bad-signature",
        "replayed",
        "unsupported-version",
        "malformed",
        "oversized",
    ):
        assert any(f"reason={reason}" in line for line in reasons), (reason, reasons)
    assert stats["delivered"] == 2
    assert sum(v for k, v in stats.items() if k != "delivered") == 6


async def test_positions_survive_restarts_and_types_filter(
    controller_kafka: KafkaLink, reader_kafka: KafkaLink, topic: str, tmp_path: Path
) -> None:
    controller = generate_signing_key()
    offsets = tmp_path / "offsets.json"
    await send_all(controller_kafka, topic, [as_record(revoked(s, controller)) for s in (1, 2, 3)])

    async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security,
        trust=signing_public_key(controller),
        topic=topic,
        offsets=offsets,
    ) as sub:
        assert [e.seq for e in await take(sub, 3)] == [1, 2, 3]
    assert FileOffsetStore(offsets).load_sync(topic)[0].offset == 3
    assert offsets.stat().st_mode & 0o077 == 0

    await send_all(controller_kafka, topic, [as_record(revoked(s, controller)) for s in (4, 5)])
    async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security,
        trust=signing_public_key(controller),
        topic=topic,
        offsets=offsets,
    ) as sub:
        assert [e.seq for e in await take(sub, 2)] == [4, 5]

    # A subscriber that only wants key.rotated sees none of these.
    async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security,
        trust=signing_public_key(controller),
        topic=topic,
        types={"key.rotated"},
    ) as sub:
        with pytest.raises(TimeoutError):
            await take(sub, 1, wait_s=3)
        assert sub.stats["delivered"] == 0


async def test_an_exception_in_the_handler_redelivers_the_event(
    controller_kafka: KafkaLink, reader_kafka: KafkaLink, topic: str, tmp_path: Path
) -> None:
    controller = generate_signing_key()
    offsets = tmp_path / "offsets.json"
    await send_all(controller_kafka, topic, [as_record(revoked(s, controller)) for s in (1, 2)])
    with pytest.raises(RuntimeError):
        async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security,
            trust=signing_public_key(controller),
            topic=topic,
            offsets=offsets,
        ) as sub:
            assert [e.seq for e in await take(sub, 1)] == [1]
            raise RuntimeError("handler failed")
    async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security,
        trust=signing_public_key(controller),
        topic=topic,
        offsets=offsets,
    ) as sub:
        assert [e.seq for e in await take(sub, 2)] == [1, 2]
