"""Acks as an agent sends them, for tests that play the agent's part on Kafka."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from ckms.controller.service import Controller
from ckms.protocol import Ack, EventType, encode_event


async def send_ack(c: Controller, signer: bytes, ack: Ack, seq: int) -> None:
    """Sign ``ack`` with ``signer`` as envelope ``seq`` and publish it to the controller's topic."""
    msg = encode_event(EventType.ACK, ack, seq=seq, signing_key=signer, at=datetime.now(UTC))
    producer = AIOKafkaProducer(bootstrap_servers=c.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            c.settings.acks_topic, msg.value, key=msg.key, headers=list(msg.headers)
        )
    finally:
        await producer.stop()
