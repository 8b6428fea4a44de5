"""The leader lease of replicas on one store, and the fence every leader-only write passes.

Replicas of one controller share the store; work that must happen once (publishing the
outbox, the scheduler, audit checkpoints, the rollout driver) is done by the one replica that
holds the lease. The lease is one row: its holder (a process incarnation, never reused), the
holder's replica name, an expiry, and ``epoch``, the fencing token: each takeover adds one, so
it only grows. :func:`acquire` takes, renews or reads the lease in one write transaction, and
records the replica's heartbeat (``ckms status`` lists the replicas) in the same one.

Expiry alone cannot make a paused leader harmless: a process frozen past its lease (SIGSTOP, a
long GC pause, a VM migration) wakes up believing it still leads. So leader-only work runs with
a :class:`Fence` (a context variable, set for the leader's tasks), and the store checks it
inside every write transaction of that work (:func:`check_fence`, called by
``Store.write`` right after the transaction began): the lease row must still name this holder
and epoch, else the transaction fails with NotLeaderError and changes nothing. The check is an
UPDATE of the lease row, so it also takes that row's write lock (SQLite's one writer, a row
lock on PostgreSQL): a takeover cannot commit between the check and the commit of the
transaction it guards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from ckms.errors import IntegrityError
from ckms.store._fence import LEASE, Fence, check_fence, current_fence, fenced, fenced_context
from ckms.store._store import Reader, Store, Transaction
from ckms.store._time import format_time, parse_time

log = logging.getLogger(__name__)

MAX_AHEAD = 10
"""A lease expiring more than this many lease lengths after a replica's now was written by no
holder (each writes now + ttl): the row was edited, or a holder's clock runs far ahead. It is
taken over, as an expired one, instead of keeping every replica a follower until then."""
MAX_EPOCH = 1 << 62
"""Past this the epoch was edited (a takeover a second for a hundred billion years short)."""

__all__ = [
    "LEASE",
    "MAX_AHEAD",
    "MAX_EPOCH",
    "Fence",
    "LeaseState",
    "ReplicaBeat",
    "ReplicaRow",
    "acquire",
    "check_fence",
    "current_fence",
    "fenced",
    "fenced_context",
    "read_lease",
    "read_replicas",
    "release",
]


@dataclass(frozen=True)
class LeaseState:
    """The lease as one :func:`acquire` left it."""

    holder: str
    holder_name: str
    epoch: int
    expires_at: datetime
    mine: bool


@dataclass(frozen=True)
class ReplicaBeat:
    """What a replica says about itself at each lease round."""

    name: str
    incarnation: str
    address: str
    version: str
    sealed: bool
    started_at: datetime


@dataclass(frozen=True)
class ReplicaRow:
    """One replica as ``ckms status`` shows it."""

    name: str
    incarnation: str
    address: str
    version: str
    sealed: bool
    started_at: datetime
    last_seen_at: datetime


async def acquire(
    store: Store, beat: ReplicaBeat, *, now: datetime, ttl: timedelta, want: bool = True
) -> LeaseState | None:
    """Renew the lease if ``beat``'s incarnation holds it, take it if it expired (epoch + 1)
    or was never taken, else leave it; record the heartbeat. Returns the lease (None if no
    replica ever held it and ``want`` is False: a sealed replica does not take it)."""
    expires = now + ttl
    async with store.write() as tx:
        await _beat(tx, beat, now)
        row = await tx.fetchone(
            "SELECT holder, holder_name, epoch, expires_at FROM leader_lease WHERE name = ?",
            (LEASE,),
        )
        if row is None:
            if not want:
                return None
            await tx.execute(
                "INSERT INTO leader_lease(name, holder, holder_name, epoch, acquired_at, "
                "expires_at) VALUES (?, ?, ?, 1, ?, ?)",
                (LEASE, beat.incarnation, beat.name, format_time(now), format_time(expires)),
            )
            return LeaseState(beat.incarnation, beat.name, 1, expires, True)
        holder, epoch = str(row["holder"]), int(row["epoch"])
        if not 0 < epoch < MAX_EPOCH:
            # No takeover can add one to it; refused loudly, never an overflow that ends the
            # replica's lease task (and with it the controller).
            raise IntegrityError(
                f"the leader lease row holds epoch {epoch}, which no replica wrote: restore "
                "the store or reset the lease row"
            )
        if holder == beat.incarnation and not want:
            # Giving it up (sealed while leading): the others may take it at their next round.
            await tx.execute(
                "UPDATE leader_lease SET expires_at = ? WHERE name = ? AND holder = ? "
                "AND epoch = ?",
                (format_time(now), LEASE, holder, epoch),
            )
            return LeaseState(holder, beat.name, epoch, now, False)
        if holder == beat.incarnation and want:
            await tx.execute(
                "UPDATE leader_lease SET expires_at = ? WHERE name = ? AND holder = ? "
                "AND epoch = ?",
                (format_time(expires), LEASE, holder, epoch),
            )
            return LeaseState(holder, beat.name, epoch, expires, True)
        current_expiry = parse_time(str(row["expires_at"]))
        if current_expiry > now + MAX_AHEAD * ttl:
            log.error(
                "the leader lease of %s expires at %s, beyond any lease a replica writes: an "
                "edited row or a clock far ahead; treated as expired",
                row["holder_name"],
                format_time(current_expiry),
            )
            current_expiry = now
        if want and current_expiry <= now:
            await tx.execute(
                "UPDATE leader_lease SET holder = ?, holder_name = ?, epoch = ?, "
                "acquired_at = ?, expires_at = ? WHERE name = ? AND epoch = ?",
                (
                    beat.incarnation,
                    beat.name,
                    epoch + 1,
                    format_time(now),
                    format_time(expires),
                    LEASE,
                    epoch,
                ),
            )
            return LeaseState(beat.incarnation, beat.name, epoch + 1, expires, True)
        return LeaseState(holder, str(row["holder_name"]), epoch, current_expiry, False)


async def release(store: Store, holder: str, epoch: int, *, now: datetime) -> bool:
    """End a lease this holder still holds now (a clean stop), so another replica takes it
    at its next round instead of after the expiry; False if it was not held any more."""
    async with store.write() as tx:
        changed = await tx.execute(
            "UPDATE leader_lease SET expires_at = ? WHERE name = ? AND holder = ? AND epoch = ?",
            (format_time(now), LEASE, holder, epoch),
        )
    return changed == 1


async def _beat(tx: Transaction, beat: ReplicaBeat, now: datetime) -> None:
    await tx.execute(
        "INSERT INTO replicas(name, incarnation, address, version, sealed, started_at, "
        "last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
        "incarnation = excluded.incarnation, address = excluded.address, "
        "version = excluded.version, sealed = excluded.sealed, "
        "started_at = excluded.started_at, last_seen_at = excluded.last_seen_at",
        (
            beat.name,
            beat.incarnation,
            beat.address,
            beat.version,
            int(beat.sealed),
            format_time(beat.started_at),
            format_time(now),
        ),
    )


async def read_lease(reader: Reader | Store) -> LeaseState | None:
    """The lease row as it is (``mine`` is always False here)."""
    row = await reader.fetchone(
        "SELECT holder, holder_name, epoch, expires_at FROM leader_lease WHERE name = ?",
        (LEASE,),
    )
    if row is None:
        return None
    return LeaseState(
        str(row["holder"]),
        str(row["holder_name"]),
        int(row["epoch"]),
        parse_time(str(row["expires_at"])),
        False,
    )


async def read_replicas(reader: Reader | Store) -> list[ReplicaRow]:
    """Every replica that ever beat, by name."""
    rows = await reader.fetchall("SELECT * FROM replicas ORDER BY name")
    return [
        ReplicaRow(
            name=str(r["name"]),
            incarnation=str(r["incarnation"]),
            address=str(r["address"]),
            version=str(r["version"]),
            sealed=bool(r["sealed"]),
            started_at=parse_time(str(r["started_at"])),
            last_seen_at=parse_time(str(r["last_seen_at"])),
        )
        for r in rows
    ]
