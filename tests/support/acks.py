"""Signed messages put on Kafka by tests that play an agent's (or a forger's) part."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole
from ckms.protocol import Ack, EventType, SignedMessage, encode_event
from tests.support.kafka import link_as


async def publish(kafka: KafkaLink, topic: str, message: SignedMessage) -> None:
    """Put one signed message on ``topic`` as a producer of it would (``acks=all``)."""
    producer = AIOKafkaProducer(**kafka.client_args(acks="all"))
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
    # Acks are what any agent certificate may write: the signature, not Kafka, says who.
    await publish(link_as(c, SubjectRole.AGENT, "ack-sender"), c.settings.acks_topic, msg)
