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

If the process dies after the broker stored an event but before the row was marked, the event
is sent again with the same ``id`` and ``seq``: consumers drop it as a replay (``seq`` not newer
than what they applied), so each event is applied once.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckms._backoff import Backoff
from ckms._kafka import Outgoing, ProducerSettings, Relay, RelayStats, TopicSpec
from ckms._kafka_security import KafkaLink
from ckms.controller.sealing import Vault
from ckms.crypto import signer_key_id
from ckms.protocol import FLEET_TOPIC, EventType, envelope_dict, sign_envelope_with
from ckms.store import Clock, Store, outbox, utc_now

__all__ = ["OutboxPublisher", "PublisherStats"]

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
            producer=ProducerSettings(client_id="ckms-controller-outbox", linger_ms=2),
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
