"""Fixtures for the controller tests: a fake clock, a real store (each backend), a vault."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from ckms.controller.lifecycle import Lifecycle
from ckms.controller.sealing import InitResult, Vault, init_controller
from ckms.store import Store
from tests.support.stores import StoreTarget

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | None = None, **kwargs: float) -> datetime:
        self.now += delta if delta is not None else timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(store_target: StoreTarget) -> AsyncIterator[Store]:
    """A real store on each backend: SQLite in memory, and a fresh PostgreSQL database."""
    memory = store_target.engine == "sqlite"
    s = await (Store.open(":memory:") if memory else store_target.open())
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def init_result(store: Store, clock: FakeClock) -> InitResult:
    return await init_controller(store, shares=(2, 3), clock=clock)


@pytest.fixture
async def vault(store: Store, clock: FakeClock, init_result: InitResult) -> Vault:
    v = Vault(store, clock=clock)
    await v.unseal_with_shares(init_result.mnemonics[:2])
    return v


@pytest.fixture
def lifecycle(store: Store, vault: Vault, clock: FakeClock) -> Lifecycle:
    return Lifecycle(store, vault, clock=clock)
