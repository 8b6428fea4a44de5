"""Store.generation: counts committed writes to watched tables, so caches never serve old rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ckms.store import Store
from ckms.store import _store as store_module
from tests.support.stores import StoreTarget

HOST = (
    "INSERT INTO hosts(id, name, labels, identity_public_key, wrapping_public_key, enrolled_at) "
    "VALUES ('web-1', 'web-1', '{}', ?, ?, '2026-01-01T00:00:00Z')"
)
KEYS = (b"\x00", b"\x00")


@pytest.fixture
async def store(store_target: StoreTarget) -> AsyncIterator[Store]:
    s = await store_target.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_committed_write_to_a_watched_table_counts(store: Store) -> None:
    assert (await store.generation("hosts"), await store.generation("keys")) == (0, 0)
    async with store.write() as tx:
        await tx.execute(HOST, KEYS)
    assert (await store.generation("hosts"), await store.generation("keys")) == (1, 0)
    async with store.write() as tx:
        await tx.execute("UPDATE hosts SET revoked = 1 WHERE id = 'web-1'")
    assert await store.generation("hosts") == 2


async def test_seen_times_and_ack_positions_do_not_count(store: Store) -> None:
    async with store.write() as tx:
        await tx.execute(HOST, KEYS)
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
            await tx.execute(HOST, KEYS)
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(writer())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Rolled back. SQLite's triggers counted the row as it changed: a cache refills once more
    # than needed, never less. PostgreSQL's are read back just before COMMIT, never reached.
    assert await store.fetchval("SELECT COUNT(*) FROM hosts") == 0
    assert await store.generation("hosts") == (1 if store.dialect.name == "sqlite" else 0)


async def test_a_commit_by_another_connection_moves_every_generation(
    store: Store, store_target: StoreTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FOREIGN_CHECK_S", 0.0)  # look on every call
    # SQLite's triggers are temporary, on the controller's own writer connection only: an
    # operator's sqlite3 shell (or another process) writing the file is not broken by a missing
    # function, and its commit is still seen, so no cache keeps serving what it changed (a
    # revocation). PostgreSQL's are permanent and need nothing of the writer's own.
    before = (await store.generation("hosts"), await store.generation("keys"))
    await store_target.tamper(HOST, params=KEYS)
    after = (await store.generation("hosts"), await store.generation("keys"))
    assert after[0] > before[0] and after[1] > before[1]
    assert await store.fetchval("SELECT COUNT(*) FROM hosts") == 1
    # and our own unwatched writes do not look like someone else's
    async with store.write() as tx:
        await tx.set_meta("x", b"1")
    assert (await store.generation("hosts"), await store.generation("keys")) == after


async def test_changed_since_names_the_rows_of_each_commit(store: Store) -> None:
    start = await store.generation("hosts")
    assert store.changed_since("hosts", start) == frozenset()
    async with store.write() as tx:
        await tx.execute(HOST, KEYS)
    middle = await store.generation("hosts")
    async with store.write() as tx:
        await tx.execute(HOST.replace("web-1", "web-2"), KEYS)
    assert store.changed_since("hosts", start) == {"web-1", "web-2"}
    assert store.changed_since("hosts", middle) == {"web-2"}
    assert store.changed_since("hosts", middle + 5) is None  # a generation never handed out


async def test_changed_since_is_unknown_after_another_connections_commit(
    store: Store, store_target: StoreTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FOREIGN_CHECK_S", 0.0)
    before = await store.generation("hosts")
    await store_target.tamper(HOST, params=KEYS)
    assert await store.generation("hosts") > before
    assert store.changed_since("hosts", before) is None  # which rows: only a reload can tell


async def test_changed_since_is_unknown_beyond_its_history(
    store: Store, store_target: StoreTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHANGE_HISTORY", 2)
    fresh = await store_target.open()
    try:
        start = await fresh.generation("hosts")
        for i in range(3):
            async with fresh.write() as tx:
                await tx.execute(HOST.replace("web-1", f"web-{i + 5}"), KEYS)
        assert fresh.changed_since("hosts", start) is None
        assert fresh.changed_since("hosts", start + 1) == {"web-6", "web-7"}
    finally:
        await fresh.close()
