"""The ack consumer: verifies signed acks from ``ckms.acks`` and applies them to the fleet view.

The consumer assigns itself every partition of the acks topic (no consumer group), verifies
each ack against the enrolled identity key of the agent that claims it, refuses acks for another
agent, replays (an ack ``seq`` not newer than the agent's last) and anything malformed, and
applies each fetched batch in **one** transaction: fleet rows, the hosts' last ack seq, one audit
record per ack and the consumer's Kafka positions. A crash therefore never applies an ack twice
nor loses one. What the rows mean is :mod:`ckms.controller.fleet`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from ckms._aio import stop_if_cancelled
from ckms._backoff import Backoff
from ckms._kafka import TopicSpec, ensure_topics, kafka_errors, partitions_of
from ckms._kafka_security import KafkaLink
from ckms.controller.hosts import HostRegistry
from ckms.errors import CKMSError
from ckms.protocol import (
    KEY_ID_HEADER,
    MAX_MESSAGE_BYTES,
    Ack,
    Envelope,
    EventType,
    MessageRejected,
    ReplayedEvent,
    UnknownSigner,
    verify_message,
)
from ckms.store import Clock, Store, Transaction, format_time, parse_time, utc_now
from ckms.store import audit as audit_log

log = logging.getLogger(__name__)


@dataclass
class AckStats:
    """What the ack consumer did."""

    applied: int = 0
    dropped: dict[str, int] | None = None

    def drop(self, reason: str) -> None:
        """Count one dropped ack."""
        if self.dropped is None:
            self.dropped = {}
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class AckConsumer:
    """``run()`` applies acks to the fleet view until cancelled."""

    def __init__(
        self,
        store: Store,
        hosts: HostRegistry,
        *,
        kafka: KafkaLink,
        topic: str,
        topics: list[TopicSpec],
        clock: Clock = utc_now,
        poll_ms: int = 500,
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._kafka = kafka
        self._topic = topic
        self._topics = topics
        self._clock = clock
        self._poll_ms = poll_ms
        self._signers: dict[str, tuple[str, bytes]] = {}
        self._signers_generation = -1
        self.stats = AckStats()
        self.applied = asyncio.Condition()
        self.on_latency: Callable[[float], None] | None = None
        """Called once per applied ack that answers an event, with commit → ack seconds."""
        self.on_applied: Callable[[], None] | None = None
        """Called after every committed batch that applied an ack (the rollout driver wakes)."""

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff while Kafka is away."""
        backoff = Backoff(0.5, 10.0)
        while True:
            stop_if_cancelled()
            try:
                with kafka_errors("consuming acks"):
                    await self._consume()
            except CKMSError as exc:
                delay = backoff.next()
                log.warning("ack consumer stopped (%s); restarting in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _consume(self) -> None:
        await ensure_topics(self._kafka, self._topics)
        partitions = await partitions_of(self._kafka, self._topic)
        consumer = AIOKafkaConsumer(
            **self._kafka.client_args(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._poll_ms,
            max_partition_fetch_bytes=max(1 << 20, 2 * MAX_MESSAGE_BYTES),
            client_id="ckms-controller-acks",
        )
        await consumer.start()
        try:
            tps = [TopicPartition(self._topic, p) for p in partitions]
            consumer.assign(tps)
            rows = await self._store.fetchall(
                "SELECT partition, next_offset FROM consumer_positions WHERE topic = ?",
                (self._topic,),
            )
            saved = {int(r["partition"]): int(r["next_offset"]) for r in rows}
            for tp in tps:
                if tp.partition in saved:
                    consumer.seek(tp, saved[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            while True:
                batches = await consumer.getmany(timeout_ms=self._poll_ms, max_records=1000)
                stop_if_cancelled()
                records = [
                    r for tp in sorted(batches, key=lambda t: t.partition) for r in batches[tp]
                ]
                if records:
                    await self.apply(records)
        finally:
            with contextlib.suppress(CKMSError), kafka_errors("stopping the ack consumer"):
                await consumer.stop()

    async def _verify(self, record: ConsumerRecord[bytes, bytes]) -> tuple[str, Envelope]:
        kid = next(
            (
                bytes(v).decode("ascii", "replace")
                for k, v in record.headers or ()
                if k == KEY_ID_HEADER
            ),
            "",
        )
        # Reloaded only when a commit changed a host (enroll, revoke): an ack from an unknown
        # key costs no query, so junk on the topic cannot make the controller re-read the hosts
        # table per record, and a host revoked since is dropped from the map at once.
        generation = await self._store.generation("hosts")
        if generation != self._signers_generation:
            self._signers = await self._hosts.signer_map()
            self._signers_generation = generation
        entry = self._signers.get(kid)
        if entry is None:
            raise UnknownSigner(f"ack signer {kid[:40]!r} is not an enrolled host")
        host_id, public = entry
        envelope = verify_message(
            record.value, record.headers, {kid: public}, types={EventType.ACK}
        )
        assert isinstance(envelope.data, Ack)
        if envelope.data.agent != host_id:
            raise UnknownSigner(
                f"ack signed by host {host_id} claims to come from {envelope.data.agent}"
            )
        return host_id, envelope

    async def apply(self, records: list[ConsumerRecord[bytes, bytes]]) -> int:
        """Verify and apply a batch of ack records in one transaction; return how many applied."""
        checked: list[tuple[ConsumerRecord[bytes, bytes], str | None, Envelope | None]] = []
        for record in records:
            try:
                host_id, envelope = await self._verify(record)
                checked.append((record, host_id, envelope))
            except MessageRejected as exc:
                self.stats.drop(exc.reason)
                log.warning(
                    "dropped ack partition=%d offset=%d reason=%s: %s",
                    record.partition,
                    record.offset,
                    exc.reason,
                    exc,
                )
                checked.append((record, None, None))
        now = self._clock()
        applied = 0
        hosts = sorted({host_id for _, host_id, _ in checked if host_id is not None})
        async with self._store.write() as tx:
            # One query per batch for what every ack needs, not one per ack (the writer is the
            # controller's busiest path during a rotation).
            last_seq: dict[str, int | None] = {}
            for chunk in _chunks(hosts, 500):
                marks = ", ".join("?" * len(chunk))
                for row in await tx.fetchall(
                    f"SELECT id, last_ack_seq FROM hosts WHERE id IN ({marks})",  # noqa: S608
                    chunk,
                ):
                    last_seq[row["id"]] = row["last_ack_seq"]
            lookups = _BatchLookups(tx)
            latencies: list[float] = []
            positions: dict[int, int] = {}
            seen: dict[str, int] = {}
            for record, host_id, envelope in checked:
                positions[record.partition] = record.offset + 1
                if host_id is None or envelope is None:
                    continue
                previous = last_seq.get(host_id)
                if previous is not None and envelope.seq <= previous:
                    exc = ReplayedEvent(
                        f"ack seq {envelope.seq} of {host_id} is not newer than {previous}"
                    )
                    self.stats.drop(exc.reason)
                    log.warning("dropped ack from %s reason=%s: %s", host_id, exc.reason, exc)
                    continue
                if await self._apply_one(tx, lookups, host_id, envelope, now, latencies):
                    applied += 1
                last_seq[host_id] = seen[host_id] = envelope.seq
            stamp = format_time(now)
            await tx.executemany(
                "UPDATE hosts SET last_ack_seq = ?, last_seen_at = ? WHERE id = ?",
                [(seq, stamp, host_id) for host_id, seq in seen.items()],
            )
            await tx.executemany(
                "INSERT INTO consumer_positions(topic, partition, next_offset) "
                "VALUES (?, ?, ?) ON CONFLICT(topic, partition) "
                "DO UPDATE SET next_offset = excluded.next_offset",
                [(self._topic, partition, offset) for partition, offset in positions.items()],
            )
        self.stats.applied += applied
        if self.on_latency is not None:
            for seconds in latencies:  # after the commit: only acks that were kept count
                self.on_latency(seconds)
        if applied and self.on_applied is not None:
            self.on_applied()
        async with self.applied:
            self.applied.notify_all()
        return applied

    async def _apply_one(
        self,
        tx: Transaction,
        lookups: _BatchLookups,
        host_id: str,
        envelope: Envelope,
        now: datetime,
        latencies: list[float],
    ) -> bool:
        ack = envelope.data
        assert isinstance(ack, Ack)
        key_id = await lookups.key_id(ack.key)
        if key_id is None:
            log.warning(
                "ack from %s names unknown key %s; recorded in audit only", host_id, ack.key
            )
        latency_ms = None
        if ack.event_id:
            created = await lookups.event_created(ack.event_id)
            if created is not None:
                latency_ms = (now - created).total_seconds() * 1000
                if key_id is not None:
                    latencies.append(latency_ms / 1000)
        if key_id is not None:
            await tx.execute(
                "INSERT INTO fleet_state(host_id, key_id, version, status, digest, event_id, "
                "updated_at, latency_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(host_id, key_id, version) DO UPDATE SET status = excluded.status, "
                "digest = excluded.digest, event_id = excluded.event_id, "
                "updated_at = excluded.updated_at, latency_ms = excluded.latency_ms, "
                "error = excluded.error",
                (
                    host_id,
                    key_id,
                    ack.version,
                    str(ack.status),
                    ack.digest,
                    ack.event_id,
                    format_time(now),
                    latency_ms,
                    ack.error if str(ack.status) == "failed" else None,
                ),
            )
            if ack.cert_serial is not None and str(ack.status) == "installed":
                # The host installed a certificate issued to it (the fleet view's column).
                await tx.execute(
                    "UPDATE certificates SET installed_at = ? WHERE serial = ? AND host_id = ? "
                    "AND key_id = ?",
                    (format_time(now), ack.cert_serial, host_id, key_id),
                )
        details: dict[str, object] = {}
        if ack.cert_serial is not None:
            details = {"cert_serial": ack.cert_serial, "cert_not_after": ack.cert_not_after}
        await audit_log.append(
            tx,
            now=now,
            actor=f"host:{host_id}",
            action="fleet.ack",
            object=f"key:{ack.key}",
            outcome="ok" if str(ack.status) != "failed" else "failed",
            details={
                "version": ack.version,
                "status": str(ack.status),
                "event_id": ack.event_id,
                "ack_id": envelope.id,
                "ack_seq": envelope.seq,
                "acked_at": envelope.at,
                "elapsed_ms": ack.elapsed_ms,
                "hooks": [h.model_dump() for h in ack.hooks],
                "error": ack.error,
                **details,
            },
        )
        return key_id is not None


class _BatchLookups:
    """Key ids and event times, each read once per ack batch (acks of a rotation share them)."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx
        self._keys: dict[str, str | None] = {}
        self._events: dict[str, datetime | None] = {}

    async def key_id(self, name: str) -> str | None:
        if name not in self._keys:
            row = await self._tx.fetchone("SELECT id FROM keys WHERE name = ?", (name,))
            self._keys[name] = None if row is None else row["id"]
        return self._keys[name]

    async def event_created(self, event_id: str) -> datetime | None:
        if event_id not in self._events:
            created = await self._tx.fetchval(
                "SELECT created_at FROM outbox WHERE event_id = ?", (event_id,)
            )
            self._events[event_id] = None if created is None else parse_time(created)
        return self._events[event_id]


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
