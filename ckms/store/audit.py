"""The audit log: append-only, hash-chained, with signed checkpoints that chain too.

Record ``i`` carries ``prev_hash`` (the hash of record ``i-1``, or :data:`GENESIS_HASH` for
record 0) and ``hash = sha256(canonical_json({index, at, actor, action, object, outcome, details,
prev_hash}))`` as lowercase hex. Records never hold key material; callers HMAC identifiers that
are sensitive (``hmac_identifier`` with the controller's audit key) before passing ``details``.

A checkpoint is the controller's Ed25519 signature over the canonical JSON of ``{"ctx":
"ckms.audit.checkpoint.v2", "size", "head", "at", "prev"}``: it commits to the first ``size``
records and names the checkpoint before it (``prev`` = ``{"size", "head", "sig_hash"}``, the
SHA-256 of that checkpoint's signature, or null for the first), so checkpoints form a chain of
their own and a deleted checkpoint row breaks it. Checkpoints signed before chaining (``v1``,
``{"ctx": "ckms.audit.checkpoint.v1", "size", "head", "at"}``) still verify; the first ``v2``
checkpoint names the last of them.

An **anchor** is a checkpoint kept outside the database (the controller publishes each one it
signs on a Kafka topic and keeps the last in memory). :func:`checkpoint` refuses to sign over a
log that does not extend the anchor it is given (:class:`~ckms.errors.AuditAnchorError`), and
:func:`verify_audit` checks an export against one. What is detected, and what is not:

- an edited, removed or reordered record, anywhere: by the hash chain (named by index);
- a rewritten (re-hashed) run of records covered by a checkpoint: by its signed head;
- a deleted checkpoint row with a later checkpoint still present: by the checkpoint chain;
- truncation, deleted trailing checkpoints, or a rewritten tail, up to the anchor: only
  against an anchor (the last checkpoint is what the file owner can cut with the records);
- **not detected**: records appended after the newest anchor and cut off or rewritten before
  the next checkpoint is signed and published; and anything, if both the database and every
  copy of the anchor (the topic and auditors' copies) are rewritten together.

Appending happens inside the caller's write transaction (:func:`append`), so the operation it
records and the record commit together; if the record cannot be written, the caller's whole
transaction fails with :class:`~ckms.errors.AuditError` (fail closed). While the store is
marked as holding a log that does not extend its anchor (``Store.audit_blocked``), every append
fails: operations that must be audited are refused until the log is restored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckms._canonical import canonical_json
from ckms.crypto import signer_key_id, verify_signature
from ckms.errors import (
    AuditAnchorError,
    AuditError,
    AuditVerificationError,
    CKMSError,
    StoreError,
)
from ckms.store._store import Reader, RunSql, Store, Transaction, read_only_uri
from ckms.store._time import format_time, parse_time

__all__ = [
    "GENESIS_HASH",
    "Anchor",
    "AuditCheckpoint",
    "AuditRecord",
    "AuditReport",
    "Entry",
    "Outcome",
    "anchor_problem",
    "append",
    "append_many",
    "checkpoint",
    "checkpoint_line",
    "checkpoint_message",
    "export_jsonl",
    "is_signed",
    "load_checkpoints",
    "load_records",
    "parse_anchor",
    "parse_checkpoint_line",
    "parse_jsonl",
    "record_hash",
    "verify_audit",
    "verify_store",
]

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of record 0."""

CHECKPOINT_CONTEXT = "ckms.audit.checkpoint.v1"
CHECKPOINT_CONTEXT_V2 = "ckms.audit.checkpoint.v2"

Outcome = Literal["ok", "refused", "failed"]
"""``ok``: done; ``refused``: not allowed (state, policy, permission); ``failed``: tried, broke."""


class AuditRecord(BaseModel):
    """One audit record as stored and exported; ``at`` is the exact RFC 3339 text hashed."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    at: str
    actor: str
    action: str
    object: str
    outcome: str
    details: dict[str, Any]
    prev_hash: str
    hash: str

    @property
    def time(self) -> datetime:
        """The record's time as an aware UTC datetime."""
        return parse_time(self.at)

    def hashed_fields(self) -> dict[str, Any]:
        """The fields the record hash covers (everything but ``hash``)."""
        return {
            "index": self.index,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "object": self.object,
            "outcome": self.outcome,
            "details": self.details,
            "prev_hash": self.prev_hash,
        }


