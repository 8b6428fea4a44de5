"""Operator-CLI tests: a real controller on the session Kafka with a movable clock, and five
operators (one per role, two admins) whose SSH keys live in the test's temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from tests.support.cli import MovableClock, Operators
from tests.support.controller import running_controller


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest_asyncio.fixture
async def controller(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    clock: MovableClock,
) -> AsyncIterator[Controller]:
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        clock=clock,
    ) as c:
        yield c


@pytest_asyncio.fixture
async def ops(controller: Controller, tmp_path: Path) -> Operators:
    people = Operators(controller, tmp_path)
    await people.add("alice", "admin")
    await people.add("bob", "admin")
    await people.add("carol", "custodian")
    await people.add("dave", "operator")
    await people.add("erin", "auditor")
    return people
