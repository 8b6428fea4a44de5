"""Lifecycle changes become signed events on Kafka, each delivered once (real Kafka).

Acks over SSH and their ``fleet.acked`` events: ``test_acks.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms._kafka import partitions_of
from ckms._kafka_security import KafkaLink
from ckms.consumer import Envelope, Subscriber
from ckms.controller.service import Controller, ControllerSettings
from ckms.crypto import (
    SubjectRole,
)
from ckms.devkafka import LocalKafka
from ckms.errors import CKMSError
from ckms.protocol import (
    EventType,
    KeyCreated,
    KeyRevoked,
    RevocationReason,
)
from tests.support.controller import PASSPHRASE, running_controller
from tests.support.kafka import link_as
from tests.support.records import committed_seqs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.kafka


async def take(sub: Subscriber, n: int, wait_s: float = 30.0) -> list[Envelope]:
    async def collect() -> list[Envelope]:
        out: list[Envelope] = []
        async for event in sub:
            out.append(event)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(collect(), wait_s)


async def wait_for(predicate: Callable[[], object], wait_s: float = 20.0) -> None:
    await wait_until(predicate, wait_s)


def subscriber(c: Controller, public: bytes, **kw: object) -> Subscriber:
    reader = link_as(c, SubjectRole.SUBSCRIBER, "test-reader")
    return Subscriber(
        bootstrap=reader.bootstrap,
        security=reader.security,
        trust=public,
        topic=c.settings.events_topic,
        **kw,  # type: ignore[arg-type]
    )


async def test_the_controller_creates_its_topics_before_its_first_event(
    controller: Controller,
) -> None:
    """Agents and subscribers may start before anything is published: the topics they read
    exist once the controller runs, not only after its first event."""
    assert await controller.publisher.backlog() == 0

    async def exist() -> bool:
        try:
            for topic in (controller.settings.events_topic, controller.settings.fleet_topic):
                await partitions_of(controller.settings.kafka, topic, wait_s=1.0)
        except CKMSError:
            return False
        return True

    await wait_for(exist)


async def test_a_lifecycle_change_becomes_a_signed_event(controller: Controller) -> None:
    lc = controller.lifecycle
    await lc.create("payments/db", "aes-256", actor="alice")
    await lc.rotate("payments/db", actor="alice")
    await lc.revoke("payments/db", RevocationReason.KEY_COMPROMISE, version=1, actor="alice")
    public = await controller.vault.public_key()
    async with subscriber(controller, public) as sub:
        events = await take(sub, 3)
    assert [e.type for e in events] == [
        EventType.KEY_CREATED,
        EventType.KEY_ROTATED,
        EventType.KEY_REVOKED,
    ]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    created, revoked = events[0].data, events[2].data
    assert isinstance(created, KeyCreated) and created.key == "payments/db"
    assert isinstance(revoked, KeyRevoked) and revoked.compromise and revoked.version == 1
    # Rows are marked sent once the broker confirmed them (which can be just after delivery).
    await wait_for(lambda: _no_backlog(controller))


async def test_events_survive_a_broker_restart_each_delivered_once_in_order(
    tmp_path: Path, unique_topic: Callable[[str], str]
) -> None:
    async with (
        LocalKafka() as kafka,
        running_controller(
            tmp_path / "c",
            kafka.link(SubjectRole.CONTROLLER, "controller"),
            unique_topic("events"),
            unique_topic("fleet"),
        ) as c,
    ):
        lc = c.lifecycle
        for name in ("a/one", "b/two"):
            await lc.create(name, "aes-256", actor="alice")
        await wait_for(lambda: _no_backlog(c))

        await kafka.stop_node(0)
        for _ in range(3):  # the controller keeps working while Kafka is down
            await lc.rotate("a/one", actor="alice")
            await lc.rotate("b/two", actor="alice")
        assert await c.publisher.backlog() == 6
        # The outage is reported (`ckms status`, metrics) and the publisher goes on trying.
        # Regression: discarding the producer of the failed transaction waited for aiokafka's
        # sender, which looked for the transaction coordinator for as long as Kafka was down.
        stats = c.publisher.stats
        await wait_for(lambda: stats.failures and not stats.connected, wait_s=60)
        failures = stats.failures
        await wait_for(lambda: stats.failures > failures, wait_s=60)
        await kafka.start_node(0)
        await wait_for(lambda: _no_backlog(c), wait_s=60)
        assert stats.connected

        public = await c.vault.public_key()
        async with subscriber(c, public) as sub:
            events = await take(sub, 8)
            with pytest.raises(TimeoutError):
                await take(sub, 1, wait_s=2)
        reader = link_as(c, SubjectRole.SUBSCRIBER, "test-reader")
        seqs = await committed_seqs(reader, c.settings.events_topic)
    assert len(seqs) == len(set(seqs)) == 8  # each on the topic once, not only read once
    assert len({e.id for e in events}) == 8
    for name in ("a/one", "b/two"):
        versions = [e.data.version for e in events if e.data.key == name]  # type: ignore[union-attr]
        assert versions == [1, 2, 3, 4]


async def test_an_event_sent_twice_after_a_crash_is_applied_once(controller: Controller) -> None:
    """Crash after the broker stored the events but before they were marked sent."""
    await controller.lifecycle.create("app/token", "hmac-sha256", actor="alice")
    await controller.lifecycle.rotate("app/token", actor="alice")
    await wait_for(lambda: _no_backlog(controller))
    assert controller.store is not None
    async with controller.store.write() as tx:
        await tx.execute("UPDATE outbox SET sent_at = NULL")
    controller.publisher.wake()
    await wait_for(lambda: _no_backlog(controller))
    public = await controller.vault.public_key()
    async with subscriber(controller, public) as sub:
        events = await take(sub, 2)
        with pytest.raises(TimeoutError):
            await take(sub, 1, wait_s=2)
        assert sub.stats.get("replayed") == 2
    assert [e.type for e in events] == [EventType.KEY_CREATED, EventType.KEY_ROTATED]


async def test_events_committed_while_the_publisher_is_down_are_published_once(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    reader_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
) -> None:
    """The process dies after the commit, before the send: the restart publishes it once."""
    home, events_topic, fleet_topic = tmp_path / "c", unique_topic("events"), unique_topic("fleet")
    async with running_controller(home, controller_kafka, events_topic, fleet_topic) as c:
        await c.lifecycle.create("app/one", "aes-256", actor="alice")
        await wait_for(lambda: _no_backlog(c))
        public = await c.vault.public_key()

    # The same controller home, opened and unsealed but never run: the rotation commits with
    # its outbox row, and the process ends before any publisher could send it.
    offline = Controller(ControllerSettings(home=home, kafka_bootstrap=controller_kafka.bootstrap))
    await offline.open()
    await offline.vault.unseal_with_passphrase(PASSPHRASE)
    await offline.lifecycle.rotate("app/one", actor="alice")
    assert await offline.publisher.backlog() == 1
    await offline.close()

    async with running_controller(home, controller_kafka, events_topic, fleet_topic) as c:
        await wait_for(lambda: _no_backlog(c))
    async with Subscriber(
        bootstrap=reader_kafka.bootstrap,
        security=reader_kafka.security,
        trust=public,
        topic=events_topic,
    ) as sub:
        events = await take(sub, 2)
        with pytest.raises(TimeoutError):
            await take(sub, 1, wait_s=2)
    assert [e.type for e in events] == [EventType.KEY_CREATED, EventType.KEY_ROTATED]
    assert [e.data.version for e in events] == [1, 2]  # type: ignore[union-attr]


async def _no_backlog(c: Controller) -> bool:
    return await c.publisher.backlog() == 0
