"""The outbox publisher: relays committed events to Kafka, in commit order, each at least once.

Lifecycle changes write their event into the ``outbox`` table in the same transaction as the
change (so no event is lost if the process dies). This task reads unsent rows in ``seq`` order,
signs each envelope with the vault's key, sends them with an idempotent producer
(``acks=all``), partitioned by key name, and marks rows sent only after the broker confirmed
them. While Kafka is down, the controller keeps working and the outbox grows; the publisher
retries with a bounded, jittered backoff and then sends everything, in order.

If the process dies after the broker stored an event but before the row was marked, the event
is sent again with the same ``id`` and ``seq``: consumers drop it as a replay (``seq`` not newer
than what they applied), so each event is applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ckms._kafka import TopicSpec, abort_producer, ensure_topics, wait_delivered
from ckms.controller.sealing import Vault
from ckms.crypto import signer_key_id
from ckms.errors import CKMSError
from ckms.protocol import envelope_dict, sign_envelope_with
from ckms.store import Clock, Store, outbox, utc_now

log = logging.getLogger(__name__)


@dataclass
class PublisherStats:
    """What the publisher did, for `ckms status` and tests."""

    published: int = 0
    failures: int = 0
    last_error: str | None = None
    connected: bool = False


class OutboxPublisher:
    """``run()`` relays the outbox to ``topic`` until cancelled; ``wake()`` after a commit."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        *,
        bootstrap: str,
        topics: list[TopicSpec],
        topic: str,
        clock: Clock = utc_now,
        batch_size: int = 500,
        poll_s: float = 0.5,
        backoff_max_s: float = 10.0,
        delivery_timeout_s: float = 20.0,
    ) -> None:
        self._store = store
        self._vault = vault
        self._bootstrap = bootstrap
        self._topics = topics
        self._topic = topic
        self._clock = clock
        self._batch_size = batch_size
        self._poll_s = poll_s
        self._backoff_max_s = backoff_max_s
        self._delivery_timeout_s = delivery_timeout_s
        self._wake = asyncio.Event()
        store.add_outbox_listener(self.wake)  # send right after a commit, not at the next poll
        self._producer: AIOKafkaProducer | None = None
        self.stats = PublisherStats()

    def wake(self) -> None:
        """Tell the publisher new rows were committed (it also polls)."""
        self._wake.set()

    async def backlog(self) -> int:
        """How many committed events are not yet confirmed by Kafka."""
        value = await self._store.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        return int(value or 0)

    async def run(self) -> None:
        """Publish until cancelled; Kafka outages are waited out, never fatal."""
        failures = 0
        try:
            while True:
                self._wake.clear()  # before reading: a commit from now on wakes the wait below
                try:
                    sent = await self.publish_pending()
                    failures = 0
                except (KafkaError, OSError, CKMSError) as exc:
                    failures += 1
                    self.stats.failures += 1
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    self.stats.connected = False
                    delay = min(self._backoff_max_s, 0.25 * 2 ** min(failures, 8))
                    delay *= random.uniform(0.5, 1.0)
                    log.warning(
                        "publishing the outbox failed (%s); retrying in %.1fs (backlog %d)",
                        self.stats.last_error,
                        delay,
                        await self.backlog(),
                    )
                    await self._close_producer()
                    await asyncio.sleep(delay)
                    continue
                if sent == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_s)
        finally:
            await self._close_producer()

    async def publish_pending(self) -> int:
        """Send one batch of unsent events and mark what the broker confirmed; return the count."""
        if self._vault.sealed:
            return 0
        events = await outbox.pending_events(self._store, limit=self._batch_size)
        if not events:
            return 0
        producer = await self._ensure_producer()
        kid = signer_key_id(await self._vault.public_key())
        futures = []
        for event in events:
            envelope = envelope_dict(
                event.type, event.data, seq=event.seq, at=event.created_at, event_id=event.event_id
            )
            message = sign_envelope_with(envelope, self._vault.sign, kid)
            futures.append(
                await producer.send(
                    self._topic,
                    message.value,
                    key=message.key,
                    headers=list(message.headers),
                )
            )
        results = await wait_delivered(futures, self._delivery_timeout_s)
        confirmed = []
        error: BaseException | None = None
        for event, result in zip(events, results, strict=True):
            if result is not None:
                error = result
                break  # only the prefix in commit order counts; the rest go again
            confirmed.append(event.seq)
        await outbox.mark_sent(self._store, confirmed, now=self._clock())
        self.stats.published += len(confirmed)
        if confirmed:
            log.debug("published %d events up to seq %d", len(confirmed), confirmed[-1])
        if error is not None:
            if isinstance(error, Exception):
                raise error
            raise error
        return len(confirmed)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        await ensure_topics(self._bootstrap, self._topics)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=15000,
            client_id="ckms-controller-outbox",
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self.stats.connected = True
        log.info("outbox publisher connected to %s", self._bootstrap)
        return producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await abort_producer(producer)  # stop() would wait for Kafka to come back