class AuditCheckpoint(BaseModel):
    """A signed commitment to the first ``size`` records, whose last hash is ``head_hash``;
    ``v`` 2 also names the checkpoint before it (``prev_*``; all None for the first)."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(ge=0)
    head_hash: str
    at: str
    signer_key_id: str
    signature: bytes
    v: Literal[1, 2] = 1
    prev_size: int | None = None
    prev_head: str | None = None
    prev_sig_hash: str | None = None

    @property
    def sig_hash(self) -> str:
        """SHA-256 of the signature: what the next checkpoint names."""
        return hashlib.sha256(self.signature).hexdigest()

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        if self.v == 1:
            return checkpoint_message(self.size, self.head_hash, self.at)
        prev = (
            None
            if self.prev_size is None
            else {"size": self.prev_size, "head": self.prev_head, "sig_hash": self.prev_sig_hash}
        )
        return canonical_json(
            {
                "ctx": CHECKPOINT_CONTEXT_V2,
                "size": self.size,
                "head": self.head_hash,
                "at": self.at,
                "prev": prev,
            }
        )

    def follows(self, previous: AuditCheckpoint | None) -> bool:
        """Say whether this (v2) checkpoint names ``previous`` as the one before it."""
        if previous is None:
            return self.prev_size is None and self.prev_head is None and self.prev_sig_hash is None
        return (self.prev_size, self.prev_head, self.prev_sig_hash) == (
            previous.size,
            previous.head_hash,
            previous.sig_hash,
        )


class Anchor(BaseModel):
    """A checkpoint kept outside the database: its size and head, and the checkpoint itself
    when it came whole (from the anchor topic) rather than as ``size:head`` text."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(ge=0)
    head_hash: str
    checkpoint: AuditCheckpoint | None = None

    @classmethod
    def of(cls, cp: AuditCheckpoint) -> Anchor:
        """The anchor a signed checkpoint makes."""
        return cls(size=cp.size, head_hash=cp.head_hash, checkpoint=cp)

    def __str__(self) -> str:
        return f"{self.size}:{self.head_hash}"


class AuditReport(BaseModel):
    """The outcome of :func:`verify_audit`."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    size: int
    head_hash: str
    checkpoints_verified: int
    first_bad_index: int | None = None
    bad_checkpoint_size: int | None = None
    reason: str | None = None
    anchor_size: int | None = None
    """The anchor verified against (None: no anchor given)."""

    def raise_if_bad(self) -> None:
        """Raise AuditVerificationError (with ``index``) unless the log verified."""
        if not self.ok:
            raise AuditVerificationError(
                self.reason or "audit log does not verify", self.first_bad_index
            )


def record_hash(fields: dict[str, Any]) -> str:
    """Return the chain hash of a record's fields (see the module docstring)."""
    return hashlib.sha256(canonical_json(fields)).hexdigest()


def checkpoint_message(size: int, head_hash: str, at: str) -> bytes:
    """Return the exact bytes a checkpoint signature covers."""
    return canonical_json({"ctx": CHECKPOINT_CONTEXT, "size": size, "head": head_hash, "at": at})


# -- writing ---------------------------------------------------------------------------------


_HEAD = "SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1"


async def _head(r: Reader) -> tuple[int, str]:
    """Return (number of records, hash of the last one or GENESIS_HASH)."""
    return _head_of(await r.fetchall(_HEAD))


def _head_of(rows: Sequence[Any]) -> tuple[int, str]:
    """The head :data:`_HEAD`'s rows name (none: the empty log's)."""
    if not rows:
        return 0, GENESIS_HASH
    return int(rows[0][0]) + 1, str(rows[0][1])


@dataclass
class _Tally:
    count: int = 0


append_failures = _Tally()
"""Appends that failed in this process (their operation failed with them): a metric."""


async def append(
    tx: Transaction,
    *,
    now: datetime,
    actor: str,
    action: str,
    object: str,
    outcome: Outcome = "ok",
    details: dict[str, Any] | None = None,
) -> None:
    """Append one record in the caller's write transaction; any failure raises AuditError
    (on SQLite, possibly from the block's next statement or its commit: see the insert)."""
    fields = {
        "at": format_time(now),
        "actor": actor,
        "action": action,
        "object": object,
        "outcome": outcome,
        "details": dict(details or {}),
    }
    try:
        if tx.audit_blocked is not None:
            raise AuditAnchorError(
                f"the audit log does not extend its last anchor ({tx.audit_blocked}); "
                "operations that must be audited are refused until it is restored"
            )
        head = tx.audit_head
        if head is not None and tx.can_defer:
            # Inserted in the commit's trip to SQLite's thread (one trip fewer), or before
            # the block's next statement, which sees it. Built now: a record that cannot be
            # encoded fails here, and the next record of the block chains onto this one.
            row = _row(head, fields)
            tx.audit_head = (head[0] + 1, row[-1])
            await tx.defer(_deferred_insert(tx, fields, row))
            return
        if head is not None:
            try:
                await _insert(tx, head, fields)
                return
            except StoreError:
                # The head kept in memory is stale: another connection appended (an operator's
                # tool on the same file). Chain onto the real head instead.
                pass
        await _insert(tx, await _head(tx), fields)
    except AuditAnchorError:
        append_failures.count += 1
        raise
    except AuditError:
        raise  # an earlier record's deferred insert, already counted and named
    except (CKMSError, ValueError) as exc:
        raise _append_failed(fields, exc) from exc


