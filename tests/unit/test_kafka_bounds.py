"""A step that waits for Kafka ends within its bound, as a ckms error naming the step.

aiokafka retries some requests for as long as no broker answers (a transaction coordinator, a
producer id); the relay bounds each such step with ``kafka_within`` so an outage is counted.
With real Kafka: ``tests/integration/controller/test_events_and_acks.py`` (a broker stopped).
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import NodeNotReadyError

from ckms._kafka import kafka_within
from ckms.errors import KafkaUnavailableError


async def test_a_step_that_never_ends_fails_at_its_bound_naming_the_step() -> None:
    bounded = "starting a producer: Kafka did not answer within 0 s"
    with pytest.raises(KafkaUnavailableError, match=bounded):
        async with kafka_within("starting a producer", 0.2):
            await asyncio.Event().wait()  # what a retry loop without a broker looks like here


async def test_an_aiokafka_error_in_a_step_is_a_ckms_error() -> None:
    with pytest.raises(KafkaUnavailableError, match="committing: NodeNotReadyError"):
        async with kafka_within("committing", 5):
            raise NodeNotReadyError("node 1")


async def test_a_cancel_from_outside_is_not_taken_for_the_bound() -> None:
    async def step() -> None:
        async with kafka_within("sending", 30):
            await asyncio.Event().wait()

    task = asyncio.create_task(step())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
