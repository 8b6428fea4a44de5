"""Kafka is fenced too: an old leader publishes nothing after a new leader's producer started
(events, and audit anchors), and an event committed to Kafka but not marked sent is not
published again (real Kafka).

Two replicas on one store (a SQLite file, or a PostgreSQL database), opened but not run
(tests/support/replicas): the test moves their clock and calls their publishers itself, so
the interleavings are exact.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from ckms._kafka import read_newest
from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole, signer_key_id
from ckms.devkafka import LocalKafka
from ckms.errors import CKMSError, NotLeaderError
from ckms.store import audit as audit_log
from ckms.store import lease as leases
from ckms.store import outbox
from tests.support.records import committed_seqs
from tests.support.replicas import open_replica, take_lease, target_settings
from tests.support.stores import StoreTarget
from tests.unit.controller.conftest import FakeClock

pytestmark = pytest.mark.kafka

TTL = 10.0


@pytest.fixture
async def replicas(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    store_target: StoreTarget,
) -> AsyncIterator[tuple[Controller, Controller, FakeClock]]:
    """Two replicas on one store (a SQLite file, or a PostgreSQL database) and one Kafka."""
    clock = FakeClock()
    settings: dict[str, Any] = {
        "events_topic": unique_topic("events"),
        "fleet_topic": unique_topic("fleet"),
        "audit_topic": unique_topic("audit"),
        "kafka": controller_kafka,
        "lease_s": TTL,
        **target_settings(store_target),
    }
    a = await open_replica(tmp_path / "a", clock=clock, name="ctl-a", **settings)
    b = await open_replica(tmp_path / "b", clock=clock, name="ctl-b", **settings)
    try:
        yield a, b, clock
    finally:
        for c in (a, b):
            await c.publisher._close_producer()
            await c.vault.anchor.close()
            await c.close()
        # A fenced producer can leave aiokafka a future whose error nobody retrieves; collected
        # here, not in the middle of a later compile (Python 3.11 then fails that compile).
        gc.collect()


def reader(local_kafka: LocalKafka) -> KafkaLink:
    return local_kafka.link(SubjectRole.SUBSCRIBER, "fencing-reader")


async def test_an_old_leader_publishes_nothing_once_the_new_one_started(
    replicas: tuple[Controller, Controller, FakeClock], local_kafka: LocalKafka
) -> None:
    a, b, clock = replicas
    assert a.store is not None
    topic = a.settings.events_topic
    fence_a = await take_lease(a)
    await a.lifecycle.create("app/one", "aes-256", actor="alice")
    with leases.fenced(fence_a):
        assert await a.publisher.publish_pending() == 1

    # A freezes past its lease; B takes over and publishes what was committed meanwhile.
    await b.lifecycle.create("app/two", "aes-256", actor="alice")
    clock.advance(seconds=TTL + 1)
    fence_b = await take_lease(b)
    with leases.fenced(fence_b):
        assert await b.publisher.publish_pending() == 1

    # A wakes up with its producer still open and new events in the store to publish.
    await a.lifecycle.create("app/three", "aes-256", actor="alice")
    before = await committed_seqs(reader(local_kafka), topic)
    with leases.fenced(fence_a), pytest.raises(CKMSError):
        await a.publisher.publish_pending()  # its producer was fenced by B's, or its lease check
    with leases.fenced(fence_a), pytest.raises(NotLeaderError):
        await a.publisher.publish_pending()  # again, with a new producer: refused before it starts
    assert fence_a.lost.is_set()  # the lease task steps down at once
    assert await committed_seqs(reader(local_kafka), topic) == before == [1, 2]

    # The leader publishes it, once.
    with leases.fenced(fence_b):
        assert await b.publisher.publish_pending() == 1
    assert await committed_seqs(reader(local_kafka), topic) == [1, 2, 3]
    assert await outbox.pending_events(a.store) == []


async def test_an_event_committed_to_kafka_but_not_marked_is_not_published_again(
    replicas: tuple[Controller, Controller, FakeClock], local_kafka: LocalKafka
) -> None:
    a, b, clock = replicas
    assert a.store is not None
    topic = a.settings.events_topic
    fence_a = await take_lease(a)
    for name in ("app/one", "app/two"):
        await a.lifecycle.create(name, "aes-256", actor="alice")

    async def die_before_marking(idents: object) -> None:
        raise CKMSError("killed after Kafka's commit, before marking the rows sent")

    a.publisher.source.confirmed = die_before_marking  # type: ignore[method-assign]
    with leases.fenced(fence_a), pytest.raises(CKMSError, match="killed"):
        await a.publisher.publish_pending()
    assert len(await outbox.pending_events(a.store)) == 2  # on the topic, not marked

    await b.lifecycle.create("app/three", "aes-256", actor="alice")
    clock.advance(seconds=TTL + 1)
    fence_b = await take_lease(b)
    with leases.fenced(fence_b):
        assert await b.publisher.publish_pending() == 1  # only the one not on the topic yet
    assert await committed_seqs(reader(local_kafka), topic) == [1, 2, 3]
    assert await outbox.pending_events(a.store) == []


async def _newest_anchor_size(c: Controller, kafka: KafkaLink) -> int | None:
    kid = signer_key_id(await c.vault.public_key())
    value = await read_newest(kafka, c.settings.audit_topic, key=kid.encode())
    return None if value is None else audit_log.parse_checkpoint_line(value).size


@pytest.mark.parametrize("frozen_at", ["send", "commit_transaction"])
async def test_an_old_leader_paused_with_an_anchor_in_hand_cannot_put_it_out_late(
    replicas: tuple[Controller, Controller, FakeClock],
    controller_kafka: KafkaLink,
    monkeypatch: pytest.MonkeyPatch,
    frozen_at: str,
) -> None:
    # The anchor on the (compacted) topic is what a controller reads back on start: an older
    # one landing after a newer one would anchor the log at the older size, and records cut
    # between the two would go unseen. Frozen at its send (before its last lease check), the
    # old leader is stopped by that check; frozen at its commit (after it), by the new
    # leader's producer, which fenced its transactional id.
    a, b, clock = replicas
    await take_lease(a)
    await a.vault.anchor.load()
    await a.lifecycle.create("app/one", "aes-256", actor="alice")
    await a.vault.anchor.checkpoint()  # signed and published in A's term
    await a.lifecycle.create("app/two", "aes-256", actor="alice")

    # A signs one more checkpoint and freezes on its way out; B takes over, reads the anchor
    # back, signs a newer checkpoint and publishes it.
    newer: list[int] = []
    original = getattr(AIOKafkaProducer, frozen_at)

    async def frozen(producer: AIOKafkaProducer, *args: Any, **kw: Any) -> Any:
        if producer is a.vault.anchor._producer and not newer:
            newer.append(0)
            clock.advance(seconds=TTL + 1)
            await take_lease(b)
            await b.vault.anchor.load()
            await b.lifecycle.create("app/three", "aes-256", actor="alice")
            newer[0] = (await b.vault.anchor.checkpoint()).size
            assert await _newest_anchor_size(b, controller_kafka) == newer[0]
        return await original(producer, *args, **kw)

    monkeypatch.setattr(AIOKafkaProducer, frozen_at, frozen)
    with contextlib.suppress(CKMSError):  # refused: its lease is gone, or it was fenced
        await a.vault.anchor.checkpoint()  # wakes up and sends what it signed
    monkeypatch.undo()
    assert newer and newer[0] > 0
    assert await _newest_anchor_size(a, controller_kafka) == newer[0]

    # And B, reading the anchor back as a new term does, is anchored at its own checkpoint.
    await b.vault.anchor.close()
    b.vault.anchor.reset()
    await b.vault.anchor.load()
    assert b.vault.anchor.broken is None
    assert b.vault.anchor.last is not None and b.vault.anchor.last.size == newer[0]
