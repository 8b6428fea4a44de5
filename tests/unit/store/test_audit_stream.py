"""Streamed verification (constant memory, off the loop) says exactly what a whole-log load
says; the periodic checkpoint verifies only the records it adds, and never signs over an edit."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ckms.errors import AuditAnchorError
from ckms.store import Store
from ckms.store import audit as audit_log
from tests.support.audit import T0
from tests.support.audit import checkpoint as _checkpoint
from tests.support.stores import StoreTarget


async def _build(store: Store, n: int, *, start: int = 0) -> None:
    async with store.write() as tx:
        for i in range(start, start + n):
            await audit_log.append(
                tx,
                now=T0 + timedelta(minutes=i),
                actor="alice",
                action="key.rotate",
                object=f"key:team/k{i}",
                details={"version": i, "note": 'é \u2028 "q"'},
            )


TAMPERS = {
    "intact": (),
    "edited": ("UPDATE audit SET actor = 'mallory' WHERE idx = 13",),
    "deleted": ("DELETE FROM audit WHERE idx = 4",),
    "truncated": ("DELETE FROM audit WHERE idx >= 9",),
    "tail edited": ("UPDATE audit SET outcome = 'refused' WHERE idx = 18",),
    "rehashed": ("UPDATE audit SET hash = 'x' || substr(hash, 2) WHERE idx = 15",),
    "details re-spaced": ("UPDATE audit SET details = '{\"note\": 1}' WHERE idx = 2",),
    "checkpoint gone": ("DELETE FROM audit_checkpoints WHERE size = 8",),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_streamed_verdict_equals_the_whole_log_verdict(
    store_target: StoreTarget,
    signing_pair: tuple[bytes, bytes],
    monkeypatch: pytest.MonkeyPatch,
    tamper: str,
) -> None:
    monkeypatch.setattr(audit_log, "STREAM_SLICE", 3)  # many slices even for a small log
    async with await store_target.open() as store:
        await _build(store, 8)
        await _checkpoint(store, signing_pair)
        await _build(store, 8, start=8)
        cp = await _checkpoint(store, signing_pair)
        await _build(store, 4, start=16)
    await store_target.tamper(*TAMPERS[tamper])
    anchor = audit_log.Anchor.of(cp)
    async with await store_target.open() as store:
        streamed = await audit_log.verify_store(store, signing_pair[1], anchor=anchor)
        whole = audit_log.verify_audit(
            await audit_log.load_records(store),
            await audit_log.load_checkpoints(store),
            signing_pair[1],
            anchor=anchor,
        )
    assert streamed == whole
    assert streamed.ok is (tamper == "intact")


async def test_a_canonically_hashed_record_stored_with_other_spacing_still_verifies(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    """Details stored as non-canonical text whose canonical form was hashed: as before."""
    async with await store_target.open() as store:
        await _build(store, 3)
    await store_target.tamper(
        "UPDATE audit SET details = replace(details, ',', ' , ') WHERE idx = 1"
    )
    async with await store_target.open() as store:
        assert (await audit_log.verify_store(store, signing_pair[1])).ok


async def test_checkpoint_refuses_to_sign_over_an_edited_record_after_the_last_one(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    async with await store_target.open() as store:
        await _build(store, 5)
        await _checkpoint(store, signing_pair)
        await _build(store, 5, start=5)
    await store_target.tamper("UPDATE audit SET actor = 'mallory' WHERE idx = 7")
    async with await store_target.open() as store:
        with pytest.raises(AuditAnchorError, match="record 7 was edited"):
            await _checkpoint(store, signing_pair)
        assert [cp.size for cp in await audit_log.load_checkpoints(store)] == [5]


async def test_checkpoint_hashes_only_the_records_it_adds(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await store_target.open() as store:
        await _build(store, 50)
        await _checkpoint(store, signing_pair)
        await _build(store, 3, start=50)
        hashed: list[int] = []
        real = audit_log._row_hash

        def counting(row: tuple[object, ...]) -> str:
            hashed.append(int(row[0]))  # type: ignore[call-overload]
            return real(row)

        monkeypatch.setattr(audit_log, "_row_hash", counting)
        cp = await _checkpoint(store, signing_pair)
        assert cp.size == 53 and hashed == [50, 51, 52]
