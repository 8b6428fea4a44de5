"""Hosts' signed acks, sent over their own SSH connection, applied to the fleet view.

An agent sends its queued acks in batches with the ``ack`` request
(:class:`~ckms.protocol.AckRequest`). :class:`AckService` is the one place their rules live:

- each ack is verified over its exact bytes against the identity key of the host the SSH
  connection authenticated as, and must name that host as its agent: host A can neither submit
  an ack signed by host B nor one of its own that claims to be B's;
- an ack ``seq`` at or below the host's last applied one is a duplicate (a retransmission after
  a lost reply, or a replay): confirmed to the sender, applied nothing;
- the batches of concurrent requests from many hosts are applied in **one** transaction (the
  store's group commit, shared with ``sync`` and ``heartbeat``): fleet rows, the hosts' last ack
  seq, one audit record per ack, and the ``fleet.acked`` events that republish what was applied,
  signed by the controller, one per key per commit (:data:`~ckms.protocol.FLEET_TOPIC`);
- the reply is sent only after that commit, so the agent forgets only what is durable here.

What the rows mean is :mod:`ckms.controller.fleet`'s business.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError

from ckms._canonical import canonical_json
from ckms.controller import rowmac
from ckms.controller.models import Host
from ckms.crypto import signer_key_id
from ckms.errors import PermissionDeniedError
from ckms.protocol import (
    KEY_ID_HEADER,
    MAX_FLEET_ACKS,
    MAX_MESSAGE_BYTES,
    SIGNATURE_HEADER,
    Ack,
    AckedVersion,
    AckRefused,
    AckReply,
    AckRequest,
    Envelope,
    EventType,
    FleetAcked,
    InvalidEventData,
    MalformedMessage,
    MessageRejected,
    UnknownSigner,
    verify_message,
)
from ckms.store import (
    Clock,
    GroupWriter,
    Store,
    Transaction,
    format_time,
    outbox,
    parse_time,
    utc_now,
)
from ckms.store import audit as audit_log

log = logging.getLogger(__name__)

_FLEET_EVENT_BUDGET = MAX_MESSAGE_BYTES // 2
"""Bytes of acks one ``fleet.acked`` event carries at most (half the message bound leaves room
for the envelope and the JSON of long error texts)."""


@dataclass
class AckStats:
    """What the ack service did."""

    applied: int = 0
    dropped: dict[str, int] | None = None

    def drop(self, reason: str) -> None:
        """Count one dropped ack."""
        if self.dropped is None:
            self.dropped = {}
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


_MAX_STORED_INT = (1 << 63) - 1
"""The largest integer either store engine holds (SQLite INTEGER, PostgreSQL BIGINT)."""

_Collected = dict[tuple[str, str], list[AckedVersion]]
"""(key name, key id) → the acks of that key one transaction applied."""


@dataclass
class _Outcome:
    """What one request's work did in its transaction (reset if the work runs again)."""

    applied: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.applied.clear()
        self.duplicates.clear()
        self.latencies.clear()


