"""Signed messages put on Kafka by tests that play an agent's (or a forger's) part."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from ckms.controller.service import Controller
from ckms.protocol import Ack, EventType, SignedMessage, encode_event


async def publish(bootstrap: str, topic: str, message: SignedMessage) -> None:
    """Put one signed message on ``topic`` as a producer of it would (``acks=all``)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, message.value, key=message.key, headers=list(message.headers)
        )
    finally:
        await producer.stop()


async def send_ack(c: Controller, signer: bytes, ack: Ack, seq: int) -> None:
    """Sign ``ack`` with ``signer`` as envelope ``seq`` and publish it to the controller's topic."""
    msg = encode_event(EventType.ACK, ack, seq=seq, signing_key=signer, at=datetime.now(UTC))
    await publish(c.settings.kafka_bootstrap, c.settings.acks_topic, msg)
