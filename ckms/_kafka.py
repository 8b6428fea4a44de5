"""The one Kafka boundary of ckms: topics, the relay loop, consumers' error mapping.

aiokafka errors are translated into :class:`~ckms.errors.KafkaUnavailableError` here, where they
enter ckms (:func:`kafka_errors`), so callers never match on aiokafka's types.

:class:`Relay` is the one loop that moves a durable queue to a topic: the controller's outbox
(signed events) and an agent's pending acks. It reads a batch in order, sends it with an
idempotent producer (``acks=all``), tells the queue which prefix the broker confirmed (the rest
goes again, in order), and on any failure closes the producer and retries after a jittered
:class:`~ckms._backoff.Backoff`. Every step that waits for Kafka is bounded, so an outage is
counted in :class:`RelayStats` within a bound, however aiokafka retries underneath. A crash
between the broker's confirmation and the queue's deletion sends a message twice; readers drop
the duplicate by ``seq``.

A relay given a ``transactional_id`` (the outbox of controller replicas) sends each batch in
one Kafka transaction instead. Every replica uses the same id, so the producer a new leader
starts fences every older one (Kafka bumps the id's epoch, aborts its open transaction and
refuses its commits), and the queue's hooks (:class:`TransactionalSource`) check leadership
before a producer starts and before each commit, and learn what the topic already holds
after a producer started (a batch committed by a leader that died before marking it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from ckms._aio import stop_if_cancelled, wait_event
from ckms._backoff import Backoff
from ckms._kafka_security import KafkaLink
from ckms.errors import CKMSError, KafkaUnavailableError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def kafka_errors(what: str) -> Iterator[None]:
    """Raise :class:`KafkaUnavailableError` naming ``what`` for any aiokafka or socket error."""
    try:
        yield
    except KafkaError as exc:
        raise KafkaUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise KafkaUnavailableError(f"{what}: {exc}") from exc


@contextlib.asynccontextmanager
async def kafka_within(what: str, timeout_s: float) -> AsyncIterator[None]:
    """:func:`kafka_errors`, and :class:`KafkaUnavailableError` if the block takes longer than
    ``timeout_s``: aiokafka retries some requests for as long as no broker answers (a producer
    id, a transaction coordinator), so callers that must notice an outage bound each step."""
    try:
        async with asyncio.timeout(timeout_s):
            with kafka_errors(what):
                yield
    except TimeoutError:
        raise KafkaUnavailableError(
            f"{what}: Kafka did not answer within {timeout_s:.0f} s"
        ) from None


@dataclass(frozen=True)
class TopicSpec:
    """A topic ckms needs, with its partition count and replication factor."""

    name: str
    partitions: int = 6
    replication: int = 1
    config: tuple[tuple[str, str], ...] = ()


async def ensure_topics(kafka: KafkaLink, topics: Iterable[TopicSpec]) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are (idempotent)."""
    specs = list(topics)
    bootstrap = kafka.bootstrap
    admin = AIOKafkaAdminClient(**kafka.client_args(request_timeout_ms=15000))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return
        response = await admin.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=s.replication,
                    topic_configs=dict(s.config),
                )
                for s in missing
            ]
        )
        for name, code, *_rest in getattr(response, "topic_errors", ()):
            if code not in (0, TopicAlreadyExistsError.errno):
                raise KafkaUnavailableError(f"creating topic {name} failed with Kafka error {code}")
        log.info("created topics %s", ", ".join(s.name for s in missing))
    except TopicAlreadyExistsError:
        return
    except KafkaError as exc:
        raise KafkaUnavailableError(f"Kafka at {bootstrap} refused topic setup: {exc}") from exc
    except OSError as exc:
        raise KafkaUnavailableError(f"Kafka at {bootstrap} is unreachable: {exc}") from exc
    finally:
        await admin.close()


