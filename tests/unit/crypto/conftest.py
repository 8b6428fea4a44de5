"""Shared fixtures for the crypto unit tests: material of every type, generated once per session."""

from __future__ import annotations

import pytest

from ckms.crypto import KeyType, generate


@pytest.fixture(scope="session")
def materials() -> dict[KeyType, bytes]:
    """One canonical material per key type; RSA-4096 generation is slow, so do it only once."""
    return {kt: generate(kt) for kt in KeyType}
