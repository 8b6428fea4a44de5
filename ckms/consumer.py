"""React to ckms events from your own service: verified, typed, in order, each once.

::

    from ckms.consumer import Subscriber

    async with Subscriber(
        bootstrap="kafka:9093",
        security=KafkaSecurity(                 # mutual TLS: the ckms CA, your certificate
            ca_file="/etc/mysvc/ckms-ca.pem",   # (CN=mysvc,OU=ckms-subscriber: read events only)
            cert_file="/etc/mysvc/kafka.pem",
            key_file="/etc/mysvc/kafka.key",
        ),
        trust=controller_public_key,            # raw Ed25519 key, pinned out of band
        types={"key.revoked"},
        offsets="/var/lib/mysvc/ckms-offsets.json",
    ) as sub:
        async for event in sub:
            drop_sessions_using(event.data.key, event.data.version)

The subscriber assigns itself every partition of the topic (no consumer group, so any number of
services can listen without coordinating), verifies each record's signature on the raw bytes,
parses it into typed models, and drops — with a log line naming why — anything unsigned, forged,
tampered, malformed, of an unknown version, oversized, or replayed (a ``seq`` not newer than the
last one applied on its partition; the controller's ``seq`` grows in commit order and one key's
events share a partition). ``min_seq`` drops every event at or below it on all partitions: an
agent passes the ``seq`` it was given at enrollment, so nothing older than itself is applied.

Delivery is at least once across crashes and exactly once otherwise: an event counts as handled
when the loop asks for the next one, or when the ``async with`` block exits without an
exception. Positions (next offset and last ``seq`` per partition) are saved to the offset store
after each fetched batch and on exit; after a crash, the events since the last save come again.

The hosts' acknowledgements are on their own topic, signed by the controller like every event:
``Subscriber(topic=FLEET_TOPIC, types={"fleet.acked"}, ...)`` yields
:class:`~ckms.protocol.FleetAcked` events (which host holds which version of a key, with the
host's own times), under the same rules and the same pinned key.

The rules are specified for consumers in any language in ``docs/events.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from ckms._aio import stop_if_cancelled
from ckms._kafka import kafka_errors, partitions_of
from ckms._kafka_security import KafkaLink, KafkaProtocol, KafkaSecurity
from ckms.errors import ConfigError, KafkaUnavailableError, StoreError
from ckms.protocol import (
    EVENTS_TOPIC,
    MAX_MESSAGE_BYTES,
    Envelope,
    EventType,
    MessageRejected,
    ReplayGuard,
    trust_keys,
    verify_message,
)

__all__ = [
    "Envelope",
    "FileOffsetStore",
    "KafkaProtocol",
    "KafkaSecurity",
    "MemoryOffsetStore",
    "OffsetStore",
    "Position",
    "Subscriber",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a partition stands: the next offset to read and the last ``seq`` applied."""

    offset: int
    last_seq: int | None = None


class OffsetStore(Protocol):
    """Keeps a subscriber's positions between runs (a file by default; bring your own DB)."""

    async def load(self, topic: str) -> dict[int, Position]:
        """Return the saved positions of ``topic`` by partition (empty when none)."""
        ...

    async def save(self, topic: str, positions: Mapping[int, Position]) -> None:
        """Durably save the positions of ``topic``."""
        ...


class MemoryOffsetStore:
    """Positions kept in memory only: a restart reads from ``start`` again."""

    def __init__(self) -> None:
        self._data: dict[str, dict[int, Position]] = {}

    async def load(self, topic: str) -> dict[int, Position]:
        """Return the positions saved in this process."""
        return dict(self._data.get(topic, {}))

    async def save(self, topic: str, positions: Mapping[int, Position]) -> None:
        """Keep the positions in memory."""
        self._data[topic] = dict(positions)


