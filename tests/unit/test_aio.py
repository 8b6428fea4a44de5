"""A stopping service must stop: a cancel that lands as a loop's wait ends is not lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from ckms._aio import stop_if_cancelled, wait_event
from ckms._backoff import Backoff
from ckms._kafka import Outgoing, ProducerSettings, Relay
from ckms._kafka_security import KafkaLink, KafkaSecurity


async def _stops(task: asyncio.Task[None]) -> bool:
    done, _ = await asyncio.wait([task], timeout=5)
    if not done:
        task.cancel()  # the loop swallowed the first cancel; do not leave it behind
        await asyncio.wait([task], timeout=5)
    return bool(done)


async def test_a_cancel_in_the_same_turn_as_the_event_stops_the_wait() -> None:
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait_event(event, 10)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    assert await _stops(task)


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    event.set()
    assert await wait_event(event, 0.01)


async def test_a_swallowed_cancel_still_stops_the_next_turn() -> None:
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            stop_if_cancelled()
            turns += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)  # what a library that loses the cancel looks like here

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    task.cancel()
    assert await _stops(task)
    assert turns == 1


class _Empty:
    async def pending(self, limit: int) -> Sequence[Outgoing]:
        return []

    async def confirmed(self, idents: Sequence[int]) -> None:
        raise AssertionError("nothing was sent")


async def test_a_relay_woken_as_it_is_cancelled_stops() -> None:
    """The publisher is woken by every commit; a commit as the controller stops is common."""
    relay = Relay(
        _Empty(),
        kafka=KafkaLink("127.0.0.1:9", KafkaSecurity.plaintext()),  # never reached: empty queue
        topic="t",
        producer=ProducerSettings(client_id="test"),
        backoff=Backoff(0.1, 1.0),
        poll_s=30,
    )
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.01)
    relay.wake()
    task.cancel()
    assert await _stops(task)