def _append_failed(fields: dict[str, Any], exc: BaseException) -> AuditError:
    append_failures.count += 1
    return AuditError(
        f"audit record for {fields['action']} on {fields['object']} could not be written: {exc}"
    )


def _deferred_insert(
    tx: Transaction, fields: dict[str, Any], row: tuple[Any, ...]
) -> Callable[[RunSql], None]:
    """:func:`append`'s insert of ``row`` as work for :meth:`Transaction.defer`; if another
    connection appended meanwhile (the row's index is taken), the record is chained onto the
    table's real head instead, as :func:`append` does, and so is each later deferred one (its
    index is then taken by this one)."""

    def run(sql: RunSql) -> None:
        try:
            try:
                sql(_INSERT_RECORD, row)
            except StoreError:
                head = _head_of(sql(_HEAD, ()))
                chained = _row(head, fields)
                sql(_INSERT_RECORD, chained)
                tx.audit_head = (head[0] + 1, chained[-1])
        except (CKMSError, ValueError) as exc:
            raise _append_failed(fields, exc) from exc

    return run


@dataclass(frozen=True)
class Entry:
    """One record to append with :func:`append_many` (what :func:`append` takes, less the time)."""

    actor: str
    action: str
    object: str
    details: dict[str, Any]
    outcome: Outcome = "ok"


async def append_many(tx: Transaction, entries: Sequence[Entry], *, now: datetime) -> list[str]:
    """Append records in the caller's write transaction, chained as :func:`append` chains them,
    in one statement (a batch of key creations records hundreds at once); return their hashes.

    The head is read from the table (one indexed query), never from memory: a batch that
    chained onto a stale head would fail half-way. Any failure raises AuditError.
    """
    if not entries:
        return []
    at = format_time(now)
    try:
        if tx.audit_blocked is not None:
            raise AuditAnchorError(
                f"the audit log does not extend its last anchor ({tx.audit_blocked}); "
                "operations that must be audited are refused until it is restored"
            )
        size, prev = await _head(tx)
        rows: list[tuple[Any, ...]] = []
        for i, entry in enumerate(entries, size):
            fields = {
                "at": at,
                "actor": entry.actor,
                "action": entry.action,
                "object": entry.object,
                "outcome": entry.outcome,
                "details": dict(entry.details),
            }
            rows.append(_row((i, prev), fields))
            prev = rows[-1][-1]
            if len(rows) % 100 == 0:
                await asyncio.sleep(0)  # hashing a batch of hundreds must not hold the loop
        await tx.executemany(_INSERT_RECORD, rows)
    except AuditAnchorError:
        append_failures.count += 1
        raise
    except AuditError:
        raise  # an earlier record's deferred insert (read with the head), already counted
    except (CKMSError, ValueError) as exc:
        append_failures.count += 1
        raise AuditError(
            f"audit records for {len(entries)} {entries[0].action} could not be written: {exc}"
        ) from exc
    tx.audit_head = (size + len(entries), prev)
    return [row[-1] for row in rows]