async def partitions_of(kafka: KafkaLink, topic: str, wait_s: float = 30.0) -> list[int]:
    """The partition ids of ``topic``, waiting (bounded) for metadata to name it.

    A topic the client may not describe (no ACL) looks like one that does not exist.
    """
    bootstrap = kafka.bootstrap
    client = AIOKafkaClient(**kafka.client_args(request_timeout_ms=10000))
    deadline = time.monotonic() + wait_s
    try:
        await client.bootstrap()
        while True:
            cluster = await client.fetch_all_metadata()
            parts = cluster.partitions_for_topic(topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(f"topic {topic} does not exist or has no partitions")
            await asyncio.sleep(0.2)
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot read Kafka metadata from {bootstrap}: {exc}") from exc
    finally:
        await client.close()


async def wait_delivered(
    futures: Sequence[asyncio.Future[Any]], timeout_s: float
) -> list[BaseException | None]:
    """Wait (bounded) for produce futures; for each, None once Kafka confirmed it, else why not.

    aiokafka never fails a message whose partition leader is known but unreachable, so while
    every broker is down its futures stay pending for as long as the outage lasts: without a
    bound, a publisher would neither report the outage nor back off.
    """
    if futures:
        await asyncio.wait(futures, timeout=timeout_s)
    out: list[BaseException | None] = []
    for future in futures:
        if not future.done():
            # Failed later by abort_producer; consume that so it is not logged as unretrieved.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            out.append(KafkaTimeoutError(f"Kafka did not confirm within {timeout_s:.0f} s"))
        elif future.cancelled():
            out.append(KafkaTimeoutError("the send was cancelled"))
        else:
            out.append(future.exception())
    return out


ABORT_WAIT_S = 5.0
"""How long discarding a producer may take before it is left to itself (:func:`abort_producer`)."""


async def abort_producer(producer: AIOKafkaProducer, wait_s: float = ABORT_WAIT_S) -> None:
    """Stop ``producer`` at once, failing the messages Kafka has not confirmed yet.

    ``AIOKafkaProducer.stop()`` first waits for every queued message to be delivered, which
    never happens while all brokers are down: a controller or agent could not even stop
    (SIGTERM) during an outage. Callers keep what was not confirmed and send it again later
    (consumers drop the duplicates by ``seq``). A transaction left open is aborted by Kafka when
    the next producer with its transactional id starts. Bounded by about ``wait_s``; never
    raises (but for a cancel); safe to call twice.
    """
    # aiokafka has no public abort. Stop its sender first, then fail what is still queued, so
    # that stop()'s flush has nothing left to wait for; failing batches under a running sender
    # races it.
    sender = getattr(producer, "_sender", None)
    accumulator = getattr(producer, "_message_accumulator", None)
    try:
        async with asyncio.timeout(wait_s):
            if sender is not None and accumulator is not None:
                await _cancel_sender(sender)
                accumulator.fail_all(KafkaTimeoutError("stopped before Kafka confirmed"))
            await producer.stop()
    except TimeoutError:
        log.warning("a Kafka producer did not stop within %.0f s; left to itself", wait_s)
    except (KafkaError, OSError):
        pass
    except Exception:  # discarding a producer must not stop the loop that discards it
        log.warning("stopping a Kafka producer failed", exc_info=True)
    finally:
        _retrieve_fatal_error(producer)


def _retrieve_fatal_error(producer: AIOKafkaProducer) -> None:
    """Take the error a transactional producer failed with (fenced by a newer producer of its
    id) from the future aiokafka keeps it in and nobody awaits once the producer is dropped:
    left there, it is logged as never retrieved when collected, from inside whatever code the
    collection interrupted."""
    waiter = getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None)
    if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
        waiter.exception()


async def _cancel_sender(sender: object) -> None:
    """Cancel aiokafka's sender loop and every request task it has in flight, and wait for them.

    Its own ``close()`` cancels the loop, which then awaits its requests in flight; and a
    transactional request (adding a partition to the transaction, committing it) first looks
    for the transaction coordinator, retrying for as long as no broker answers. So while Kafka
    was down a publisher never got past closing its producer: it neither counted the failure
    nor tried again. The tasks are those whose coroutine is a method of ``sender``.
    """
    tasks = []
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is not None and frame.f_locals.get("self") is sender:
            tasks.append(task)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a request that failed meanwhile is not logged


@dataclass(frozen=True)
class Outgoing:
    """One message of a relayed queue; ``ident`` is what the queue confirms it by, ``topic``
    where it goes when not the relay's own topic."""

    ident: int
    value: bytes
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    topic: str | None = None


