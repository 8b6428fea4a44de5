"""Each controller test gets a real controller on the session Kafka with its own topics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_asyncio

from ckms.controller.service import Controller
from tests.support.controller import running_controller


@pytest_asyncio.fixture
async def controller(
    tmp_path: Path, kafka_bootstrap: str, unique_topic: Callable[[str], str]
) -> AsyncIterator[Controller]:
    async with running_controller(
        tmp_path / "controller", kafka_bootstrap, unique_topic("events"), unique_topic("acks")
    ) as c:
        yield c
