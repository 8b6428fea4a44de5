"""Fixtures of the agent's integration tests (the harness lives in ``agent_harness``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from agent_harness import ALLOWED, TOKEN, AckReader, FakeController, World

from ckms._kafka import TopicSpec, ensure_topics
from ckms_agent.enroll import enroll


@pytest.fixture
async def world(
    kafka_bootstrap: str, unique_topic: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[World]:
    events, acks = unique_topic("events"), unique_topic("acks")
    await ensure_topics(
        kafka_bootstrap, [TopicSpec(events, partitions=3), TopicSpec(acks, partitions=1)]
    )
    controller = FakeController(kafka_bootstrap, events, acks)
    await controller.start()
    reader = AckReader(kafka_bootstrap, acks)
    await reader.start()
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
    try:
        yield World(controller, reader, tmp_path, config_path, root)
    finally:
        await reader.stop()
        await controller.stop()
