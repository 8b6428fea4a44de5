"""Store.generation: counts committed writes to watched tables, so caches never serve old rows."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.store import Store
from ckms.store import _store as store_module

HOST = (
    "INSERT INTO hosts(id, name, labels, identity_public_key, wrapping_public_key, enrolled_at) "
    "VALUES ('web-1', 'web-1', '{}', x'00', x'00', '2026-01-01T00:00:00Z')"
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "ckms.db")
    try:
        yield s
    finally:
        await s.close()


async def test_a_committed_write_to_a_watched_table_counts(store: Store) -> None:
    assert (await store.generation("hosts"), await store.generation("keys")) == (0, 0)
    async with store.write() as tx:
        await tx.execute(HOST)
    assert (await store.generation("hosts"), await store.generation("keys")) == (1, 0)
    async with store.write() as tx:
        await tx.execute("UPDATE hosts SET revoked = 1 WHERE id = 'web-1'")
    assert await store.generation("hosts") == 2


async def test_seen_times_and_ack_positions_do_not_count(store: Store) -> None:
    async with store.write() as tx:
        await tx.execute(HOST)
    async with store.write() as tx:
        await tx.execute(
            "UPDATE hosts SET last_seen_at = 'x', reported = '{}', last_ack_seq = 3 "
            "WHERE id = 'web-1'"
        )
        await tx.set_meta("unwatched", b"1")
    assert await store.generation("hosts") == 1


async def test_a_cancel_during_a_write_still_counts_what_may_have_committed(store: Store) -> None:
    started = asyncio.Event()

    async def writer() -> None:
        async with store.write() as tx:
            await tx.execute(HOST)
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(writer())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Rolled back, and counted anyway: a cache refills once more than needed, never less.
    assert await store.fetchval("SELECT COUNT(*) FROM hosts") == 0
    assert await store.generation("hosts") == 1


async def test_a_commit_by_another_connection_moves_every_generation(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FOREIGN_CHECK_S", 0.0)  # look on every call
    # The triggers are temporary, on the controller's own writer connection only: an operator's
    # sqlite3 shell (or another process) writing the file is not broken by a missing function,
    # and its commit is still seen, so no cache keeps serving what it changed (a revocation).
    before = (await store.generation("hosts"), await store.generation("keys"))
    db = sqlite3.connect(tmp_path / "ckms.db", timeout=5)
    try:
        db.execute(HOST)
        db.commit()
    finally:
        db.close()
    after = (await store.generation("hosts"), await store.generation("keys"))
    assert after[0] > before[0] and after[1] > before[1]
    assert await store.fetchval("SELECT COUNT(*) FROM hosts") == 1
    # and our own unwatched writes do not look like someone else's
    async with store.write() as tx:
        await tx.set_meta("x", b"1")
    assert (await store.generation("hosts"), await store.generation("keys")) == after


async def test_changed_since_names_the_rows_of_each_commit(store: Store, tmp_path: Path) -> None:
    start = await store.generation("hosts")
    assert store.changed_since("hosts", start) == frozenset()
    async with store.write() as tx:
        await tx.execute(HOST)
    middle = await store.generation("hosts")
    async with store.write() as tx:
        await tx.execute(HOST.replace("web-1", "web-2"))
    assert store.changed_since("hosts", start) == {"web-1", "web-2"}
    assert store.changed_since("hosts", middle) == {"web-2"}
    assert store.changed_since("hosts", middle + 5) is None  # a generation never handed out


async def test_changed_since_is_unknown_after_another_connections_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FOREIGN_CHECK_S", 0.0)
    before = await store.generation("hosts")
    other = sqlite3.connect(store.path)
    try:
        other.execute(HOST)
        other.commit()
    finally:
        other.close()
    assert await store.generation("hosts") > before
    assert store.changed_since("hosts", before) is None  # which rows: only a reload can tell


async def test_changed_since_is_unknown_beyond_its_history(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHANGE_HISTORY", 2)
    fresh = await Store.open(store.path)
    try:
        start = await fresh.generation("hosts")
        for i in range(3):
            async with fresh.write() as tx:
                await tx.execute(HOST.replace("web-1", f"web-{i + 5}"))
        assert fresh.changed_since("hosts", start) is None
        assert fresh.changed_since("hosts", start + 1) == {"web-6", "web-7"}
    finally:
        await fresh.close()
