"""The audit log: append-only, hash-chained, with signed checkpoints.

Record ``i`` carries ``prev_hash`` (the hash of record ``i-1``, or :data:`GENESIS_HASH` for
record 0) and ``hash = sha256(canonical_json({index, at, actor, action, object, outcome, details,
prev_hash}))`` as lowercase hex. Records never hold key material; callers HMAC identifiers that
are sensitive (``hmac_identifier`` with the controller's audit key) before passing ``details``.

A checkpoint is the controller's Ed25519 signature over the canonical JSON of ``{"ctx":
"ckms.audit.checkpoint.v1", "size", "head", "at"}``: it commits to the first ``size`` records.
:func:`verify_audit` walks the chain and checks every checkpoint, so an edited, removed,
reordered or truncated record is found and named by index.

Limits, stated plainly: records appended after the newest checkpoint are protected only by the
chain, so cutting them off the tail is detected only against a checkpoint that covers them;
and someone who can rewrite the database can delete checkpoints too. Keep an exported
checkpoint (``ckms audit export``) outside the controller to anchor it.

Appending happens inside the caller's write transaction (:func:`append`), so the operation it
records and the record commit together; if the record cannot be written, the caller's whole
transaction fails with :class:`~ckms.errors.AuditError` (fail closed).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckms._canonical import canonical_json
from ckms.crypto import signer_key_id, verify_signature
from ckms.errors import AuditError, AuditVerificationError, CKMSError, StoreError
from ckms.store._store import Reader, Store, Transaction
from ckms.store._time import format_time, parse_time

__all__ = [
    "GENESIS_HASH",
    "AuditCheckpoint",
    "AuditRecord",
    "AuditReport",
    "Outcome",
    "append",
    "checkpoint",
    "checkpoint_message",
    "export_jsonl",
    "load_checkpoints",
    "load_records",
    "parse_jsonl",
    "record_hash",
    "verify_audit",
    "verify_store",
]

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of record 0."""

CHECKPOINT_CONTEXT = "ckms.audit.checkpoint.v1"

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
    """A signed commitment to the first ``size`` records, whose last hash is ``head_hash``."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(ge=0)
    head_hash: str
    at: str
    signer_key_id: str
    signature: bytes


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


async def _head(r: Reader) -> tuple[int, str]:
    """Return (number of records, hash of the last one or GENESIS_HASH)."""
    row = await r.fetchone("SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1")
    if row is None:
        return 0, GENESIS_HASH
    return int(row["idx"]) + 1, str(row["hash"])


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
) -> AuditRecord:
    """Append one record in the caller's write transaction; any failure raises AuditError."""
    fields = {
        "at": format_time(now),
        "actor": actor,
        "action": action,
        "object": object,
        "outcome": outcome,
        "details": dict(details or {}),
    }
    try:
        head = tx.audit_head
        if head is not None:
            try:
                return await _insert(tx, head, fields)
            except StoreError:
                # The head kept in memory is stale: another connection appended (an operator's
                # tool on the same file). Chain onto the real head instead.
                pass
        return await _insert(tx, await _head(tx), fields)
    except (CKMSError, ValueError) as exc:
        append_failures.count += 1
        raise AuditError(
            f"audit record for {action} on {object} could not be written: {exc}"
        ) from exc


async def _insert(tx: Transaction, head: tuple[int, str], fields: dict[str, Any]) -> AuditRecord:
    size, prev = head
    record_fields = {"index": size, **fields, "prev_hash": prev}
    digest = record_hash(record_fields)
    await tx.insert(
        "INSERT INTO audit(idx, at, actor, action, object, outcome, details, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            size,
            fields["at"],
            fields["actor"],
            fields["action"],
            fields["object"],
            fields["outcome"],
            canonical_json(fields["details"]).decode("utf-8"),
            prev,
            digest,
        ),
    )
    tx.audit_head = (size + 1, digest)
    return AuditRecord(hash=digest, **record_fields)


async def checkpoint(
    store: Store, *, sign: Callable[[bytes], bytes], public_key: bytes, now: datetime
) -> AuditCheckpoint:
    """Sign and store a checkpoint of the log as it is now (or return the one already there)."""
    async with store.write() as tx:
        size, head = await _head(tx)
        row = await tx.fetchone("SELECT * FROM audit_checkpoints WHERE size = ?", (size,))
        if row is not None:
            return _checkpoint(row)
        at = format_time(now)
        signature = sign(checkpoint_message(size, head, at))
        cp = AuditCheckpoint(
            size=size,
            head_hash=head,
            at=at,
            signer_key_id=signer_key_id(public_key),
            signature=signature,
        )
        try:
            await tx.insert(
                "INSERT INTO audit_checkpoints(size, head_hash, at, signer_key_id, signature) "
                "VALUES (?, ?, ?, ?, ?)",
                (cp.size, cp.head_hash, cp.at, cp.signer_key_id, cp.signature),
            )
        except StoreError as exc:
            raise AuditError(f"audit checkpoint could not be written: {exc}") from exc
        return cp


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
) -> AuditReport:
    """Verify the chain and every checkpoint; name the first record that was tampered with.

    ``records`` are taken in the order given (as exported, or as stored by index). Every
    checkpoint must carry a valid signature by ``public_key`` and the log must still contain the
    exact prefix it commits to; a log shorter than a checkpoint was truncated, and the first
    missing index is reported.
    """
    bad_index, reason = _walk_chain(records)
    size = len(records)
    head = records[-1].hash if records else GENESIS_HASH
    expected_kid = signer_key_id(public_key)
    verified = 0
    bad_cp: int | None = None
    cp_reason: str | None = None
    last_good_size = 0
    for cp in sorted(checkpoints, key=lambda c: c.size):
        try:
            if cp.signer_key_id != expected_kid:
                raise AuditVerificationError("signed by another key")
            verify_signature(
                public_key, checkpoint_message(cp.size, cp.head_hash, cp.at), cp.signature
            )
        except CKMSError:
            bad_cp, cp_reason = cp.size, f"checkpoint at size {cp.size} has no valid signature"
            break
        if cp.size > size:
            candidate = size
            why = f"log truncated: checkpoint covers {cp.size} records but only {size} remain"
        else:
            at_head = records[cp.size - 1].hash if cp.size else GENESIS_HASH
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
    )


async def verify_store(store: Store, public_key: bytes) -> AuditReport:
    """Verify the audit log stored in ``store`` (one read snapshot)."""
    async with store.read() as r:
        records = await load_records(r)
        checkpoints = await load_checkpoints(r)
    return verify_audit(records, checkpoints, public_key)


# -- export ----------------------------------------------------------------------------------


def _record_line(rec: AuditRecord) -> str:
    return canonical_json({"kind": "record", **rec.hashed_fields(), "hash": rec.hash}).decode()


def _checkpoint_line(cp: AuditCheckpoint) -> str:
    return canonical_json(
        {
            "kind": "checkpoint",
            "size": cp.size,
            "head_hash": cp.head_hash,
            "at": cp.at,
            "signer_key_id": cp.signer_key_id,
            "signature": base64.b64encode(cp.signature).decode("ascii"),
        }
    ).decode()


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
        yield _checkpoint_line(cp)


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
