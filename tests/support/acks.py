"""Signed acks sent by tests that play an agent's (or a forger's) part, and Kafka messages put
on a topic as a producer of it would."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import asyncssh
from aiokafka import AIOKafkaProducer

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from ckms.crypto import signing_key_openssh
from ckms.protocol import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    Ack,
    AckReply,
    AckRequest,
    EventType,
    SignedAck,
    SignedMessage,
    encode_event,
)
from ckms.ssh import RpcClient


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


def signed_ack(signer: bytes, ack: Ack, seq: int) -> SignedAck:
    """``ack`` signed with ``signer`` as envelope ``seq``, as the ``ack`` request carries it."""
    msg = encode_event(EventType.ACK, ack, seq=seq, signing_key=signer, at=datetime.now(UTC))
    headers = dict(msg.headers)
    return SignedAck(
        value=base64.b64encode(msg.value).decode(),
        sig=base64.b64encode(headers[SIGNATURE_HEADER]).decode(),
        kid=headers[KEY_ID_HEADER].decode(),
    )


def host_client(c: Controller, host: str, login_key: bytes) -> RpcClient:
    """An SSH connection to ``c`` as ``host``, authenticating with its identity key."""
    return RpcClient(
        host="127.0.0.1",
        port=c.port,
        username=host,
        client_key=asyncssh.import_private_key(signing_key_openssh(login_key)),
        host_key_fingerprint=c.host_key_fingerprint,
    )


async def send_acks(
    c: Controller, host: str, login_key: bytes, acks: list[SignedAck]
) -> AckReply:
    """Send ``acks`` in one ``ack`` request over SSH, logged in as ``host`` with ``login_key``."""
    async with host_client(c, host, login_key) as rpc:
        raw = await rpc.call("ack", AckRequest(acks=tuple(acks)).model_dump(mode="json"))
    return AckReply.model_validate(raw)


async def send_ack(
    c: Controller,
    signer: bytes,
    ack: Ack,
    seq: int,
    *,
    host: str | None = None,
    login_key: bytes | None = None,
) -> AckReply:
    """Sign ``ack`` with ``signer`` as envelope ``seq`` and send it as an agent does: over SSH
    as ``host`` (default: the ack's agent) logged in with ``login_key`` (default: ``signer``)."""
    return await send_acks(
        c, host or ack.agent, login_key or signer, [signed_ack(signer, ack, seq)]
    )
