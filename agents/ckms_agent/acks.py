"""Acks: signed and queued in the state DB first, then published to Kafka, in order, at least once.

:class:`AckWriter` signs an ack with the agent's identity key and writes it to the state DB
(:meth:`AgentState.enqueue_ack`, which also takes the next ack ``seq``), so neither a Kafka
outage nor a restart loses it. :class:`AckPublisher` drains that queue in ``seq`` order with an
idempotent producer (``acks=all``; partition key = the agent id, so one agent's acks stay in
order) and deletes rows only after the broker confirmed them (the relay loop of
:mod:`ckms._kafka`, shared with the controller's outbox). A crash between the two sends an
ack twice; the controller can key acks by (agent, seq), so a duplicate is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

from ckms._backoff import Backoff
from ckms._kafka import Outgoing, ProducerSettings, Relay
from ckms._kafka_security import KafkaLink
from ckms.errors import StoreError
from ckms.protocol import MAX_MESSAGE_BYTES, Ack, AckStatus, EventType, HookResult, encode_event
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
        cert_serial: str | None = None,
        cert_not_after: str | None = None,
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
            cert_serial=cert_serial,
            cert_not_after=cert_not_after,
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


class _AckQueue:
    """The state DB's pending acks as a relay's queue."""

    def __init__(self, state: AgentState) -> None:
        self._state = state

    async def pending(self, limit: int) -> Sequence[Outgoing]:
        return [
            Outgoing(a.seq, a.message.value, a.message.key, tuple(a.message.headers))
            for a in await self._state.pending_acks(limit)
        ]

    async def confirmed(self, idents: Sequence[int]) -> None:
        await self._state.delete_acks(idents)


class AckPublisher(Relay):
    """``await publisher.run()`` in the agent's task group; ``wakeup()`` after queueing an ack.

    The relay of :mod:`ckms._kafka` over the state DB's queue: unconfirmed acks stay queued
    across Kafka outages and restarts, and are sent again in ``seq`` order.
    """

    def __init__(
        self,
        state: AgentState,
        *,
        kafka: KafkaLink,
        topic: str,
        backoff: Backoff,
        client_id: str,
        request_timeout_ms: int = 15000,
        delivery_timeout_s: float = 20.0,
    ) -> None:
        super().__init__(
            _AckQueue(state),
            kafka=kafka,
            topic=topic,
            producer=ProducerSettings(
                client_id=client_id,
                request_timeout_ms=request_timeout_ms,
                max_request_size=max(1 << 20, 2 * MAX_MESSAGE_BYTES),
            ),
            backoff=backoff,
            batch_size=BATCH,
            delivery_timeout_s=delivery_timeout_s,
            fatal=(StoreError,),  # the state DB failing stops the agent, as everywhere else
        )

    def wakeup(self) -> None:
        """Say that the queue has new acks."""
        self.wake()

    @property
    def published(self) -> int:
        """How many acks the broker confirmed since start."""
        return self.stats.published
