"""Kafka plumbing shared by controller, agent and consumers: topics, clients, error mapping.

aiokafka errors are translated into :class:`~ckms.errors.KafkaUnavailableError` here, where they
enter ckms, so callers never match on aiokafka's types.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

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