class FileOffsetStore:
    """Positions in a small JSON file, replaced atomically (temp file, fsync, rename)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, dict[str, dict[str, int | None]]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"offset file {self.path} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"offset file {self.path} is not a JSON object")
        return data

    async def load(self, topic: str) -> dict[int, Position]:
        """Return the positions saved in the file for ``topic``."""
        return self.load_sync(topic)

    def load_sync(self, topic: str) -> dict[int, Position]:
        """Synchronous :meth:`load`, for tools and tests."""
        raw = self._read().get(topic, {})
        try:
            return {
                int(p): Position(int(v["offset"] or 0), v.get("last_seq")) for p, v in raw.items()
            }
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise StoreError(f"offset file {self.path} has a bad entry for {topic}") from exc

    async def save(self, topic: str, positions: Mapping[int, Position]) -> None:
        """Rewrite the file with the new positions of ``topic`` (off the event loop)."""
        await asyncio.to_thread(self._save_sync, topic, dict(positions))

    def _save_sync(self, topic: str, positions: Mapping[int, Position]) -> None:
        data = self._read()
        data[topic] = {
            str(p): {"offset": pos.offset, "last_seq": pos.last_seq}
            for p, pos in sorted(positions.items())
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreError(f"cannot save offsets to {self.path}: {exc}") from exc


def _trust_map(trust: bytes | Iterable[bytes] | Mapping[str, bytes]) -> dict[str, bytes]:
    if isinstance(trust, Mapping):
        return dict(trust)
    if isinstance(trust, bytes | bytearray):
        return trust_keys([bytes(trust)])
    return trust_keys(trust)


class Subscriber:
    """An async iterator of verified ckms events from one topic (see the module docstring).

    ``stats`` counts delivered events and dropped ones by reason, for metrics.

    ``fetch_max_wait_ms`` is the long poll: idle cost, not latency, as a new event ends it at
    once — on a one-partition topic (the controller's default). With several partitions, the
    Kafka client fetches a broker with one request at a time and leaves a partition out of the
    next request while its last records are being handled; an event arriving there meanwhile
    waits for that request's long poll to end. Keep the poll short on such topics.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        security: KafkaSecurity,
        trust: bytes | Iterable[bytes] | Mapping[str, bytes],
        types: Iterable[EventType | str] | None = None,
        topic: str = EVENTS_TOPIC,
        offsets: OffsetStore | str | os.PathLike[str] | None = None,
        start: Literal["earliest", "latest"] = "earliest",
        poll_ms: int = 1000,
        fetch_max_wait_ms: int = 500,
        client_id: str = "ckms-subscriber",
        min_seq: int = 0,
    ) -> None:
        self._trust = _trust_map(trust)
        if not self._trust:
            raise ConfigError("Subscriber needs at least one trusted controller key")
        try:
            self._types = None if types is None else {EventType(t) for t in types}
        except ValueError as exc:
            raise ConfigError(f"unknown event type in types: {exc}") from None
        if start not in ("earliest", "latest"):
            raise ConfigError("start must be 'earliest' or 'latest'")
        if not isinstance(security, KafkaSecurity):
            raise ConfigError("security must be a KafkaSecurity (CA bundle, certificate, key)")
        self._kafka = KafkaLink(bootstrap, security)
        self._topic = topic
        if offsets is None:
            self._offsets: OffsetStore = MemoryOffsetStore()
        elif isinstance(offsets, str | os.PathLike):
            self._offsets = FileOffsetStore(offsets)
        else:
            self._offsets = offsets
        self._start = start
        self._poll_ms = poll_ms
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._client_id = client_id
        self._min_seq = min_seq
        self._consumer: AIOKafkaConsumer | None = None
        self._buffer: deque[ConsumerRecord[bytes, bytes]] = deque()
        self._positions: dict[int, Position] = {}
        self._guard = ReplayGuard()
        self._pending: tuple[int, int, int] | None = None  # partition, offset, seq
        self._dirty = False
        self.stats: dict[str, int] = {"delivered": 0}

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._settle_pending()
        await self.aclose()

    async def start(self) -> None:
        """Connect, assign every partition, and seek to the saved positions."""
        if self._consumer is not None:
            return
        if self._kafka.security.protocol is KafkaProtocol.PLAINTEXT:
            log.warning("subscribing to %s over PLAINTEXT Kafka (development only)", self._topic)
        consumer = AIOKafkaConsumer(
            **self._kafka.client_args(),
            client_id=self._client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset=self._start,
            # The controller publishes in Kafka transactions (a new leader fences the old one's
            # producer): records of an aborted one are never events.
            isolation_level="read_committed",
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            # A long poll is a request in flight: its timeout must outlast the wait.
            request_timeout_ms=max(40_000, self._fetch_max_wait_ms + 10_000),
            # aiokafka's fetch task re-checks every 200 ms by default even while a long poll is
            # in flight. Nothing needs that timer: its loop also waits on the fetch in flight,
            # records being consumed, seeks, assignment and metadata changes, so the timer
            # only bounds a missed wake-up. Idle cost: 5 wake-ups per second → one per poll.
            consumer_timeout_ms=self._fetch_max_wait_ms + 10_000,
            # Larger than the message bound, so an oversized record is fetched and dropped
            # instead of blocking its partition.
            max_partition_fetch_bytes=max(1 << 20, 2 * MAX_MESSAGE_BYTES),
        )
        try:
            with kafka_errors(f"cannot subscribe to {self._topic}"):
                await consumer.start()
            partitions = await partitions_of(self._kafka, self._topic)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        saved = await self._offsets.load(self._topic)
        tps = [TopicPartition(self._topic, p) for p in partitions]
        consumer.assign(tps)
        for tp in tps:
            position = saved.get(tp.partition)
            if position is not None:
                consumer.seek(tp, position.offset)
                self._positions[tp.partition] = position
                if position.last_seq is not None:
                    self._guard.accept(str(tp.partition), position.last_seq)
            elif self._start == "earliest":
                await consumer.seek_to_beginning(tp)
            else:
                await consumer.seek_to_end(tp)
            if self._min_seq:
                # ``seq`` is controller-wide, so one floor holds on every partition.
                self._guard.accept(str(tp.partition), self._min_seq)
        log.info("subscribed to %s partitions=%s", self._topic, partitions)

    async def aclose(self) -> None:
        """Save positions and disconnect; safe to call twice."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await self._save()
        finally:
            await consumer.stop()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        if self._consumer is None:
            raise KafkaUnavailableError("Subscriber is not started (use `async with`)")
        self._settle_pending()
        while True:
            while self._buffer:
                record = self._buffer.popleft()
                event = self._accept(record)
                if event is not None:
                    return event
            await self._save()
            with kafka_errors(f"reading {self._topic} failed"):
                batches = await self._consumer.getmany(timeout_ms=self._poll_ms)
            stop_if_cancelled()
            for tp in sorted(batches, key=lambda t: t.partition):
                self._buffer.extend(batches[tp])

    def _accept(self, record: ConsumerRecord[bytes, bytes]) -> Envelope | None:
        """Verify one record; return it if the caller wants it, else advance past it."""
        partition = record.partition
        try:
            event = verify_message(record.value, record.headers, self._trust)
            self._guard.check(str(partition), event.seq)
        except MessageRejected as exc:
            self.stats[exc.reason] = self.stats.get(exc.reason, 0) + 1
            log.warning(
                "dropped event topic=%s partition=%d offset=%d reason=%s: %s",
                record.topic,
                partition,
                record.offset,
                exc.reason,
                exc,
            )
            self._advance(partition, record.offset, None)
            return None
        if self._types is not None and event.type not in self._types:
            self._advance(partition, record.offset, event.seq)
            return None
        self._pending = (partition, record.offset, event.seq)
        self.stats["delivered"] += 1
        return event

    def _settle_pending(self) -> None:
        if self._pending is not None:
            partition, offset, seq = self._pending
            self._pending = None
            self._advance(partition, offset, seq)

    def _advance(self, partition: int, offset: int, seq: int | None) -> None:
        if seq is not None:
            self._guard.accept(str(partition), seq)
        last = self._guard.last(str(partition))
        self._positions[partition] = Position(offset + 1, last)
        self._dirty = True

    async def _save(self) -> None:
        if self._dirty:
            self._dirty = False
            await self._offsets.save(self._topic, dict(self._positions))
