"""The audit log: hash chain, signed checkpoints, and tampering with the real SQLite file."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest

from ckms.crypto import generate_signing_key, signing_public_key
from ckms.errors import AuditError, AuditVerificationError, StoreError
from ckms.store import Store
from ckms.store import audit as audit_log
from ckms.store._store import DEFER_AT_MOST
from tests.support.audit import T0
from tests.support.audit import build_log as _build
from tests.support.audit import checkpoint as _checkpoint
from tests.support.stores import StoreTarget, refuse_audit_inserts, refuse_inserts


async def _verify_file(store_target: StoreTarget, public: bytes) -> audit_log.AuditReport:
    async with await store_target.open() as store:
        return await audit_log.verify_store(store, public)


@pytest.fixture
async def ten_records(store_target: StoreTarget, signing_pair: tuple[bytes, bytes]) -> StoreTarget:
    """A store with 10 records, a checkpoint at 5 and one at 10; closed again."""
    async with await store_target.open() as store:
        await _build(store, 5)
        await _checkpoint(store, signing_pair)
        await _build(store, 5, start=5)
        await _checkpoint(store, signing_pair)
    return store_target


async def test_intact_log_verifies(
    ten_records: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    report = await _verify_file(ten_records, signing_pair[1])
    assert report.ok, report.reason
    assert report.size == 10
    assert report.checkpoints_verified == 2
    report.raise_if_bad()


async def test_records_chain_by_hash(mem_store: Store) -> None:
    await _build(mem_store, 3)
    records = await audit_log.load_records(mem_store)
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].prev_hash == audit_log.GENESIS_HASH
    for prev, rec in itertools.pairwise(records):
        assert rec.prev_hash == prev.hash
        assert audit_log.record_hash(rec.hashed_fields()) == rec.hash


@pytest.mark.parametrize(
    ("statements", "bad_index"),
    [
        pytest.param(["UPDATE audit SET actor = 'mallory' WHERE idx = 3"], 3, id="edit-actor"),
        pytest.param(
            ["UPDATE audit SET details = '{\"version\":99}' WHERE idx = 7"], 7, id="edit-details"
        ),
        pytest.param(["UPDATE audit SET details = 'not json' WHERE idx = 2"], 2, id="garble"),
        pytest.param(["DELETE FROM audit WHERE idx = 4"], 4, id="delete"),
        pytest.param(["DELETE FROM audit WHERE idx = 0"], 0, id="delete-first"),
        pytest.param(
            [
                "UPDATE audit SET idx = 1000 WHERE idx = 3",
                "UPDATE audit SET idx = 3 WHERE idx = 4",
                "UPDATE audit SET idx = 4 WHERE idx = 1000",
            ],
            3,
            id="reorder",
        ),
        pytest.param(["DELETE FROM audit WHERE idx >= 8"], 8, id="truncate-below-checkpoint"),
        pytest.param(["DELETE FROM audit WHERE idx >= 2"], 2, id="truncate-deep"),
    ],
)
@pytest.mark.requirement("SP800-130-AUDIT")
async def test_tampered_file_names_first_bad_record(
    ten_records: StoreTarget,
    signing_pair: tuple[bytes, bytes],
    statements: list[str],
    bad_index: int,
) -> None:
    await ten_records.tamper(*statements)
    report = await _verify_file(ten_records, signing_pair[1])
    assert not report.ok
    assert report.first_bad_index == bad_index, report.reason
    with pytest.raises(AuditVerificationError) as info:
        report.raise_if_bad()
    assert info.value.index == bad_index


async def test_edit_and_rehash_one_record_is_found(
    ten_records: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    async with await ten_records.open() as store:
        rec = (await audit_log.load_records(store))[6]
    forged = rec.model_copy(update={"actor": "mallory"})
    new_hash = audit_log.record_hash(forged.hashed_fields())
    await ten_records.tamper(
        f"UPDATE audit SET actor = 'mallory', hash = '{new_hash}' WHERE idx = 6"  # noqa: S608
    )
    report = await _verify_file(ten_records, signing_pair[1])
    assert report.first_bad_index == 6, report.reason


async def test_rewriting_the_tail_is_caught_by_the_checkpoint(
    ten_records: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    # Rewrite records 5..9 and re-chain them: the chain links up, only the checkpoint at 10 knows.
    async with await ten_records.open() as store:
        records = await audit_log.load_records(store)
    prev = records[4].hash
    statements = []
    for rec in records[5:]:
        forged = rec.model_copy(update={"actor": "mallory", "prev_hash": prev})
        prev = audit_log.record_hash(forged.hashed_fields())
        statements.append(
            "UPDATE audit SET actor = 'mallory', "  # noqa: S608 - the test is the attacker
            f"prev_hash = '{forged.prev_hash}', hash = '{prev}' WHERE idx = {rec.index}"
        )
    await ten_records.tamper(*statements)
    report = await _verify_file(ten_records, signing_pair[1])
    assert not report.ok
    assert report.first_bad_index == 5  # first record after the last checkpoint that still holds
    assert report.checkpoints_verified == 1


async def test_truncating_records_after_the_last_checkpoint_is_not_detectable(
    ten_records: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    # The documented limit: records newer than every checkpoint are only chained, not signed.
    async with await ten_records.open() as store:
        await _build(store, 3, start=10)
    await ten_records.tamper("DELETE FROM audit WHERE idx >= 11")
    assert (await _verify_file(ten_records, signing_pair[1])).ok


async def test_forged_checkpoint_signature_is_reported(
    ten_records: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    await ten_records.tamper(
        "UPDATE audit_checkpoints SET head_hash = 'ff' || substr(head_hash, 3)"
    )
    report = await _verify_file(ten_records, signing_pair[1])
    assert not report.ok
    assert report.first_bad_index is None
    assert report.bad_checkpoint_size == 5
    assert "signature" in (report.reason or "")


async def test_checkpoint_by_another_key_is_reported(ten_records: StoreTarget) -> None:
    other_public = signing_public_key(generate_signing_key())
    report = await _verify_file(ten_records, other_public)
    assert not report.ok
    assert report.bad_checkpoint_size == 5


async def test_checkpoint_is_idempotent_when_the_log_did_not_move(
    mem_store: Store, signing_pair: tuple[bytes, bytes]
) -> None:
    await _build(mem_store, 2)
    first = await _checkpoint(mem_store, signing_pair)
    again = await _checkpoint(mem_store, signing_pair)
    assert first == again
    assert len(await audit_log.load_checkpoints(mem_store)) == 1


async def test_empty_log_verifies(mem_store: Store, signing_pair: tuple[bytes, bytes]) -> None:
    await _checkpoint(mem_store, signing_pair)
    assert (await audit_log.verify_store(mem_store, signing_pair[1])).ok


async def test_audit_table_refuses_update_and_delete(mem_store: Store) -> None:
    await _build(mem_store, 1)
    for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
        with pytest.raises(StoreError, match="append-only"):
            async with mem_store.write() as tx:
                await tx.execute(statement)


@pytest.mark.requirement("SP800-130-AUDIT")
async def test_failed_append_raises_audit_error_and_rolls_back(mem_store: Store) -> None:
    await refuse_audit_inserts(mem_store)
    with pytest.raises(AuditError, match="could not be written"):
        async with mem_store.write() as tx:
            await tx.set_meta("change", b"guarded")
            await audit_log.append(tx, now=T0, actor="a", action="x", object="y")
    assert await mem_store.get_meta("change") is None


async def test_a_failed_append_after_earlier_ones_rolls_back_its_whole_transaction(
    store_target: StoreTarget,
) -> None:
    # With the log's head in memory SQLite defers the insert to the commit's trip to its
    # thread: the failure must still come out of the block and take the change with it.
    async with await store_target.open() as store:
        await _build(store, 2)
        await refuse_audit_inserts(store)
        before = audit_log.append_failures.count
        with pytest.raises(AuditError, match="could not be written"):
            async with store.write() as tx:
                await tx.set_meta("change", b"guarded")
                await audit_log.append(tx, now=T0, actor="a", action="x", object="y")
        assert await store.get_meta("change") is None
        assert audit_log.append_failures.count == before + 1
        assert len(await audit_log.load_records(store)) == 2


async def test_a_failed_record_among_many_is_counted_once_and_named(
    store_target: StoreTarget,
) -> None:
    async with await store_target.open() as store:
        await _build(store, 2)
        await refuse_inserts(store, "audit", "refused", when="NEW.object = 'bad'")
        before = audit_log.append_failures.count
        with pytest.raises(AuditError, match="record for x on bad could not be written"):
            async with store.write() as tx:
                await audit_log.append(tx, now=T0, actor="a", action="x", object="bad")
                for i in range(DEFER_AT_MOST):  # a flush of the deferred ones comes among them
                    await audit_log.append(tx, now=T0, actor="a", action="y", object=f"ok{i}")
        assert audit_log.append_failures.count == before + 1
        assert len(await audit_log.load_records(store)) == 2


async def test_a_failed_record_before_a_batch_is_counted_once_and_named(
    store_target: StoreTarget,
) -> None:
    async with await store_target.open() as store:
        await _build(store, 2)
        await refuse_inserts(store, "audit", "refused", when="NEW.object = 'bad'")
        before = audit_log.append_failures.count
        with pytest.raises(AuditError, match="record for x on bad could not be written"):
            async with store.write() as tx:
                await audit_log.append(tx, now=T0, actor="a", action="x", object="bad")
                entries = [audit_log.Entry(actor="a", action="y", object="ok", details={})]
                await audit_log.append_many(tx, entries, now=T0)
        assert audit_log.append_failures.count == before + 1


async def test_a_block_that_swallows_a_failed_record_commits_nothing(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    async with await store_target.open() as store:
        await _build(store, 2)
        await refuse_inserts(store, "audit", "refused", when="NEW.object = 'bad'")
        with pytest.raises(StoreError):
            async with store.write() as tx:
                with contextlib.suppress(StoreError):
                    await audit_log.append(tx, now=T0, actor="a", action="x", object="bad")
                    await tx.set_meta("first", b"1")
                await tx.set_meta("change", b"2")
                await audit_log.append(tx, now=T0, actor="a", action="x", object="after")
        assert await store.get_meta("first") is None
        assert await store.get_meta("change") is None
        assert len(await audit_log.load_records(store)) == 2
        assert (await audit_log.verify_store(store, signing_pair[1])).ok


async def test_records_appended_in_a_block_are_seen_by_its_next_statement(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    async with await store_target.open() as store:
        await _build(store, 2)
        async with store.write() as tx:
            await audit_log.append(tx, now=T0, actor="a", action="x", object="one")
            await audit_log.append(tx, now=T0, actor="a", action="x", object="two")
            assert await tx.fetchval("SELECT count(*) FROM audit") == 4
            await audit_log.append(tx, now=T0, actor="a", action="x", object="three")
        records = await audit_log.load_records(store)
        assert [r.object for r in records[2:]] == ["one", "two", "three"]
        assert (await audit_log.verify_store(store, signing_pair[1])).ok


async def test_export_round_trips_and_tampered_export_is_named(
    ten_records: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    async with await ten_records.open() as store:
        lines = [line async for line in audit_log.export_jsonl(store)]
    assert len(lines) == 12
    assert all(json.loads(line)["kind"] in ("record", "checkpoint") for line in lines)
    records, checkpoints = audit_log.parse_jsonl(lines)
    assert audit_log.verify_audit(records, checkpoints, signing_pair[1]).ok

    swapped = [*lines[:2], lines[3], lines[2], *lines[4:]]
    records, checkpoints = audit_log.parse_jsonl(swapped)
    assert audit_log.verify_audit(records, checkpoints, signing_pair[1]).first_bad_index == 2

    dropped = [*lines[:9], *lines[10:]]  # record 9 gone; the checkpoint at 10 proves it existed
    records, checkpoints = audit_log.parse_jsonl(dropped)
    assert audit_log.verify_audit(records, checkpoints, signing_pair[1]).first_bad_index == 9

    edited = list(lines)
    edited[1] = edited[1].replace('"alice"', '"mallory"')
    records, checkpoints = audit_log.parse_jsonl(edited)
    assert audit_log.verify_audit(records, checkpoints, signing_pair[1]).first_bad_index == 1

    with pytest.raises(AuditVerificationError) as info:
        audit_log.parse_jsonl([*lines[:4], "{not json", *lines[4:]])
    assert info.value.index == 4


async def test_a_record_written_by_another_connection_is_chained_onto(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    # The writer keeps the log's head in memory between appends; a record another connection
    # wrote (an operator's tool on the same file) must be chained onto, never forked from.
    async with await store_target.open() as store:
        await _build(store, 3)
        async with store.write() as tx:
            head = await tx.fetchone("SELECT hash FROM audit WHERE idx = 2")
        fields = {
            "index": 3, "at": "2025-01-01T01:00:00.000000Z", "actor": "bob",
            "action": "x", "object": "y", "outcome": "ok", "details": {},
            "prev_hash": head["hash"],
        }  # fmt: skip
        await store_target.tamper(
            "INSERT INTO audit VALUES (3, ?, 'bob', 'x', 'y', 'ok', '{}', ?, ?)",
            params=(fields["at"], head["hash"], audit_log.record_hash(fields)),
        )
        await _build(store, 2, start=4)
        records = await audit_log.load_records(store)
        assert [r.index for r in records] == [0, 1, 2, 3, 4, 5]
        assert [r.actor for r in records[3:]] == ["bob", "alice", "alice"]
        assert records[4].prev_hash == records[3].hash
        report = await audit_log.verify_store(store, signing_pair[1])
        assert report.ok
