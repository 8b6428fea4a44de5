"""Chained checkpoints and anchors: attacks by the owner of the database, on both backends.

Each attack is done on the real store with a plain connection of the owner's own (sqlite3 on
the file, a superuser connection to PostgreSQL; append-only triggers out of the way), as
someone who owns the database would. The log's own checks cannot see a clean cut of the
tail and its checkpoints; an anchor kept elsewhere can, and the controller refuses to sign over
such a log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.controller.sealing import Vault
from ckms.crypto import sign, signer_key_id
from ckms.errors import AuditAnchorError, AuditError
from ckms.store import Store
from ckms.store import audit as audit_log
from tests.support.audit import T0
from tests.support.audit import build_log as _build
from tests.support.audit import checkpoint as _checkpoint
from tests.support.stores import StoreTarget


async def _verify(
    store_target: StoreTarget, public: bytes, anchor: audit_log.Anchor | None = None
) -> audit_log.AuditReport:
    async with await store_target.open() as store:
        return await audit_log.verify_store(store, public, anchor=anchor)


@pytest.fixture
async def anchored(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> audit_log.Anchor:
    """15 records with checkpoints at 5, 10 and 15 in a closed file; returns the last anchor."""
    anchor = None
    async with await store_target.open() as store:
        for start in (0, 5, 10):
            await _build(store, 5, start=start)
            anchor = audit_log.Anchor.of(await _checkpoint(store, signing_pair, anchor))
    assert anchor is not None
    return anchor


async def test_checkpoints_name_the_one_before(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], anchored: audit_log.Anchor
) -> None:
    async with await store_target.open() as store:
        cps = await audit_log.load_checkpoints(store)
    assert [(c.v, c.size, c.prev_size) for c in cps] == [(2, 5, None), (2, 10, 5), (2, 15, 10)]
    assert cps[2].prev_head == cps[1].head_hash and cps[2].prev_sig_hash == cps[1].sig_hash
    report = await _verify(store_target, signing_pair[1], anchored)
    assert report.ok, report.reason
    assert report.anchor_size == 15 and report.checkpoints_verified == 3


async def test_a_deleted_checkpoint_row_breaks_the_checkpoint_chain(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], anchored: audit_log.Anchor
) -> None:
    """Deleting the checkpoint at 10 (say, to rewrite records 5-9 and re-sign nothing) shows
    even without an anchor: the checkpoint at 15 names it."""
    await store_target.tamper("DELETE FROM audit_checkpoints WHERE size = 10")
    report = await _verify(store_target, signing_pair[1])
    assert not report.ok
    assert report.bad_checkpoint_size == 15
    assert "names a checkpoint at size 10 that is not there" in (report.reason or "")


async def test_truncation_after_the_last_anchor_is_found_only_against_it(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], anchored: audit_log.Anchor
) -> None:
    """Records 12-14 and the checkpoint at 15 cut off together: the file alone still verifies
    (that is the limit of a log checked against itself), the anchor does not."""
    await store_target.tamper(
        "DELETE FROM audit WHERE idx >= 12",
        "DELETE FROM audit_checkpoints WHERE size > 12",
    )
    alone = await _verify(store_target, signing_pair[1])
    assert alone.ok  # a clean cut: nothing inside the file contradicts it
    report = await _verify(store_target, signing_pair[1], anchored)
    assert not report.ok and report.first_bad_index == 12
    assert "truncated" in (report.reason or "")
    async with await store_target.open() as store:
        with pytest.raises(AuditAnchorError, match="fewer than the 15"):
            await _checkpoint(store, signing_pair, anchored)
        assert [c.size for c in await audit_log.load_checkpoints(store)] == [5, 10]


async def test_a_rewritten_tail_is_found_against_the_anchor(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], anchored: audit_log.Anchor
) -> None:
    """Records 10-14 rewritten and re-hashed into a chain that links up, the checkpoint at 15
    dropped: the anchor's head no longer matches; the last record still vouched for is 10."""
    await store_target.tamper("DELETE FROM audit_checkpoints WHERE size = 15")
    rows = await store_target.query(
        "SELECT idx, at, action, object, outcome, details FROM audit WHERE idx >= 10 ORDER BY idx"
    )
    prev = (await store_target.query("SELECT hash FROM audit WHERE idx = 9"))[0][0]
    for idx, at, action, obj, outcome, details in rows:
        fields = {
            "index": idx,
            "at": at,
            "actor": "mallory",
            "action": action,
            "object": obj,
            "outcome": outcome,
            "details": audit_log._details(details),
            "prev_hash": prev,
        }
        digest = audit_log.record_hash(fields)
        await store_target.tamper(
            "UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE idx = ?",
            params=("mallory", prev, digest, idx),
        )
        prev = digest
    alone = await _verify(store_target, signing_pair[1])
    assert alone.ok  # the chain links and the remaining checkpoints (5, 10) still match
    report = await _verify(store_target, signing_pair[1], anchored)
    assert not report.ok and report.first_bad_index == 10
    assert "rewritten" in (report.reason or "")


