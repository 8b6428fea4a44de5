"""The transactional outbox: events are stored in the same transaction as the change they announce.

The publisher (:mod:`ckms.controller.publisher`) reads unsent rows in ``seq`` order, wraps
each in the signed envelope ``{"v":1,"id","seq","type","at","data"}`` and marks it sent once
Kafka acknowledged it.
``seq`` is the controller's monotonic event sequence; ``partition_key`` is the key name, so one
key's events stay ordered on one partition. ``payload`` is the canonical JSON of ``data`` and
never holds key material.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from ckms._canonical import canonical_json, parse_canonical_json
from ckms.errors import ProtocolError
from ckms.protocol._events import EVENT_DATA_MODELS, EventData, EventType, event_type_of
from ckms.store._ids import new_id
from ckms.store._store import Reader, Store, Transaction
from ckms.store._time import format_time, parse_time


class OutboxEvent(BaseModel):
    """One stored event, as the publisher will send it."""

    model_config = ConfigDict(frozen=True)

    seq: int
    event_id: str
    type: str
    partition_key: str
    payload: bytes
    created_at: datetime
    sent_at: datetime | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The event's ``data`` object, parsed from the canonical payload."""
        value = parse_canonical_json(self.payload)
        assert isinstance(value, dict)
        return value


async def add_event(
    tx: Transaction,
    *,
    partition_key: str,
    data: EventData | dict[str, Any],
    now: datetime,
    type: str | None = None,
) -> OutboxEvent:
    """Store one event in the caller's write transaction and return it with its sequence number.

    ``data`` is a typed event model (its type names the event) or a dict with ``type``; either
    way it is validated against the event type's protocol model first, so an event that agents
    would refuse can never be committed (the change it announces fails with it).
    """
    type, payload = _payload(data, type)
    event_id = new_id()
    created = format_time(now)
    if tx.dialect.name == "sqlite":
        seq = await tx.insert(
            "INSERT INTO outbox(event_id, type, partition_key, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (event_id, type, partition_key, payload, created),
        )
    else:
        seq = await _reserve(tx, 1)
        await tx.execute(
            "INSERT INTO outbox(seq, event_id, type, partition_key, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, event_id, type, partition_key, payload, created),
        )
    tx.wrote_outbox = True
    return OutboxEvent(
        seq=seq,
        event_id=event_id,
        type=type,
        partition_key=partition_key,
        payload=payload,
        created_at=parse_time(created),
    )


class Prepared(NamedTuple):
    """An event checked and encoded ahead of its transaction (:func:`prepare`)."""

    partition_key: str
    type: str
    payload: bytes


def prepare(partition_key: str, data: EventData) -> Prepared:
    """Check and encode one typed event for :func:`add_events` (as :func:`add_event` does)."""
    type, payload = _payload(data, None)
    return Prepared(partition_key, type, payload)


async def add_events(
    tx: Transaction, events: Sequence[Prepared], *, now: datetime
) -> list[tuple[int, str]]:
    """Store prepared events in the caller's write transaction, in order, in one statement;
    return each one's (seq, event_id).

    The sequence numbers are given here, after the highest ever given out: the transaction
    holds the one writer, so nobody else can take them meanwhile.
    """
    if not events:
        return []
    created = format_time(now)
    seq = await _reserve(tx, len(events)) - 1
    rows: list[tuple[Any, ...]] = []
    for event in events:
        seq += 1
        rows.append(
            (seq, new_id(), event.type, event.partition_key, event.payload, created)
        )
    await tx.executemany(
        "INSERT INTO outbox(seq, event_id, type, partition_key, payload, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    tx.wrote_outbox = True
    return [(row[0], row[1]) for row in rows]


async def _reserve(tx: Transaction, count: int) -> int:
    """Take ``count`` new sequence numbers in the caller's transaction; return the first.

    SQLite: above AUTOINCREMENT's counter (and any row), which the explicit inserts then
    move. PostgreSQL: the ``outbox`` row of ``counters``, moved in this transaction, so a
    rollback gives the numbers back (a PostgreSQL sequence would skip them) and the writer
    lock keeps them in commit order across replicas.
    """
    if tx.dialect.name == "postgresql":
        top = await tx.fetchval(
            "UPDATE counters SET value = value + ? WHERE name = 'outbox' RETURNING value",
            (count,),
        )
        return int(top) - count + 1
    highest = await tx.fetchval(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0), "
        "COALESCE((SELECT MAX(seq) FROM outbox), 0))"
    )
    return int(highest) + 1