class AckService:
    """``await acks.submit(host, request)`` verifies and applies one batch of a host's acks."""

    def __init__(self, store: Store, group: GroupWriter, *, clock: Clock = utc_now) -> None:
        self._store = store
        self._group = group
        self._clock = clock
        # The fleet entries each open transaction collected, written once per group commit.
        self._collected: weakref.WeakKeyDictionary[Transaction, _Collected] = (
            weakref.WeakKeyDictionary()
        )
        self.stats = AckStats()
        self.applied = asyncio.Condition()
        """Notified after every commit that applied acks (tests and waits watch it)."""
        self.on_latency: Callable[[float], None] | None = None
        """Called once per applied ack that answers an event, with commit → ack seconds."""
        self.on_applied: Callable[[], None] | None = None
        """Called after every commit that applied an ack (the rollout driver wakes)."""

    def verify(self, host: Host, request: AckRequest) -> tuple[list[Envelope], list[AckRefused]]:
        """The acks of ``request`` that ``host`` signed about itself, in ``seq`` order, and the
        refused rest (each logged and counted; nothing is applied here)."""
        kid = signer_key_id(host.identity_public_key)
        trust = {kid: host.identity_public_key}
        verified: list[Envelope] = []
        refused: list[AckRefused] = []
        for index, signed in enumerate(request.acks):
            try:
                try:
                    value = base64.b64decode(signed.value, validate=True)
                    signature = base64.b64decode(signed.sig, validate=True)
                except (binascii.Error, ValueError):
                    raise MalformedMessage("ack value or signature is not base64") from None
                if signed.kid != kid:
                    raise UnknownSigner(
                        f"ack signed by key {signed.kid[:40]!r}, not host {host.id}'s own"
                    )
                envelope = verify_message(
                    value,
                    ((SIGNATURE_HEADER, signature), (KEY_ID_HEADER, signed.kid.encode())),
                    trust,
                    types={EventType.ACK},
                )
                assert isinstance(envelope.data, Ack)
                if envelope.data.agent != host.id:
                    raise UnknownSigner(
                        f"ack signed by host {host.id} claims to come from {envelope.data.agent}"
                    )
                _fleet_entry(host.id, envelope)  # now, not inside a commit it would fail
            except MessageRejected as exc:
                self.stats.drop(exc.reason)
                log.warning(
                    "refused ack %d of a batch from host %s reason=%s: %s",
                    index,
                    host.id,
                    exc.reason,
                    exc,
                )
                refused.append(AckRefused(index=index, reason=exc.reason))
                continue
            verified.append(envelope)
        verified.sort(key=lambda e: e.seq)
        return verified, refused

    async def submit(self, host: Host, request: AckRequest) -> AckReply:
        """Verify ``request``, apply what verifies in the next group commit, and say (only
        after that commit) which seqs are applied, duplicates, or refused."""
        verified, refused = self.verify(host, request)
        outcome = _Outcome()
        if verified:

            async def work(tx: Transaction) -> None:
                outcome.reset()  # it may run twice: once in a group that failed, then alone
                await self._apply(tx, host.id, verified, outcome)

            await self._group.write(work, finish=self._write_fleet_events)
        for _ in outcome.duplicates:
            self.stats.drop("replayed")
        if outcome.duplicates:
            log.info(
                "host %s resent acks %s already applied (a lost reply): confirmed again",
                host.id,
                outcome.duplicates,
            )
        self.stats.applied += len(outcome.applied)
        if self.on_latency is not None:
            for seconds in outcome.latencies:  # after the commit: only acks that were kept
                self.on_latency(seconds)
        if outcome.applied:
            if self.on_applied is not None:
                self.on_applied()
            async with self.applied:
                self.applied.notify_all()
        return AckReply(
            applied=tuple(outcome.applied),
            duplicates=tuple(outcome.duplicates),
            refused=tuple(refused),
        )

    async def _apply(
        self, tx: Transaction, host_id: str, envelopes: list[Envelope], outcome: _Outcome
    ) -> None:
        row = await tx.fetchone("SELECT last_ack_seq, revoked FROM hosts WHERE id = ?", (host_id,))
        if row is None or row["revoked"]:
            # Revoked after the request was authorized: the revocation committed first.
            raise PermissionDeniedError(f"host {host_id} is revoked")
        last = row["last_ack_seq"]
        now = self._clock()
        lookups = _Lookups(tx)
        collected = self._collected.setdefault(tx, {})
        for envelope in envelopes:
            if last is not None and envelope.seq <= last:
                outcome.duplicates.append(envelope.seq)
                continue
            entry = await self._apply_one(tx, lookups, host_id, envelope, now, outcome)
            if entry is not None:
                collected.setdefault(entry[0], []).append(entry[1])
            outcome.applied.append(envelope.seq)
            last = envelope.seq
        if outcome.applied:
            stamp = format_time(now)
            await tx.execute_later(
                "UPDATE hosts SET last_ack_seq = ?, last_seen_at = ?, seen_mac = ? WHERE id = ?",
                (last, stamp, rowmac.seen_mac(tx.row_key, host_id, stamp), host_id),
            )

    async def _apply_one(
        self,
        tx: Transaction,
        lookups: _Lookups,
        host_id: str,
        envelope: Envelope,
        now: datetime,
        outcome: _Outcome,
    ) -> tuple[tuple[str, str], AckedVersion] | None:
        """Apply one ack; return its fleet event entry (None for a key nobody knows)."""
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
                    outcome.latencies.append(latency_ms / 1000)
        if key_id is not None:
            await put_fleet_row(
                tx,
                host_id=host_id,
                key_id=key_id,
                version=ack.version,
                status=str(ack.status),
                digest=ack.digest,
                updated_at=format_time(now),
                event_id=ack.event_id,
                latency_ms=latency_ms,
                error=ack.error if str(ack.status) == "failed" else None,
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
        if key_id is None:
            return None
        entry = _fleet_entry(host_id, envelope)
        return (ack.key, key_id), entry

    async def _write_fleet_events(self, tx: Transaction) -> None:
        """Once per group commit: the acks its requests applied, as ``fleet.acked`` events (one
        per key, split to stay under the message bound), in the same transaction."""
        collected = self._collected.pop(tx, None)
        if not collected:
            return
        prepared = []
        for (key, key_id), entries in sorted(collected.items()):
            for chunk in _chunks(entries):
                data = FleetAcked(key=key, key_id=key_id, acks=tuple(chunk))
                prepared.append(outbox.prepare(key, data))
        await outbox.add_events(tx, prepared, now=self._clock())


def _fleet_entry(host_id: str, envelope: Envelope) -> AckedVersion:
    """The ``fleet.acked`` entry that republishes a verified ack.

    :meth:`AckService.verify` builds it first: an ack the entry cannot carry (seq 0, an
    over-long event id) or the store cannot hold (a version past its 64-bit integers) is
    refused there as invalid data, never raised inside the group commit (where it would roll
    back every other host's write with it)."""
    ack = envelope.data
    assert isinstance(ack, Ack)
    if ack.version > _MAX_STORED_INT:
        raise InvalidEventData("ack version is past what the store holds (2**63-1)")
    try:
        return AckedVersion(
            host=host_id,
            version=ack.version,
            status=ack.status,
            digest=ack.digest,
            at=envelope.at,
            elapsed_ms=ack.elapsed_ms,
            ack_seq=envelope.seq,
            event_id=ack.event_id,
            error=ack.error if str(ack.status) == "failed" else None,
            cert_serial=ack.cert_serial,
            cert_not_after=ack.cert_not_after,
        )
    except ValidationError as exc:
        fields = sorted({".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)})
        raise InvalidEventData(f"ack cannot be republished: bad {', '.join(fields)}") from None


async def put_fleet_row(
    tx: Transaction,
    *,
    host_id: str,
    key_id: str,
    version: int,
    status: str,
    digest: str | None,
    updated_at: str,
    event_id: str | None = None,
    latency_ms: float | None = None,
    error: str | None = None,
) -> None:
    """Record what a host acknowledged for a version (its ``fleet_state`` row) with the row
    MAC a rollout's gate checks: every writer of acks goes through here."""
    mac = rowmac.fleet_row_mac(
        tx.row_key,
        host_id,
        key_id,
        version,
        {"status": status, "digest": digest, "updated_at": updated_at, "error": error},
    )
    await tx.execute_later(
        "INSERT INTO fleet_state(host_id, key_id, version, status, digest, event_id, "
        "updated_at, latency_ms, error, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(host_id, key_id, version) DO UPDATE SET status = excluded.status, "
        "digest = excluded.digest, event_id = excluded.event_id, "
        "updated_at = excluded.updated_at, latency_ms = excluded.latency_ms, "
        "error = excluded.error, mac = excluded.mac",
        (host_id, key_id, version, status, digest, event_id, updated_at, latency_ms, error, mac),
    )


def _chunks(entries: list[AckedVersion]) -> list[list[AckedVersion]]:
    """``entries`` in runs of at most MAX_FLEET_ACKS and about half the message bound each."""
    out: list[list[AckedVersion]] = [[]]
    size = 0
    for entry in entries:
        cost = len(canonical_json(entry.model_dump(mode="json")))
        if out[-1] and (len(out[-1]) >= MAX_FLEET_ACKS or size + cost > _FLEET_EVENT_BUDGET):
            out.append([])
            size = 0
        out[-1].append(entry)
        size += cost
    return out


class _Lookups:
    """Key ids and event times, each read once per transaction (acks of a rotation share them)."""

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
