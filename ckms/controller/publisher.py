"""The outbox publisher: relays committed events to Kafka, in commit order, each at least once.

Lifecycle changes write their event into the ``outbox`` table in the same transaction as the
change (so no event is lost if the process dies). This task is a
:class:`~ckms._kafka.Relay` over the outbox: it reads unsent rows in ``seq`` order, signs each
envelope with the vault's key (nothing while sealed), sends them partitioned by key name, and
marks rows sent only after the broker confirmed them. ``fleet.acked`` rows go to the fleet topic
(what services following the fleet read), every other event to the events topic (what agents
read), in the one sequence. While Kafka is down, the controller keeps
working and the outbox grows; the relay retries with a jittered backoff and then sends
everything, in order.

Each batch is one Kafka transaction under one transactional id shared by every replica
(:func:`transactional_id`): the producer a new leader starts fences the old leader's, which can
then commit nothing, and whatever is committed on the topic at that moment is final. So a new
producer first reads the committed tail of the topic and marks the events already there as
sent (a leader that died, or froze, between Kafka's commit and its own mark), and continues
after them: each event is on the topic once, in order, for readers of committed records
(``ckms.consumer`` reads so). Before its producer starts and before each commit, the publisher
checks in the store, under the leader fence, that its replica still leads
(:mod:`ckms.controller.leader`). The window left: a leader that passed that check and froze
before its commit resumes after the next leader took the lease but before that leader's
producer started; its commit of that one batch, events already committed in the store and
next in sequence, still lands, and the next leader continues after it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ckms._backoff import Backoff
from ckms._kafka import Outgoing, ProducerSettings, Relay, RelayStats, TopicSpec, read_tails
from ckms._kafka_acls import outbox_transactional_id
from ckms._kafka_security import KafkaLink
from ckms.controller.sealing import Vault
from ckms.crypto import signer_key_id
from ckms.protocol import (
    FLEET_TOPIC,
    EventType,
    MessageRejected,
    envelope_dict,
    sign_envelope_with,
    verify_message,
)
from ckms.store import Clock, Store, outbox, utc_now

__all__ = ["OutboxPublisher", "PublisherStats", "transactional_id"]

log = logging.getLogger(__name__)

_TAIL = 2048
"""Records read back from the end of each events partition when a producer starts: the last
committed batch (at most ``batch_size`` events and its marker) is among them even behind a few
aborted ones."""


transactional_id = outbox_transactional_id

PublisherStats = RelayStats
"""What the publisher did, for ``ckms status`` and tests."""


class _SignedOutbox:
    """The outbox as a relay's queue: unsent rows, signed on the way out."""

    def __init__(self, store: Store, vault: Vault, clock: Clock, fleet_topic: str) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._fleet_topic = fleet_topic

    async def pending(self, limit: int) -> Sequence[Outgoing]:
        if self._vault.sealed:
            return []  # events cannot be signed; they wait in the outbox for the unseal
        events = await outbox.pending_events(self._store, limit=limit)
        if not events:
            return []
        kid = signer_key_id(await self._vault.public_key())
        out = []
        for event in events:
            envelope = envelope_dict(
                event.type, event.data, seq=event.seq, at=event.created_at, event_id=event.event_id
            )
            message = sign_envelope_with(envelope, self._vault.sign, kid)
            topic = self._fleet_topic if event.type == EventType.FLEET_ACKED else None
            out.append(
                Outgoing(event.seq, message.value, message.key, tuple(message.headers), topic)
            )
        return out

    async def confirmed(self, idents: Sequence[int]) -> None:
        await outbox.mark_sent(self._store, list(idents), now=self._clock())

    async def may_send(self) -> None:
        # A write transaction that does nothing but pass the leader fence (Store.write).
        async with self._store.write():
            pass

    async def started(self, kafka: KafkaLink, topic: str) -> None:
        """Mark sent what the topics already hold, committed and signed by this controller
        (the events and the fleet topic share the one sequence and its transactions)."""
        public = await self._vault.public_key()
        kid = signer_key_id(public)
        tails = []
        for name in dict.fromkeys((topic, self._fleet_topic)):
            tails += await read_tails(kafka, name, per_partition=_TAIL, committed=True)
        newest = 0
        for value, headers in tails:
            try:
                newest = max(newest, verify_message(value, headers, {kid: public}).seq)
            except MessageRejected:
                continue
        if newest:
            marked = await outbox.mark_sent_through(self._store, newest, now=self._clock())
            if marked:
                log.info(
                    "%d event(s) up to seq %d were on %s already (committed by an earlier "
                    "leader that did not mark them): marked sent, not sent again",
                    marked,
                    newest,
                    topic,
                )


class OutboxPublisher(Relay):
    """``run()`` relays the outbox to ``topic`` until cancelled; ``wake()`` after a commit."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        *,
        kafka: KafkaLink,
        topics: list[TopicSpec],
        topic: str,
        fleet_topic: str = FLEET_TOPIC,
        clock: Clock = utc_now,
        batch_size: int = 500,
        poll_s: float = 0.5,
        backoff_max_s: float = 10.0,
        delivery_timeout_s: float = 20.0,
    ) -> None:
        super().__init__(
            _SignedOutbox(store, vault, clock, fleet_topic),
            kafka=kafka,
            topic=topic,
            producer=ProducerSettings(
                client_id="ckms-controller-outbox",
                transactional_id=transactional_id(topic),
                linger_ms=2,
            ),
            backoff=Backoff(0.5, backoff_max_s),
            batch_size=batch_size,
            poll_s=poll_s,
            delivery_timeout_s=delivery_timeout_s,
            topics=topics,
        )
        self._store = store
        store.add_outbox_listener(self.wake)  # send right after a commit, not at the next poll

    async def backlog(self) -> int:
        """How many committed events are not yet confirmed by Kafka."""
        value = await self._store.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        return int(value or 0)