class RelaySource(Protocol):
    """A durable queue a :class:`Relay` drains, oldest first."""

    async def pending(self, limit: int) -> Sequence[Outgoing]:
        """Up to ``limit`` unconfirmed messages, in the order they must be sent."""
        ...

    async def confirmed(self, idents: Sequence[int]) -> None:
        """The broker stored these (a prefix of the last batch): drop or mark them."""
        ...


class TransactionalSource(RelaySource, Protocol):
    """A queue relayed in Kafka transactions (see the module docstring)."""

    async def may_send(self) -> None:
        """Raise (a CKMSError) unless this process may still publish the queue: called before
        a producer starts and before each transaction commits, after its messages are sent."""
        ...

    async def started(self, kafka: KafkaLink, topic: str) -> None:
        """A producer has just fenced every older one: what is on the topic now is final,
        so confirm the messages it already holds."""
        ...


@dataclass
class RelayStats:
    """What a relay did, for ``ckms status``, metrics and tests."""

    published: int = 0
    failures: int = 0
    last_error: str | None = None
    connected: bool = False


@dataclass(frozen=True)
class ProducerSettings:
    """How a relay's idempotent producer talks to Kafka."""

    client_id: str
    transactional_id: str | None = None
    """Send each batch in one transaction under this id (the source must be a
    :class:`TransactionalSource`); None: an idempotent producer without transactions."""
    linger_ms: int = 0
    request_timeout_ms: int = 15000
    max_request_size: int = 1 << 20


