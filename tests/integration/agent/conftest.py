"""Fixtures of the agent's integration tests (the harness lives in ``agent_harness``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from agent_harness import ALLOWED, HOST, TOKEN, AckReader, FakeController, World

from ckms._kafka import TopicSpec, ensure_topics
from ckms._kafka_security import KafkaLink
from ckms.devkafka import LocalKafka
from ckms_agent.enroll import enroll
from tests.support.kafka import use_test_broker_certificate


@pytest.fixture
async def world(
    local_kafka: LocalKafka,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    tmp_path: Path,
) -> AsyncIterator[World]:
    events = unique_topic("events")
    await ensure_topics(controller_kafka, [TopicSpec(events, partitions=3)])
    controller = FakeController(controller_kafka, events)
    await controller.start()
    reader = AckReader(controller)
    config_path = tmp_path / "etc" / "agent.toml"
    root = tmp_path / "root"
    await enroll(
        controller_host="127.0.0.1",
        controller_port=controller.port,
        token=TOKEN,
        host_key_fingerprint=controller.fingerprint,
        state_dir=tmp_path / "state",
        config_path=config_path,
        root=root,
        policy={"allowed_paths": ALLOWED},
    )
    use_test_broker_certificate(local_kafka.ca, config_path, HOST)
    try:
        yield World(controller, reader, tmp_path, config_path, root)
    finally:
        await controller.stop()