def _payload(data: EventData | dict[str, Any], type: str | None) -> tuple[str, bytes]:
    """The event type and canonical payload of ``data``, checked against the type's model."""
    try:
        if isinstance(data, BaseModel):
            named = event_type_of(data)
            if type is not None and EventType(type) is not named:
                raise ValueError(f"{type!r} is not the type of {named.value}")
            type = str(named)
        if type is None:
            raise ValueError("an event given as a dict needs its type")
        model = EVENT_DATA_MODELS[EventType(type)]
        typed = data if isinstance(data, model) else model.model_validate(data)
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"outbox event {type!r} does not match its model: {exc}") from None
    return type, canonical_json(typed.model_dump(mode="json", by_alias=True))


async def last_seq(tx: Reader) -> int:
    """The highest ``seq`` ever given out (0 before the first event); every later event is above.

    Read from AUTOINCREMENT's own counter, so pruning sent rows does not lower it. Enrollment
    hands it to the agent, which then drops any event at or below it as older than itself.
    """
    if tx.dialect.name == "postgresql":
        value = await tx.fetchval("SELECT value FROM counters WHERE name = 'outbox'")
    else:
        value = await tx.fetchval("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
    return 0 if value is None else int(value)


async def continue_seq(tx: Transaction, seq: int) -> int:
    """Make every later event's ``seq`` exceed ``seq`` (never lowering the counter); return the
    highest given out now. A restored or copied store continues after the events its source
    (or its controller, on Kafka) already handed out: agents drop any event at or below the
    last they applied."""
    current = await last_seq(tx)
    if seq <= current:
        return current
    if tx.dialect.name == "postgresql":
        await tx.execute("UPDATE counters SET value = ? WHERE name = 'outbox'", (seq,))
    elif not await tx.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (seq,)):
        await tx.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('outbox', ?)", (seq,))
    return seq


def _event(row: Any) -> OutboxEvent:
    return OutboxEvent(
        seq=row["seq"],
        event_id=row["event_id"],
        type=row["type"],
        partition_key=row["partition_key"],
        payload=bytes(row["payload"]),
        created_at=parse_time(row["created_at"]),
        sent_at=None if row["sent_at"] is None else parse_time(row["sent_at"]),
    )


async def pending_events(store: Store, *, limit: int = 500) -> list[OutboxEvent]:
    """Return up to ``limit`` unsent events, oldest first."""
    rows = await store.fetchall(
        "SELECT * FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT ?", (limit,)
    )
    return [_event(r) for r in rows]


async def all_events(store: Store) -> list[OutboxEvent]:
    """Return every stored event, sent or not, in sequence order."""
    return [_event(r) for r in await store.fetchall("SELECT * FROM outbox ORDER BY seq")]


async def mark_sent(store: Store, seqs: list[int], *, now: datetime) -> int:
    """Mark events as delivered to Kafka; return how many rows changed."""
    if not seqs:
        return 0
    marks = ",".join("?" for _ in seqs)
    async with store.write() as tx:
        return await tx.execute(
            f"UPDATE outbox SET sent_at = ? WHERE sent_at IS NULL AND seq IN ({marks})",  # noqa: S608
            (format_time(now), *seqs),
        )


async def mark_sent_through(store: Store, seq: int, *, now: datetime) -> int:
    """Mark every unsent event up to ``seq`` as delivered (they are on the topic already);
    return how many rows changed."""
    async with store.write() as tx:
        return await tx.execute(
            "UPDATE outbox SET sent_at = ? WHERE sent_at IS NULL AND seq <= ?",
            (format_time(now), seq),
        )
