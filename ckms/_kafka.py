"""Kafka plumbing shared by controller, agent and consumers: topics, clients, error mapping.

aiokafka errors are translated into :class:`~ckms.errors.KafkaUnavailableError` here, where they
enter ckms, so callers never match on aiokafka's types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from ckms.errors import KafkaUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    """A topic ckms needs, with its partition count and replication factor."""

    name: str
    partitions: int = 6
    replication: int = 1
    config: tuple[tuple[str, str], ...] = ()


async def ensure_topics(bootstrap: str, topics: Iterable[TopicSpec]) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are (idempotent)."""
    specs = list(topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
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


async def partitions_of(bootstrap: str, topic: str, wait_s: float = 30.0) -> list[int]:
    """The partition ids of ``topic``, waiting (bounded) for metadata to name it."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
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


async def abort_producer(producer: AIOKafkaProducer) -> None:
    """Stop ``producer`` at once, failing the messages Kafka has not confirmed yet.

    ``AIOKafkaProducer.stop()`` first waits for every queued message to be delivered, which
    never happens while all brokers are down: a controller or agent could not even stop
    (SIGTERM) during an outage. Callers keep what was not confirmed and send it again later
    (consumers drop the duplicates by ``seq``). Safe to call twice.
    """
    # aiokafka has no public abort. Stop its sender task first (it returns once the requests in
    # flight have failed or finished), then fail what is still queued, so that stop()'s flush
    # has nothing left to wait for; failing batches under a running sender races it.
    sender = getattr(producer, "_sender", None)
    accumulator = getattr(producer, "_message_accumulator", None)
    with contextlib.suppress(KafkaError, OSError):
        if sender is not None and accumulator is not None:
            await sender.close()
            accumulator.fail_all(KafkaTimeoutError("stopped before Kafka confirmed"))
        await producer.stop()