_INSERT_RECORD = (
    "INSERT INTO audit(idx, at, actor, action, object, outcome, details, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row(head: tuple[int, str], fields: dict[str, Any]) -> tuple[Any, ...]:
    """The audit row of a record chained onto ``head``; its hash is the last column."""
    size, prev = head
    digest = record_hash({"index": size, **fields, "prev_hash": prev})
    details = canonical_json(fields["details"]).decode("utf-8")
    return (size, fields["at"], fields["actor"], fields["action"], fields["object"],
            fields["outcome"], details, prev, digest)  # fmt: skip


async def _insert(tx: Transaction, head: tuple[int, str], fields: dict[str, Any]) -> None:
    row = _row(head, fields)
    await tx.execute(_INSERT_RECORD, row)
    tx.audit_head = (head[0] + 1, row[-1])


async def checkpoint(
    store: Store,
    *,
    sign: Callable[[bytes], bytes],
    public_key: bytes,
    now: datetime,
    anchor: Anchor | None = None,
) -> AuditCheckpoint:
    """Sign and store a checkpoint of the log as it is now (or return the one already there).

    The new checkpoint names the newest stored one. With ``anchor`` (the last checkpoint signed
    and kept outside the database), the log must extend it first: AuditAnchorError otherwise,
    and nothing is signed.
    """
    async with store.write() as tx:
        size, head = await _head(tx)
        rows = await tx.fetchall("SELECT * FROM audit_checkpoints ORDER BY size")
        stored = [_checkpoint(row) for row in rows]
        last = stored[-1] if stored else None
        if anchor is not None:
            problem = await _anchor_problem(tx, anchor, stored, size, public_key)
            if problem is not None:
                raise AuditAnchorError(problem)
        if last is not None and last.size > size:
            raise AuditAnchorError(
                f"the log has {size} records but its newest checkpoint covers {last.size} "
                "(records were cut off)"
            )
        if last is not None and last.size == size:
            if last.head_hash != head:
                raise AuditAnchorError(
                    f"the log's head at size {size} differs from its checkpoint (rewritten)"
                )
            return last
        problem = await _new_records_problem(tx, last)
        if problem is not None:
            raise AuditAnchorError(f"{problem}; not signing a checkpoint over it")
        at = format_time(now)
        unsigned = AuditCheckpoint(
            v=2,
            size=size,
            head_hash=head,
            at=at,
            signer_key_id=signer_key_id(public_key),
            signature=b"",
            prev_size=None if last is None else last.size,
            prev_head=None if last is None else last.head_hash,
            prev_sig_hash=None if last is None else last.sig_hash,
        )
        cp = unsigned.model_copy(update={"signature": sign(unsigned.signed_bytes())})
        try:
            await tx.execute(
                "INSERT INTO audit_checkpoints(size, head_hash, at, signer_key_id, signature, v, "
                "prev_size, prev_head, prev_sig_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cp.size,
                    cp.head_hash,
                    cp.at,
                    cp.signer_key_id,
                    cp.signature,
                    cp.v,
                    cp.prev_size,
                    cp.prev_head,
                    cp.prev_sig_hash,
                ),
            )
        except StoreError as exc:
            raise AuditError(f"audit checkpoint could not be written: {exc}") from exc
        return cp


async def _new_records_problem(r: Reader, last: AuditCheckpoint | None) -> str | None:
    """Why the records after checkpoint ``last`` (all, when None) do not verify, or None.

    Incremental: only the records the new checkpoint adds are hashed (in a worker thread),
    chained onto the head ``last`` signed, so a checkpoint never vouches for an edited tail
    and costs O(new records), not O(log).
    """
    start = 0 if last is None else last.size
    prev = GENESIS_HASH if last is None else last.head_hash
    if start > 0:
        signed_head = await r.fetchval("SELECT hash FROM audit WHERE idx = ?", (start - 1,))
        if signed_head != prev:
            return f"record {start - 1} differs from what the checkpoint at size {start} signed"
    rows = await r.fetchall(
        f"SELECT {_RECORD_COLUMNS} FROM audit WHERE idx >= ? ORDER BY idx",  # noqa: S608
        (start,),
    )
    walk = await asyncio.to_thread(walk_rows, rows, start=start, prev=prev)
    return walk.reason


async def _anchor_problem(
    r: Reader, anchor: Anchor, stored: list[AuditCheckpoint], size: int, public_key: bytes
) -> str | None:
    """Why the stored log does not extend ``anchor`` (None when it does)."""
    if size < anchor.size:
        return (
            f"the log has {size} records, fewer than the {anchor.size} the last anchor signed "
            "(truncated)"
        )
    at = await r.fetchval("SELECT hash FROM audit WHERE idx = ?", (anchor.size - 1,))
    expected = GENESIS_HASH if anchor.size == 0 else at
    if expected != anchor.head_hash:
        return f"record {anchor.size - 1} differs from what the last anchor signed (rewritten)"
    position = next((i for i, cp in enumerate(stored) if cp.size == anchor.size), None)
    if position is None or (
        anchor.checkpoint is not None
        and stored[position].signature != anchor.checkpoint.signature
    ):
        return f"the anchored checkpoint at size {anchor.size} is not in the database (deleted)"
    # Checkpoints newer than the anchor (signed, but their publication was lost) must chain to it.
    for previous, cp in zip(stored[position:], stored[position + 1 :], strict=False):
        if cp.v != 2 or not cp.follows(previous) or not _signed(cp, public_key):
            return f"the checkpoint at size {cp.size} does not chain to the anchor"
    return None


async def anchor_problem(store: Store, anchor: Anchor, public_key: bytes) -> str | None:
    """Why the stored log does not extend ``anchor``, or None when it does (one snapshot)."""
    async with store.read() as r:
        size, _ = await _head(r)
        stored = await load_checkpoints(r)
        return await _anchor_problem(r, anchor, stored, size, public_key)


