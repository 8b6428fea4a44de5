"""Fixtures for the store tests: real SQLite (in memory or in a temp file) and real PostgreSQL.

``mem_store`` and ``file_store`` run each test on both backends (``store_target``): SQLite in
memory or in a file, and a fresh PostgreSQL database. ``db_path`` is a SQLite file, for the
tests of what only SQLite has (WAL, the file, other connections to it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.crypto import generate_signing_key, signing_public_key
from ckms.store import Store
from tests.support.stores import StoreTarget


@pytest.fixture
async def mem_store(store_target: StoreTarget) -> AsyncIterator[Store]:
    memory = store_target.engine == "sqlite"
    store = await (Store.open(":memory:") if memory else store_target.open())
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def sqlite_file_store(db_path: Path) -> AsyncIterator[Store]:
    """A SQLite store in a file, for the tests of SQLite's own connections and trips."""
    store = await Store.open(db_path)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def sqlite_mem_store() -> AsyncIterator[Store]:
    """A SQLite store in memory, for the tests of SQLite's own connection."""
    store = await Store.open(":memory:")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ckms.db"


@pytest.fixture
async def file_store(store_target: StoreTarget) -> AsyncIterator[Store]:
    store = await store_target.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def signing_pair() -> tuple[bytes, bytes]:
    private = generate_signing_key()
    return private, signing_public_key(private)
