"""Acks: signed and queued in the state DB first, then published to Kafka, in order, at least once.

:class:`AckWriter` signs an ack with the agent's identity key and writes it to the state DB
(:meth:`AgentState.enqueue_ack`, which also takes the next ack ``seq``), so neither a Kafka
outage nor a restart loses it. :class:`AckPublisher` drains that queue in ``seq`` order with an
idempotent producer (``acks=all``; partition key = the agent id, so one agent's acks stay in
order) and deletes rows only after the broker confirmed them. A crash between the two sends an
ack twice; the controller can key acks by (agent, seq), so a duplicate is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ckms._kafka import abort_producer, wait_delivered
from ckms.protocol import MAX_MESSAGE_BYTES, Ack, AckStatus, EventType, HookResult, encode_event
from ckms_agent.backoff import Backoff
from ckms_agent.state import AgentState

log = logging.getLogger(__name__)

BATCH = 100
MAX_ERROR_CHARS = 1024


class AckWriter:
    """Signs acks with the agent's identity key and queues them in the state DB."""

    def __init__(
        self,
        state: AgentState,
        *,
        identity_key: bytes,
        host_id: str,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self._identity = identity_key
        self._host = host_id
        self._clock = clock
        self._on_queued = on_queued

    async def ack(
        self,
        key: str,
        version: int,
        status: AckStatus,
        *,
        started: float,
        digest: str | None = None,
        hooks: Sequence[HookResult] = (),
        event_id: str | None = None,
        error: str | None = None,
    ) -> int:
        """Queue one signed ack (``started``: ``time.monotonic()`` when the work began)."""
        now = self._clock()
        ack = Ack(
            agent=self._host,
            key=key,
            version=version,
            status=status,
            digest=digest,
            hooks=tuple(hooks),
            event_id=event_id,
            elapsed_ms=max(0, int(1000 * (time.monotonic() - started))),
            error=error[:MAX_ERROR_CHARS] if error else None,
        )
        at = datetime.fromtimestamp(now, UTC)
        identity = self._identity
        seq = await self._state.enqueue_ack(
            lambda s: encode_event(EventType.ACK, ack, seq=s, signing_key=identity, at=at),
            key=key,
            version=version,
            status=str(status),
            now=now,
        )
        if self._on_queued is not None:
            self._on_queued()
        log.info(
            "ack seq=%d key=%s version=%d status=%s event=%s host=%s",
            seq,
            key,
            version,
            status,
            event_id,
            self._host,
        )
        return seq

    async def ack_all(
        self,
        key: str,
        versions: Iterable[int],
        status: AckStatus,
        *,
        started: float,
        digests: Mapping[int, str] | None = None,
        hooks: Sequence[HookResult] = (),
        event_id: str | None = None,
        error: str | None = None,
    ) -> set[int]:
        """:meth:`ack` each version (``digests`` by version, where known); return the versions."""
        done = set()
        for version in versions:
            await self.ack(
                key,
                version,
                status,
                started=started,
                digest=(digests or {}).get(version),
                hooks=hooks,
                event_id=event_id,
                error=error,
            )
            done.add(version)
        return done


class AckPublisher:
    """``await publisher.run()`` in the agent's task group; ``wakeup()`` after queueing an ack."""

    def __init__(
        self,
        state: AgentState,
        *,
        bootstrap: str,
        topic: str,
        backoff: Backoff,
        client_id: str,
        request_timeout_ms: int = 15000,
        delivery_timeout_s: float = 20.0,
    ) -> None:
        self._state = state
        self._bootstrap = bootstrap
        self._topic = topic
        self._backoff = backoff
        self._client_id = client_id
        self._request_timeout_ms = request_timeout_ms
        self._delivery_timeout_s = delivery_timeout_s
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self.published = 0

    def wakeup(self) -> None:
        """Say that the queue has new acks."""
        self._drained.clear()
        self._wake.set()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait (bounded) until the queue is empty; False on timeout."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Publish queued acks forever; Kafka failures back off and retry, never drop."""
        producer: AIOKafkaProducer | None = None
        try:
            while True:
                self._wake.clear()
                batch = await self._state.pending_acks(BATCH)
                if not batch:
                    self._drained.set()
                    await self._wake.wait()
                    continue
                try:
                    if producer is None:
                        producer = await self._start_producer()
                    futures = [
                        await producer.send(
                            self._topic,
                            ack.message.value,
                            key=ack.message.key,
                            headers=list(ack.message.headers),
                        )
                        for ack in batch
                    ]
                    errors = await wait_delivered(futures, self._delivery_timeout_s)
                    failed = next((e for e in errors if e is not None), None)
                    if failed is not None:
                        raise failed
                except (KafkaError, OSError) as exc:
                    delay = self._backoff.next()
                    log.warning(
                        "publishing %d ack(s) to %s failed (%s: %s); retrying in %.1f s",
                        len(batch),
                        self._topic,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    if producer is not None:
                        await abort_producer(producer)  # stop() waits for Kafka to return
                        producer = None
                    await asyncio.sleep(delay)
                    continue
                await self._state.delete_acks(a.seq for a in batch)
                self._backoff.reset()
                self.published += len(batch)
                log.debug("published %d ack(s) up to seq %d", len(batch), batch[-1].seq)
                if len(batch) < BATCH and not self._wake.is_set():
                    # Every ack is queued through wakeup(): none came since the read, so the
                    # queue is empty without asking the DB again.
                    self._drained.set()
                    await self._wake.wait()
        finally:
            if producer is not None:
                await abort_producer(producer)  # unconfirmed acks stay queued in the state DB

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=self._request_timeout_ms,
            max_request_size=max(1 << 20, 2 * MAX_MESSAGE_BYTES),
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(KafkaError, OSError):
                await producer.stop()
            raise
        return producer
