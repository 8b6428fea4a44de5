"""Each test here gets a real controller on the session Kafka with its own topics, once with
its store in SQLite (the home's file) and once in a PostgreSQL database of its own."""

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_asyncio

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from tests.support.controller import running_controller
from tests.support.stores import StoreTarget


@pytest_asyncio.fixture
async def controller(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    store_target: StoreTarget,
) -> AsyncIterator[Controller]:
    """A running, unsealed controller with its own topics, on each store backend."""
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        audit_topic=unique_topic("audit"),
        **store_target.settings(),
    ) as c:
        yield c
