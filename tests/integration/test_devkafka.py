"""The local Kafka launcher runs a real broker: durable, replicated, and restartable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ckms.devkafka import LocalKafka

pytestmark = pytest.mark.kafka


async def create_topic(bootstrap: str, name: str, partitions: int, replication: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication)]
        )
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[int, bytes]]) -> list[int]:
    """Send (partition, value) pairs with acks=all and idempotence; return their offsets."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=20000
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
    bootstrap: str, tp: TopicPartition, offset: int, count: int, wait_s: float = 30.0
) -> list[bytes]:
    """Read ``count`` values of one partition from ``offset`` with assign() (no group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
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
    kafka_bootstrap: str, unique_topic: Callable[[str], str]
) -> None:
    topic = unique_topic("events")
    await create_topic(kafka_bootstrap, topic, partitions=4)
    records = [(i % 4, f"record-{i}".encode()) for i in range(40)]
    offsets = await produce(kafka_bootstrap, topic, records)

    # Partition 2 got records 2, 6, 10, ...; store the offset of its 4th record, as an agent
    # keeps its event offset, and resume from there.
    in_p2 = [(off, value) for (part, value), off in zip(records, offsets, strict=True) if part == 2]
    stored_offset, _ = in_p2[3]
    expected = [value for _, value in in_p2[3:]]
    got = await read_from(kafka_bootstrap, TopicPartition(topic, 2), stored_offset, len(expected))
    assert got == expected


async def test_single_node_restart_keeps_records(unique_topic: Callable[[str], str]) -> None:
    topic = unique_topic("durable")
    async with LocalKafka() as kafka:
        await create_topic(kafka.bootstrap, topic, partitions=2)
        values = [f"kept-{i}".encode() for i in range(10)]
        await produce(kafka.bootstrap, topic, [(0, v) for v in values])
        old_pid = kafka.pid(0)

        await kafka.stop_node(0)
        assert kafka.pid(0) is None
        await kafka.start_node(0)
        assert kafka.pid(0) not in (None, old_pid)

        got = await read_from(kafka.bootstrap, TopicPartition(topic, 0), 0, len(values))
        assert got == values


@pytest.mark.cluster
@pytest.mark.timeout(240)
async def test_three_node_cluster_serves_with_one_node_down(
    unique_topic: Callable[[str], str],
) -> None:
    topic = unique_topic("replicated")
    async with LocalKafka(nodes=3) as cluster:
        assert len(cluster.bootstrap.split(",")) == 3
        await create_topic(cluster.bootstrap, topic, partitions=3, replication=3)
        before = [f"before-{i}".encode() for i in range(5)]
        await produce(cluster.bootstrap, topic, [(0, v) for v in before])

        await cluster.stop_node(1)
        # acks=all with min.insync.replicas=2: two live replicas are enough.
        during = [f"during-{i}".encode() for i in range(5)]
        await asyncio.wait_for(
            produce(cluster.bootstrap, topic, [(0, v) for v in during]), timeout=60
        )
        got = await read_from(cluster.bootstrap, TopicPartition(topic, 0), 0, 10)
        assert got == before + during

        await cluster.start_node(1)
        # The restarted node only answers once it has caught up with the cluster's metadata.
        got = await read_from(cluster.node_bootstrap(1), TopicPartition(topic, 0), 0, 10)
        assert got == before + during