def is_signed(cp: AuditCheckpoint, public_key: bytes) -> bool:
    """Say whether ``cp`` carries a valid signature by ``public_key``."""
    return _signed(cp, public_key)


def _signed(cp: AuditCheckpoint, public_key: bytes) -> bool:
    try:
        if cp.signer_key_id != signer_key_id(public_key):
            return False
        verify_signature(public_key, cp.signed_bytes(), cp.signature)
    except CKMSError:
        return False
    return True


# -- reading ---------------------------------------------------------------------------------


def _details(text: str) -> dict[str, Any]:
    """Parse stored details; unparseable text is kept so that its hash check fails visibly."""
    try:
        value = json.loads(text)
    except ValueError:
        return {"_unparseable": text}
    return value if isinstance(value, dict) else {"_unparseable": text}


def _record(row: Any) -> AuditRecord:
    return AuditRecord(
        index=int(row["idx"]),
        at=str(row["at"]),
        actor=str(row["actor"]),
        action=str(row["action"]),
        object=str(row["object"]),
        outcome=str(row["outcome"]),
        details=_details(str(row["details"])),
        prev_hash=str(row["prev_hash"]),
        hash=str(row["hash"]),
    )


def _checkpoint(row: Any) -> AuditCheckpoint:
    return AuditCheckpoint(
        size=int(row["size"]),
        head_hash=str(row["head_hash"]),
        at=str(row["at"]),
        signer_key_id=str(row["signer_key_id"]),
        signature=bytes(row["signature"]),
        v=int(row["v"]),
        prev_size=row["prev_size"],
        prev_head=row["prev_head"],
        prev_sig_hash=row["prev_sig_hash"],
    )


async def load_records(r: Reader | Store, *, start: int = 0) -> list[AuditRecord]:
    """Return the stored records from index ``start`` on, in index order."""
    rows = await r.fetchall("SELECT * FROM audit WHERE idx >= ? ORDER BY idx", (start,))
    return [_record(row) for row in rows]


async def load_checkpoints(r: Reader | Store) -> list[AuditCheckpoint]:
    """Return every stored checkpoint, smallest size first."""
    rows = await r.fetchall("SELECT * FROM audit_checkpoints ORDER BY size")
    return [_checkpoint(row) for row in rows]


# -- verifying -------------------------------------------------------------------------------


def _walk_chain(records: Sequence[AuditRecord]) -> tuple[int | None, str | None]:
    """Return (first bad index, reason) of the hash chain, or (None, None) if it links up."""
    prev = GENESIS_HASH
    for position, rec in enumerate(records):
        if rec.index != position:
            if rec.index > position:
                why = f"record {position} is missing (found record {rec.index} in its place)"
            else:
                why = f"records are out of order (found record {rec.index} at position {position})"
            return position, why
        if record_hash(rec.hashed_fields()) != rec.hash:
            return position, f"record {position} was edited (its hash does not match its content)"
        if rec.prev_hash != prev:
            if position == 0:
                return 0, "record 0 does not start the chain"
            # Both records are self-consistent (record position-1 passed the check above), yet
            # this one chains to something else: record position-1 was edited and re-hashed. It
            # is the first record the chain no longer vouches for.
            return position - 1, (
                f"record {position - 1} does not match the hash record {position} chains to "
                "(edited and re-hashed)"
            )
        prev = rec.hash
    return None, None


def verify_audit(
    records: Sequence[AuditRecord],
    checkpoints: Iterable[AuditCheckpoint],
    public_key: bytes,
    *,
    anchor: Anchor | None = None,
) -> AuditReport:
    """Verify the chain, every checkpoint and the checkpoint chain, and the log against
    ``anchor`` when one is given; name the first record that was tampered with.

    ``records`` are taken in the order given (as exported, or as stored by index). Every
    checkpoint must carry a valid signature by ``public_key``, name the checkpoint before it,
    and the log must still contain the exact prefix it commits to; a log shorter than a
    checkpoint or the anchor was truncated, and the first missing index is reported.
    """
    bad_index, reason = _walk_chain(records)
    walk = _Walk(
        size=len(records),
        head=records[-1].hash if records else GENESIS_HASH,
        bad_index=bad_index,
        reason=reason,
        hashes=None,
        records=records,
    )
    return _judge(walk, checkpoints, public_key, anchor=anchor)


@dataclass
class _Walk:
    """What the chain walk learnt: size, head, first bad record, and the hashes at the
    positions the checkpoints and the anchor name (all that the rest of verification reads)."""

    size: int
    head: str
    bad_index: int | None
    reason: str | None
    hashes: dict[int, str] | None
    records: Sequence[AuditRecord] | None = None

    def hash_at(self, position: int) -> str:
        """The stored hash of the record at ``position`` (< size), GENESIS_HASH for -1."""
        if position < 0:
            return GENESIS_HASH
        if self.hashes is not None and position in self.hashes:
            return self.hashes[position]
        assert self.records is not None, "the walk kept no hash at this position"
        return self.records[position].hash


