"""Test support: the records of a topic as Kafka holds them (raw), or their event ``seq``s."""

from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from ckms._kafka import partitions_of
from ckms._kafka_security import KafkaLink


async def read_raw(
    kafka: KafkaLink, topic: str, n: int, wait_s: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """The first ``n`` records of ``topic`` (every partition), waiting for them (bounded)."""
    consumer = AIOKafkaConsumer(**kafka.client_args(group_id=None))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(kafka, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []

        async def collect() -> None:
            while len(records) < n:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)

        await asyncio.wait_for(collect(), wait_s)
        return records
    finally:
        await consumer.stop()


async def committed_seqs(kafka: KafkaLink, topic: str) -> list[int]:
    """Every event ``seq`` on the topic, as a reader of committed records sees it."""
    parts = await partitions_of(kafka, topic)
    consumer = AIOKafkaConsumer(
        **kafka.client_args(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[int] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(json.loads(r.value)["seq"] for r in batch)
        return out
    finally:
        await consumer.stop()
