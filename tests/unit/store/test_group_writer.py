"""Group commit: concurrent small writes share transactions; a bad one fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from ckms.errors import StoreError
from ckms.store import GroupWriter, Store, Transaction


def put(name: str) -> Callable[[Transaction], Awaitable[None]]:
    async def work(tx: Transaction) -> None:
        await tx.set_meta(name, b"1")

    return work


async def names(store: Store) -> set[str]:
    return {r["name"] for r in await store.fetchall("SELECT name FROM meta")}


async def test_concurrent_writes_commit_in_fewer_transactions(file_store: Store) -> None:
    group = GroupWriter(file_store)
    await asyncio.gather(*(group.write(put(f"w{i}")) for i in range(50)))
    assert {f"w{i}" for i in range(50)} <= await names(file_store)
    assert 1 <= group.groups < 50


async def test_a_failing_write_fails_alone(file_store: Store) -> None:
    group = GroupWriter(file_store)

    async def bad(tx: Transaction) -> None:
        await tx.execute("INSERT INTO no_such_table VALUES (1)")

    results = await asyncio.gather(
        group.write(put("a")),
        group.write(bad),
        group.write(put("b")),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError)
    assert {"a", "b"} <= await names(file_store)


async def test_a_cancelled_caller_does_not_strand_the_others(file_store: Store) -> None:
    group = GroupWriter(file_store)
    first = asyncio.create_task(group.write(put("first")))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(group.write(put(f"r{i}"))) for i in range(5)]
    first.cancel()
    await asyncio.wait_for(asyncio.gather(*rest), 10)
    assert {f"r{i}" for i in range(5)} <= await names(file_store)
    with pytest.raises(asyncio.CancelledError):
        await first