def _judge(
    walk: _Walk,
    checkpoints: Iterable[AuditCheckpoint],
    public_key: bytes,
    *,
    anchor: Anchor | None = None,
) -> AuditReport:
    """The report of a walked log against its checkpoints and ``anchor``."""
    bad_index, reason = walk.bad_index, walk.reason
    size = walk.size
    head = walk.head
    verified = 0
    bad_cp: int | None = None
    cp_reason: str | None = None
    last_good_size = 0
    previous: AuditCheckpoint | None = None
    ordered = sorted(checkpoints, key=lambda c: c.size)
    for cp in ordered:
        if not _signed(cp, public_key):
            bad_cp, cp_reason = cp.size, f"checkpoint at size {cp.size} has no valid signature"
            break
        chained = cp.follows(previous) if cp.v == 2 else previous is None or previous.v == 1
        if not chained:
            bad_cp = cp.size
            if cp.prev_size is not None and (previous is None or previous.size != cp.prev_size):
                cp_reason = (
                    f"checkpoint at size {cp.size} names a checkpoint at size {cp.prev_size} "
                    "that is not there (checkpoint rows were deleted)"
                )
            else:
                cp_reason = f"checkpoint at size {cp.size} does not chain to the one before it"
            break
        previous = cp
        if cp.size > size:
            candidate = size
            why = f"log truncated: checkpoint covers {cp.size} records but only {size} remain"
        else:
            at_head = walk.hash_at(cp.size - 1)
            if at_head == cp.head_hash:
                verified += 1
                last_good_size = cp.size
                continue
            if bad_index is not None and bad_index < cp.size:
                break  # the chain walk already named the first bad record inside this prefix
            # The chain links up to cp.size but differs from what was signed: records after the
            # last verified checkpoint were rewritten wholesale (re-hashed), so the first record
            # no signature vouches for any more is the one to name.
            candidate = last_good_size
            why = f"records before {cp.size} were rewritten: head hash differs from checkpoint"
        if bad_index is None or candidate < bad_index:
            bad_index, reason = candidate, why
        break
    if anchor is not None:
        bad_index, reason, anchor_cp, anchor_reason = _check_anchor(
            anchor, walk, ordered, public_key, bad_index, reason
        )
        if anchor_cp is not None and bad_cp is None:
            bad_cp, cp_reason = anchor_cp, anchor_reason
    if bad_index is None and bad_cp is not None:
        reason = cp_reason
    ok = bad_index is None and bad_cp is None
    return AuditReport(
        ok=ok,
        size=size,
        head_hash=head,
        checkpoints_verified=verified,
        first_bad_index=bad_index,
        bad_checkpoint_size=bad_cp,
        reason=None if ok else reason or cp_reason,
        anchor_size=None if anchor is None else anchor.size,
    )


def _check_anchor(
    anchor: Anchor,
    walk: _Walk,
    checkpoints: Sequence[AuditCheckpoint],
    public_key: bytes,
    bad_index: int | None,
    reason: str | None,
) -> tuple[int | None, str | None, int | None, str | None]:
    """Check the log against an anchor kept elsewhere: (bad index, why, bad checkpoint, why)."""
    size = walk.size
    if anchor.checkpoint is not None and not _signed(anchor.checkpoint, public_key):
        return bad_index, reason, anchor.size, "the anchor is not signed by this controller's key"
    candidate: int | None = None
    why = ""
    if size < anchor.size:
        candidate = size
        why = f"log truncated: the anchor covers {anchor.size} records but only {size} remain"
    elif walk.hash_at(anchor.size - 1) != anchor.head_hash:
        vouched = [
            cp.size
            for cp in checkpoints
            if cp.size < anchor.size and walk.hash_at(cp.size - 1) == cp.head_hash
        ]
        candidate = max(vouched, default=0)
        why = f"records before {anchor.size} were rewritten: head hash differs from the anchor"
    if candidate is not None:
        if bad_index is None or candidate < bad_index:
            return candidate, why, None, None
        return bad_index, reason, None, None
    match = next((cp for cp in checkpoints if cp.size == anchor.size), None)
    if match is None or (
        anchor.checkpoint is not None and match.signature != anchor.checkpoint.signature
    ):
        return (
            bad_index,
            reason,
            anchor.size,
            f"the anchored checkpoint (size {anchor.size}) is not in the log: checkpoint rows "
            "were deleted",
        )
    return bad_index, reason, None, None


