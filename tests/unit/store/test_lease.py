"""The leader lease and its fence in the store, on SQLite and PostgreSQL alike.

Two store handles on one database are two replicas. The lease's epoch grows at each takeover,
and a write bound to an old epoch fails inside its own transaction and leaves nothing; a
takeover cannot slip between a fenced transaction's check and its commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from ckms.errors import NotLeaderError
from ckms.store import Store
from ckms.store import audit as audit_log
from ckms.store import lease as leases
from tests.support.stores import StoreTarget

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=10)


def beat(name: str) -> leases.ReplicaBeat:
    return leases.ReplicaBeat(
        name=name,
        incarnation=f"{name}-incarnation",
        address=f"{name}:2222",
        version="test",
        sealed=False,
        started_at=T0,
    )


@pytest.fixture
async def pair(store_target: StoreTarget) -> AsyncIterator[tuple[Store, Store]]:
    first = await store_target.open()
    second = await store_target.open()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def _append(store: Store, what: str) -> None:
    async with store.write() as tx:
        await audit_log.append(
            tx, now=T0, actor="leader", action=what, object="test", outcome="ok", details={}
        )


async def test_a_write_bound_to_an_old_epoch_fails_and_leaves_nothing(
    pair: tuple[Store, Store],
) -> None:
    a, b = pair
    first = await leases.acquire(a, beat("a"), now=T0, ttl=TTL)
    assert first is not None and first.mine and first.epoch == 1
    follower = await leases.acquire(b, beat("b"), now=T0 + TTL / 2, ttl=TTL)
    assert follower is not None and not follower.mine and follower.holder_name == "a"
    fence_a = leases.Fence("a-incarnation", 1)
    with leases.fenced(fence_a):
        await _append(a, "while leading")  # the holder's fenced write passes

    taken = await leases.acquire(b, beat("b"), now=T0 + 2 * TTL, ttl=TTL)
    assert taken is not None and taken.mine and taken.epoch == 2
    size = len(await audit_log.load_records(a))
    with leases.fenced(fence_a), pytest.raises(NotLeaderError, match="epoch 1"):
        await _append(a, "after the takeover")
    assert fence_a.lost.is_set()
    assert len(await audit_log.load_records(a)) == size
    with leases.fenced(leases.Fence("b-incarnation", 2)):
        await _append(b, "the new leader")
    assert len(await audit_log.load_records(b)) == size + 1
    assert {r.name for r in await leases.read_replicas(a)} == {"a", "b"}


async def test_a_takeover_waits_for_a_fenced_transaction_to_end(
    pair: tuple[Store, Store],
) -> None:
    a, b = pair
    await leases.acquire(a, beat("a"), now=T0, ttl=TTL)
    inside = asyncio.Event()
    release = asyncio.Event()

    async def fenced_write() -> None:
        with leases.fenced(leases.Fence("a-incarnation", 1)):
            async with a.write() as tx:
                await audit_log.append(
                    tx, now=T0, actor="leader", action="x", object="t", outcome="ok", details={}
                )
                inside.set()
                await release.wait()

    writer = asyncio.create_task(fenced_write())
    await asyncio.wait_for(inside.wait(), 10)
    takeover = asyncio.create_task(leases.acquire(b, beat("b"), now=T0 + 2 * TTL, ttl=TTL))
    done, _ = await asyncio.wait({takeover}, timeout=0.5)
    assert not done  # the fenced transaction holds the lease row (the writer lock) till it ends
    release.set()
    await asyncio.wait_for(writer, 10)  # it committed as the leader of epoch 1
    state = await asyncio.wait_for(takeover, 10)
    assert state is not None and state.mine and state.epoch == 2


async def test_releasing_lets_the_next_replica_in_without_waiting_for_expiry(
    pair: tuple[Store, Store],
) -> None:
    a, b = pair
    await leases.acquire(a, beat("a"), now=T0, ttl=TTL)
    assert await leases.release(a, "a-incarnation", 1, now=T0 + timedelta(seconds=1))
    state = await leases.acquire(b, beat("b"), now=T0 + timedelta(seconds=1), ttl=TTL)
    assert state is not None and state.mine and state.epoch == 2
    assert not await leases.release(a, "a-incarnation", 1, now=T0 + timedelta(seconds=2))