async def test_deleting_the_newest_checkpoint_is_found_against_the_anchor(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], anchored: audit_log.Anchor
) -> None:
    await store_target.tamper("DELETE FROM audit_checkpoints WHERE size = 15")
    assert (await _verify(store_target, signing_pair[1])).ok
    report = await _verify(store_target, signing_pair[1], anchored)
    assert not report.ok and report.bad_checkpoint_size == 15
    assert "checkpoint rows were deleted" in (report.reason or "")
    # A SIZE:HEAD anchor (kept as text) finds it too.
    text = audit_log.parse_anchor(str(anchored))
    assert not (await _verify(store_target, signing_pair[1], text)).ok


async def test_the_controller_signs_only_over_a_log_that_extends_its_anchor(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes], anchored: audit_log.Anchor
) -> None:
    async with await store_target.open() as store:
        await _build(store, 3, start=15)
        cp = await _checkpoint(store, signing_pair, anchored)
        assert (cp.size, cp.prev_size) == (18, 15)
    # Record 17 (the anchor's head) rewritten, hash and all.
    await store_target.tamper(
        "UPDATE audit SET actor = 'mallory', hash = ? WHERE idx = 17", params=("f" * 64,)
    )
    async with await store_target.open() as store:
        await _build(store, 1, start=18)
        with pytest.raises(AuditAnchorError, match="differs from what the last anchor signed"):
            await _checkpoint(store, signing_pair, audit_log.Anchor.of(cp))


async def test_a_blocked_store_refuses_every_audited_write(mem_store: Store) -> None:
    mem_store.audit_blocked = "the log has 3 records, fewer than the 5 the last anchor signed"
    with pytest.raises(AuditAnchorError, match="refused until it is restored"):
        async with mem_store.write() as tx:
            await audit_log.append(tx, now=T0, actor="alice", action="key.create", object="k")
    assert await audit_log.load_records(mem_store) == []
    assert issubclass(AuditAnchorError, AuditError)


async def test_checkpoints_signed_before_chaining_still_verify_and_the_next_names_them(
    store_target: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    """A store from before checkpoints chained holds v1 rows; they verify, and the first v2
    checkpoint names the last of them."""
    private, public = signing_pair
    async with await store_target.open() as store:
        await _build(store, 4)
    message = audit_log.checkpoint_message
    head = (await store_target.query("SELECT hash FROM audit WHERE idx = 3"))[0][0]
    at = "2025-01-01T00:00:00Z"
    await store_target.tamper(
        "INSERT INTO audit_checkpoints(size, head_hash, at, signer_key_id, signature) "
        "VALUES (4, ?, ?, ?, ?)",
        params=(head, at, signer_key_id(public), sign(private, message(4, head, at))),
    )
    async with await store_target.open() as store:
        await _build(store, 2, start=4)
        cp = await _checkpoint(store, signing_pair)
    assert (cp.v, cp.prev_size) == (2, 4)
    report = await _verify(store_target, public, audit_log.Anchor.of(cp))
    assert report.ok and report.checkpoints_verified == 2


@contextlib.asynccontextmanager
async def _unsealed_with_an_unread_anchor(
    path: Path, *, delivery_timeout_s: float
) -> AsyncIterator[tuple[Store, Vault]]:
    """An unsealed vault whose anchor topic is on a Kafka nobody answers at: not read back."""
    from ckms._kafka_security import KafkaLink, KafkaSecurity
    from ckms.controller.anchor import AuditAnchor
    from ckms.controller.sealing import init_controller

    async with await Store.open(path) as store:
        await init_controller(store, passphrase="a passphrase long enough")
        vault = Vault(store)
        await vault.unseal_with_passphrase("a passphrase long enough")
        vault.anchor = AuditAnchor(
            store,
            vault,
            kafka=KafkaLink("127.0.0.1:1", KafkaSecurity.plaintext()),
            topic="ckms.audit",
            delivery_timeout_s=delivery_timeout_s,  # how long a checkpoint waits for it
        )
        yield store, vault


async def test_nothing_is_signed_before_the_anchor_was_read_back(tmp_path: Path) -> None:
    """Kafka unreachable at start: the anchor is unknown, so no checkpoint is signed (it could
    put a signature on a log cut while the controller was stopped); records still append."""
    from ckms.errors import KafkaUnavailableError

    async with _unsealed_with_an_unread_anchor(tmp_path / "c.db", delivery_timeout_s=0.2) as (
        store,
        vault,
    ):
        with pytest.raises(KafkaUnavailableError):
            await vault.anchor.load()
        with pytest.raises(AuditAnchorError, match="not been read back"):
            await vault.checkpoint_audit()
        assert await audit_log.load_checkpoints(store) == []
        await _build(store, 1)


async def test_a_checkpoint_asked_during_the_read_back_waits_for_it_and_signs(
    tmp_path: Path,
) -> None:
    """Right after an unseal the anchor is still being read back: an export's or a backup's
    checkpoint asked then waits for the read-back (bounded) and signs, instead of being
    skipped."""
    async with _unsealed_with_an_unread_anchor(tmp_path / "c.db", delivery_timeout_s=30) as (
        store,
        vault,
    ):
        await _build(store, 3)
        asked = asyncio.create_task(vault.checkpoint_audit())
        await asyncio.sleep(0)  # it is waiting, not refused
        assert not asked.done()
        vault.anchor.loaded = True  # what load() does once the topic answered: no anchor yet
        cp = await asyncio.wait_for(asked, 10)
        assert cp.size == await store.fetchval("SELECT count(*) FROM audit")