async def verify_store(
    store: Store, public_key: bytes, *, anchor: Anchor | None = None
) -> AuditReport:
    """Verify the audit log stored in ``store`` (one read snapshot), against ``anchor`` if given.

    A file store is verified in a worker thread on a connection of its own, streaming the
    records in slices: memory stays constant and the event loop is never held, however long
    the log. An in-memory store (tests) has no second connection and is loaded whole.
    """
    if store.dialect.name == "postgresql":
        return await _verify_sliced(store, public_key, anchor)
    if store.is_memory:
        async with store.read() as r:
            records = await load_records(r)
            checkpoints = await load_checkpoints(r)
        return verify_audit(records, checkpoints, public_key, anchor=anchor)
    return await asyncio.to_thread(_verify_file, store.path, public_key, anchor)


async def _verify_sliced(store: Store, public_key: bytes, anchor: Anchor | None) -> AuditReport:
    """:func:`verify_store` over a server connection: one read snapshot, the records read in
    slices of :data:`STREAM_SLICE` by index and walked slice after slice (constant memory)."""
    async with store.read() as r:
        checkpoints = await load_checkpoints(r)
        wanted = {cp.size - 1 for cp in checkpoints}
        if anchor is not None:
            wanted.add(anchor.size - 1)
        walk = _Walk(size=0, head=GENESIS_HASH, bad_index=None, reason=None, hashes={})
        after = -1
        while True:
            rows = await r.fetchall(
                f"SELECT {_RECORD_COLUMNS} FROM audit WHERE idx > ? "  # noqa: S608
                "ORDER BY idx LIMIT ?",
                (after, STREAM_SLICE),
            )
            if not rows:
                break
            after = int(rows[-1][0])
            part = walk_rows(
                [tuple(row) for row in rows], start=walk.size, prev=walk.head, wanted=wanted
            )
            first_bad = walk.bad_index is None and part.bad_index is not None
            walk = _Walk(
                size=part.size,
                head=part.head,
                bad_index=part.bad_index if first_bad else walk.bad_index,
                reason=part.reason if first_bad else walk.reason,
                hashes={**(walk.hashes or {}), **(part.hashes or {})},
            )
    return _judge(walk, checkpoints, public_key, anchor=anchor)


STREAM_SLICE = 10_000
"""Records read per slice when a log is verified streamed."""

_RECORD_COLUMNS = "idx, at, actor, action, object, outcome, details, prev_hash, hash"
_ENCODE = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def _verify_file(path: str, public_key: bytes, anchor: Anchor | None) -> AuditReport:
    """:func:`verify_store` for a file, in the calling (worker) thread."""
    conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for the checkpoints and every record
        conn.row_factory = sqlite3.Row
        checkpoints = [
            _checkpoint(row)
            for row in conn.execute("SELECT * FROM audit_checkpoints ORDER BY size")
        ]
        conn.row_factory = None
        wanted = {cp.size - 1 for cp in checkpoints}
        if anchor is not None:
            wanted.add(anchor.size - 1)
        cursor = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM audit ORDER BY idx")  # noqa: S608
        walk = walk_rows(_slices(cursor), wanted=wanted)
        return _judge(walk, checkpoints, public_key, anchor=anchor)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the audit log: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _slices(cursor: sqlite3.Cursor) -> Iterator[tuple[Any, ...]]:
    while rows := cursor.fetchmany(STREAM_SLICE):
        yield from rows


def _row_hash(row: tuple[Any, ...]) -> str:
    """The hash a stored record should carry, computed from its row.

    Fast form first: the stored details text is the canonical JSON ``append`` wrote, so the
    hashed bytes are assembled around it. When that does not match, the exact form decides
    (details parsed and re-encoded, as :func:`record_hash` of the record would).
    """
    idx, at, actor, action, obj, outcome, details, prev, _ = row
    try:
        fast = (
            f'{{"action":{_ENCODE(str(action))},"actor":{_ENCODE(str(actor))},'
            f'"at":{_ENCODE(str(at))},"details":{details},"index":{int(idx)},'
            f'"object":{_ENCODE(str(obj))},"outcome":{_ENCODE(str(outcome))},'
            f'"prev_hash":{_ENCODE(str(prev))}}}'
        )
        digest = hashlib.sha256(fast.encode("utf-8")).hexdigest()
    except (ValueError, TypeError):
        digest = ""
    if digest == row[8]:
        return digest
    fields = {
        "index": int(idx),
        "at": str(at),
        "actor": str(actor),
        "action": str(action),
        "object": str(obj),
        "outcome": str(outcome),
        "details": _details(str(details)),
        "prev_hash": str(prev),
    }
    try:
        return record_hash(fields)
    except CKMSError:
        return ""  # not encodable: cannot match any stored hash


