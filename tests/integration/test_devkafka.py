"""The local Kafka launcher runs a real broker: durable, replicated, restartable, and mTLS with
ACLs on one node and on three."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from ckms._kafka_security import KafkaLink, KafkaSecurity
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka

pytestmark = pytest.mark.kafka

AGENT_WRITE_REFUSED = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)
"""An agent may write nothing: with no IdempotentWrite either, its producer is refused its id."""


async def create_topic(link: KafkaLink, name: str, partitions: int, replication: int = 1) -> None:
    admin = AIOKafkaAdminClient(**link.client_args())
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication)]
        )
    finally:
        await admin.close()


async def produce(link: KafkaLink, topic: str, records: list[tuple[int, bytes]]) -> list[int]:
    """Send (partition, value) pairs with acks=all and idempotence; return their offsets."""
    producer = AIOKafkaProducer(
        **link.client_args(acks="all", enable_idempotence=True, request_timeout_ms=20000)
    )
    await producer.start()
    try:
        offsets = []
        for partition, value in records:
            meta = await producer.send_and_wait(topic, value, partition=partition)
            offsets.append(meta.offset)
        return offsets
    finally:
        await producer.stop()


async def read_from(
    link: KafkaLink, tp: TopicPartition, offset: int, count: int, wait_s: float = 30.0
) -> list[bytes]:
    """Read ``count`` values of one partition from ``offset`` with assign() (no group)."""
    consumer = AIOKafkaConsumer(**link.client_args(enable_auto_commit=False))
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        values: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while len(values) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500)
            values.extend(m.value for m in batches.get(tp, []))
        return values
    finally:
        await consumer.stop()


async def test_assign_reads_from_a_stored_offset(
    controller_kafka: KafkaLink, reader_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("events")
    await create_topic(controller_kafka, topic, partitions=4)
    records = [(i % 4, f"record-{i}".encode()) for i in range(40)]
    offsets = await produce(controller_kafka, topic, records)

    # Partition 2 got records 2, 6, 10, ...; store the offset of its 4th record, as an agent
    # keeps its event offset, and resume from there.
    in_p2 = [(off, value) for (part, value), off in zip(records, offsets, strict=True) if part == 2]
    stored_offset, _ = in_p2[3]
    expected = [value for _, value in in_p2[3:]]
    got = await read_from(reader_kafka, TopicPartition(topic, 2), stored_offset, len(expected))
    assert got == expected


async def test_single_node_restart_keeps_records(unique_topic: Callable[[str], str]) -> None:
    topic = unique_topic("durable")
    async with LocalKafka() as kafka:
        link = kafka.link(SubjectRole.CONTROLLER, "controller")
        await create_topic(link, topic, partitions=2)
        values = [f"kept-{i}".encode() for i in range(10)]
        await produce(link, topic, [(0, v) for v in values])
        old_pid = kafka.pid(0)

        await kafka.stop_node(0)
        assert kafka.pid(0) is None
        await kafka.start_node(0)
        assert kafka.pid(0) not in (None, old_pid)

        # Certificates and ACLs survive the restart (ACLs live in the metadata log).
        reader = kafka.link(SubjectRole.SUBSCRIBER, "reader")
        got = await read_from(reader, TopicPartition(topic, 0), 0, len(values))
        assert got == values
        with pytest.raises(AGENT_WRITE_REFUSED):
            await produce(kafka.link(SubjectRole.AGENT, "host-1"), topic, [(0, b"forged")])


@pytest.mark.cluster
@pytest.mark.timeout(240)
async def test_three_node_cluster_serves_with_one_node_down(
    unique_topic: Callable[[str], str],
) -> None:
    topic = unique_topic("replicated")
    async with LocalKafka(nodes=3) as cluster:
        assert len(cluster.bootstrap.split(",")) == 3
        link = cluster.link(SubjectRole.CONTROLLER, "controller")
        await create_topic(link, topic, partitions=3, replication=3)
        before = [f"before-{i}".encode() for i in range(5)]
        await produce(link, topic, [(0, v) for v in before])
        # mTLS and ACLs on every node: an agent cannot write events, a client without a
        # certificate cannot connect.
        agent = cluster.link(SubjectRole.AGENT, "host-1")
        with pytest.raises(AGENT_WRITE_REFUSED):
            await produce(agent, topic, [(0, b"forged")])
        for i in range(3):
            no_cert = KafkaSecurity.plaintext()
            with pytest.raises((KafkaConnectionError, TimeoutError)):
                await asyncio.wait_for(
                    produce(KafkaLink(cluster.node_bootstrap(i), no_cert), topic, [(0, b"x")]), 20
                )

        await cluster.stop_node(1)
        # acks=all with min.insync.replicas=2: two live replicas are enough.
        during = [f"during-{i}".encode() for i in range(5)]
        await asyncio.wait_for(produce(link, topic, [(0, v) for v in during]), timeout=60)
        got = await read_from(agent, TopicPartition(topic, 0), 0, 10)
        assert got == before + during

        await cluster.start_node(1)
        # The restarted node only answers once it has caught up with the cluster's metadata.
        node_1 = KafkaLink(cluster.node_bootstrap(1), agent.security)
        got = await read_from(node_1, TopicPartition(topic, 0), 0, 10)
        assert got == before + during