class Relay:
    """``await relay.run()`` drains ``source`` to ``topic`` until cancelled; ``wake()`` on news.

    ``poll_s`` is how long an idle relay waits before looking again without being woken (None:
    only when woken, for a queue every writer wakes). ``topics`` are created (idempotent) at the
    first turn, before anything is sent. Failures never stop the loop: they are counted in
    :attr:`stats`, logged, and retried after ``backoff`` with a new producer.

    Every step that waits for Kafka is bounded: ``delivery_timeout_s`` for creating the topics,
    starting a producer, sending a batch and having it confirmed (or committed), and
    ``start_timeout_s`` for a transactional source's :meth:`~TransactionalSource.started`.
    """

    def __init__(
        self,
        source: RelaySource,
        *,
        kafka: KafkaLink,
        topic: str,
        producer: ProducerSettings,
        backoff: Backoff,
        batch_size: int = 500,
        poll_s: float | None = None,
        delivery_timeout_s: float = 20.0,
        start_timeout_s: float = 60.0,
        topics: Sequence[TopicSpec] = (),
        fatal: tuple[type[CKMSError], ...] = (),
    ) -> None:
        self.source = source
        self.fatal = fatal
        """Errors that stop the relay instead of being retried (say, a broken local queue)."""
        self.kafka = kafka
        self.topic = topic
        self.producer = producer
        self.backoff = backoff
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.delivery_timeout_s = delivery_timeout_s
        self.start_timeout_s = start_timeout_s
        self.topics = tuple(topics)
        self._topics_made = not self.topics
        self.stats = RelayStats()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None

    def wake(self) -> None:
        """Say that the queue has new messages."""
        self._drained.clear()
        self._wake.set()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait (bounded) until the queue was found empty; False on timeout."""
        return await wait_event(self._drained, timeout_s)

    async def run(self) -> None:
        """Relay until cancelled; Kafka outages are waited out, never fatal."""
        try:
            while True:
                stop_if_cancelled()
                self._wake.clear()  # before reading: a write from now on wakes the wait below
                try:
                    sent = await self.publish_pending()
                except CKMSError as exc:
                    if isinstance(exc, self.fatal):
                        raise
                    await self._failed(exc)
                    continue
                self.backoff.reset()
                if sent < self.batch_size and not self._wake.is_set():
                    # Every writer wakes the relay: nothing came since the read, so the queue
                    # is drained without reading it again.
                    self._drained.set()
                    await wait_event(self._wake, self.poll_s)
        finally:
            await self._close_producer()

    async def publish_pending(self) -> int:
        """Send one batch and confirm the prefix the broker stored; return how many."""
        # At the first turn, not the first message: readers (agents, subscribers) wait for the
        # topics to exist, and they may start before anything is published.
        await self._ensure_topics()
        batch = await self.source.pending(self.batch_size)
        if not batch:
            return 0
        if self._producer is None and self.producer.transactional_id is not None:
            # A new producer first confirms what the topic already holds: read after it.
            await self._ensure_producer()
            batch = await self.source.pending(self.batch_size)
            if not batch:
                return 0
        producer = await self._ensure_producer()
        if self.producer.transactional_id is not None:
            return await self._publish_transaction(producer, batch)
        async with kafka_within(f"sending to {self.topic}", self.delivery_timeout_s):
            futures = [
                await producer.send(
                    m.topic or self.topic, m.value, key=m.key, headers=list(m.headers)
                )
                for m in batch
            ]
        results = await wait_delivered(futures, self.delivery_timeout_s)
        confirmed: list[int] = []
        error: BaseException | None = None
        for message, result in zip(batch, results, strict=True):
            if result is not None:
                error = result
                break  # only the prefix in queue order counts; the rest go again
            confirmed.append(message.ident)
        if confirmed:
            await self.source.confirmed(confirmed)
            self.stats.published += len(confirmed)
            log.debug(
                "relayed %d message(s) to %s up to %d", len(confirmed), self.topic, confirmed[-1]
            )
        if error is not None:
            raise KafkaUnavailableError(
                f"Kafka did not confirm {len(batch) - len(confirmed)} message(s) to "
                f"{self.topic}: {type(error).__name__}: {error}"
            ) from error
        return len(confirmed)

    async def _publish_transaction(
        self, producer: AIOKafkaProducer, batch: Sequence[Outgoing]
    ) -> int:
        """Send ``batch`` in one transaction: all of it is confirmed, or none.

        On any failure the producer is discarded with its transaction open: the next producer's
        start aborts it (or finds it committed, when only the answer was lost, and
        :meth:`~TransactionalSource.started` confirms it), so nothing goes out twice.
        """
        source: TransactionalSource = self.source  # type: ignore[assignment]
        committed = False
        try:
            async with kafka_within(f"sending to {self.topic}", self.delivery_timeout_s):
                await producer.begin_transaction()
                futures = [
                    await producer.send(
                        m.topic or self.topic, m.value, key=m.key, headers=list(m.headers)
                    )
                    for m in batch
                ]
            for error in await wait_delivered(futures, self.delivery_timeout_s):
                if error is not None:
                    raise KafkaUnavailableError(
                        f"Kafka did not take a transaction of {len(batch)} message(s) to "
                        f"{self.topic}: {type(error).__name__}: {error}"
                    ) from error
            # The last word before the commit: a leader that lost its lease meanwhile stops
            # here; one that loses it after this is fenced by the next leader's producer.
            await source.may_send()
            async with kafka_within(
                f"committing a transaction to {self.topic}", self.delivery_timeout_s
            ):
                await producer.commit_transaction()
            committed = True
        finally:
            if not committed:
                await self._close_producer()  # aborts: the next producer's start does
        idents = [m.ident for m in batch]
        await self.source.confirmed(idents)
        self.stats.published += len(idents)
        log.debug("relayed %d message(s) to %s up to %d", len(idents), self.topic, idents[-1])
        return len(idents)

    async def _failed(self, exc: CKMSError) -> None:
        self.stats.failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self.stats.connected = False
        delay = self.backoff.next()
        log.warning("relaying to %s failed (%s); retrying in %.1f s", self.topic, exc, delay)
        await self._close_producer()
        await asyncio.sleep(delay)

    async def _ensure_topics(self) -> None:
        if not self._topics_made:
            async with kafka_within(
                f"creating the topics of {self.topic}", self.delivery_timeout_s
            ):
                await ensure_topics(self.kafka, self.topics)
            self._topics_made = True

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        await self._ensure_topics()
        settings = self.producer
        transactional = settings.transactional_id is not None
        if transactional:
            await self.source.may_send()  # type: ignore[attr-defined]
        producer = AIOKafkaProducer(
            **self.kafka.client_args(),
            client_id=settings.client_id,
            acks="all",
            enable_idempotence=True,
            **({"transactional_id": settings.transactional_id} if transactional else {}),
            linger_ms=settings.linger_ms,
            request_timeout_ms=settings.request_timeout_ms,
            max_request_size=settings.max_request_size,
        )
        try:
            # A transactional producer's start waits for its producer id, from a transaction
            # coordinator it looks for for as long as none answers.
            async with kafka_within(
                f"connecting to Kafka at {self.kafka.bootstrap}", self.delivery_timeout_s
            ):
                await producer.start()
        except BaseException:
            await abort_producer(producer)
            raise
        self._producer = producer
        if transactional:
            try:
                async with kafka_within(
                    f"reading back what {self.topic} holds", self.start_timeout_s
                ):
                    await self.source.started(self.kafka, self.topic)  # type: ignore[attr-defined]
            except BaseException:
                await self._close_producer()
                raise
        self.stats.connected = True
        log.info("relay to %s connected to %s", self.topic, self.kafka)
        return producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await abort_producer(producer)  # stop() would wait for Kafka to come back


async def read_tails(
    kafka: KafkaLink,
    topic: str,
    per_partition: int = 1,
    timeout_s: float = 30.0,
    *,
    committed: bool = False,
) -> list[tuple[bytes | None, list[tuple[str, bytes]]]]:
    """(value, headers) of the last ``per_partition`` records of every partition of ``topic``,
    without a consumer group and without reading the rest of the topic; KafkaUnavailableError
    if Kafka cannot say within ``timeout_s``. ``committed``: only records of committed
    transactions (and those sent without one); aborted ones are skipped."""
    parts = await partitions_of(kafka, topic, wait_s=timeout_s)
    bootstrap = kafka.bootstrap
    consumer = AIOKafkaConsumer(
        **kafka.client_args(),
        group_id=None,
        enable_auto_commit=False,
        client_id="ckms-read-tails",
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        pending = set()
        for tp in tps:
            first = max(starts[tp], ends[tp] - per_partition)
            if first < ends[tp]:
                consumer.seek(tp, first)
                pending.add(tp)
        out: list[tuple[bytes | None, list[tuple[str, bytes]]]] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(f"could not read the end of {topic}")
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    out.append((record.value, [(k, bytes(v)) for k, v in record.headers]))
                    if record.offset >= ends[tp] - 1:
                        pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot read {topic} from {bootstrap}: {exc}") from exc
    except OSError as exc:
        raise KafkaUnavailableError(f"Kafka at {bootstrap} is unreachable: {exc}") from exc
    finally:
        await consumer.stop()


async def read_newest(
    kafka: KafkaLink, topic: str, key: bytes | None = None, timeout_s: float = 30.0
) -> bytes | None:
    """The value of the newest committed record of ``topic`` (with this record ``key``, if
    given), read from the start without a consumer group; None if there is none;
    KafkaUnavailableError if Kafka cannot say within ``timeout_s``. Meant for small, compacted
    topics (the audit anchor's, whose records are sent in transactions: an aborted one, or one
    still open, is not read)."""
    parts = await partitions_of(kafka, topic, wait_s=timeout_s)
    bootstrap = kafka.bootstrap
    consumer = AIOKafkaConsumer(
        **kafka.client_args(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="ckms-read-newest",
        isolation_level="read_committed",
    )
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp, end in ends.items() if end > 0}
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        # Newest per partition by offset (what compaction keeps; a producer's timestamp comes
        # from its clock), then across partitions by timestamp (no order between them).
        newest: dict[TopicPartition, tuple[int, bytes]] = {}  # (timestamp, value)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(f"could not read {topic} to its end")
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp] - 1:
                        pending.discard(tp)
                    if record.value is None or (key is not None and record.key != key):
                        continue
                    newest[tp] = (record.timestamp, bytes(record.value))
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return max(newest.values(), key=lambda n: n[0])[1] if newest else None
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot read {topic} from {bootstrap}: {exc}") from exc
    except OSError as exc:
        raise KafkaUnavailableError(f"Kafka at {bootstrap} is unreachable: {exc}") from exc
    finally:
        await consumer.stop()