def walk_rows(
    rows: Iterable[tuple[Any, ...]],
    *,
    start: int = 0,
    prev: str = GENESIS_HASH,
    wanted: Collection[int] = (),
) -> _Walk:
    """Walk stored record rows (``idx, at, actor, action, object, outcome, details, prev_hash,
    hash``, by index) from position ``start``, chaining onto ``prev``: the same verdicts as
    :func:`verify_audit`'s walk, one row at a time, keeping only the hashes at ``wanted``."""
    position = start
    head = prev
    bad: tuple[int, str] | None = None
    hashes: dict[int, str] = {}
    for row in rows:
        stored = str(row[8])
        if bad is None:
            index = int(row[0])
            if index != position:
                if index > position:
                    why = f"record {position} is missing (found record {index} in its place)"
                else:
                    why = f"records are out of order (found record {index} at position {position})"
                bad = (position, why)
            elif _row_hash(row) != stored:
                why = f"record {position} was edited (its hash does not match its content)"
                bad = (position, why)
            elif str(row[7]) != head:
                if position == 0:
                    bad = (0, "record 0 does not start the chain")
                else:
                    bad = (
                        position - 1,
                        f"record {position - 1} does not match the hash record {position} "
                        "chains to (edited and re-hashed)",
                    )
        if position in wanted:
            hashes[position] = stored
        head = stored
        position += 1
    return _Walk(
        size=position,
        head=head,
        bad_index=None if bad is None else bad[0],
        reason=None if bad is None else bad[1],
        hashes=hashes,
    )


# -- export ----------------------------------------------------------------------------------


def _record_line(rec: AuditRecord) -> str:
    return canonical_json({"kind": "record", **rec.hashed_fields(), "hash": rec.hash}).decode()


def checkpoint_line(cp: AuditCheckpoint) -> str:
    """One checkpoint as an export line (and as the anchor topic carries it)."""
    line: dict[str, Any] = {
        "kind": "checkpoint",
        "size": cp.size,
        "head_hash": cp.head_hash,
        "at": cp.at,
        "signer_key_id": cp.signer_key_id,
        "signature": base64.b64encode(cp.signature).decode("ascii"),
    }
    if cp.v == 2:
        line.update(
            v=2, prev_size=cp.prev_size, prev_head=cp.prev_head, prev_sig_hash=cp.prev_sig_hash
        )
    return canonical_json(line).decode()


def parse_checkpoint_line(text: str | bytes) -> AuditCheckpoint:
    """Parse one checkpoint line (an export's, or an anchor topic record); ValueError if not."""
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.pop("kind", None) != "checkpoint":
            raise ValueError("not a checkpoint")
        obj["signature"] = base64.b64decode(obj["signature"], validate=True)
        return AuditCheckpoint(**obj)
    except (KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ValueError(f"not a checkpoint line: {exc}") from None


def parse_anchor(text: str) -> Anchor:
    """Parse ``SIZE:HEAD`` (as ``ckms status`` and ``ckms audit verify`` print the anchor)."""
    size_text, sep, head = text.strip().partition(":")
    if not sep or not size_text.isdigit() or len(head) != 64:
        raise ValueError("expected SIZE:HEAD, e.g. 1234:<64 hex digits>")
    try:
        int(head, 16)
    except ValueError:
        raise ValueError("the head of an anchor is 64 hex digits") from None
    return Anchor(size=int(size_text), head_hash=head.lower())


async def export_jsonl(store: Store) -> AsyncIterator[str]:
    """Yield the log as JSON lines (no newline): every record, then every checkpoint.

    One read snapshot, so records and checkpoints are consistent with each other.
    """
    async with store.read() as r:
        records = await load_records(r)
        checkpoints = await load_checkpoints(r)
    for rec in records:
        yield _record_line(rec)
    for cp in checkpoints:
        yield checkpoint_line(cp)


def parse_jsonl(lines: Iterable[str]) -> tuple[list[AuditRecord], list[AuditCheckpoint]]:
    """Parse an export back into records (in file order) and checkpoints for :func:`verify_audit`.

    A line that is not a valid record raises AuditVerificationError naming its position among
    the records, since it cannot be part of an intact log.
    """
    records: list[AuditRecord] = []
    checkpoints: list[AuditCheckpoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            kind = obj.pop("kind")
            if kind == "record":
                records.append(AuditRecord(**obj))
            elif kind == "checkpoint":
                obj["signature"] = base64.b64decode(obj["signature"], validate=True)
                checkpoints.append(AuditCheckpoint(**obj))
            else:
                raise ValueError(kind)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuditVerificationError(
                f"line {number} of the export is not a valid audit record or checkpoint",
                index=len(records),
            ) from exc
    return records, checkpoints
