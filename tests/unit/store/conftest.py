"""Fixtures for the store tests: real SQLite, in memory or in a temp file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.crypto import generate_signing_key, signing_public_key
from ckms.store import Store


@pytest.fixture
async def mem_store() -> AsyncIterator[Store]:
    store = await Store.open(":memory:")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ckms.db"


@pytest.fixture
async def file_store(db_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(db_path)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def signing_pair() -> tuple[bytes, bytes]:
    private = generate_signing_key()
    return private, signing_public_key(private)
