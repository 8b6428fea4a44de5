"""Shared fixtures: one real Kafka broker and one real PostgreSQL per test session.

Integration tests ask for ``local_kafka`` (or ``kafka_bootstrap``, ``controller_kafka``...); the
first such test starts a real single-node Apache Kafka with ``ckms.devkafka.LocalKafka`` — mutual
TLS and ACLs, as in production — and every later test reuses it. Each test gets its own topic
names from ``unique_topic``, under the ckms topic names the ACLs cover (``ckms.events.<test>...``),
so tests never see each other's records. Likewise ``postgres_server`` starts one real PostgreSQL
(``ckms.devpostgres.LocalPostgres``) for the first test that asks, and ``postgres_database`` gives
each test an empty database of its own on it (emptied and reused after the test: creating one
costs more than most tests); tests using them are marked ``postgres``.
pytest-timeout (``timeout`` in pyproject.toml) bounds every test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from ckms._kafka_security import KafkaLink
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.devpostgres import LocalPostgres
from ckms.protocol import AUDIT_TOPIC, EVENTS_TOPIC, FLEET_TOPIC
from tests.support.postgres import DatabasePool, PostgresDatabase
from tests.support.stores import BACKENDS, StoreTarget

_POSTGRES_FIXTURES = {"postgres_server", "postgres_database", "postgres_databases"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-backend",
        choices=("both", "sqlite", "postgresql"),
        default="both",
        help="which store backend the store_target tests run against (default: both)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the PostgreSQL fixtures ``postgres`` (for ``-m``)."""
    for item in items:
        if _POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def local_kafka() -> AsyncIterator[LocalKafka]:
    """The session's real Kafka: mutual TLS, the ckms ACLs, and a SCRAM (SASL_SSL) listener.

    Clients get certificate files for a role from ``local_kafka.link(role, name)``.
    """
    async with LocalKafka(sasl=True) as kafka:
        # Written past pytest's capture so CI logs show how long the broker took.
        print(
            f"\n[ckms] test Kafka broker (mTLS) ready in {kafka.startup_seconds:.1f} s "
            f"at {kafka.bootstrap} (log: {kafka.log_path(0)})",
            file=sys.__stderr__,
            flush=True,
        )
        yield kafka


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kafka_bootstrap(local_kafka: LocalKafka) -> str:
    """Bootstrap string of the session's real Kafka broker (its mTLS listener)."""
    return local_kafka.bootstrap


@pytest.fixture(scope="session")
def controller_kafka(local_kafka: LocalKafka) -> KafkaLink:
    """A link to the session's Kafka as the controller (writes events and audit, reads acks)."""
    return local_kafka.link(SubjectRole.CONTROLLER, "controller")


@pytest.fixture(scope="session")
def reader_kafka(local_kafka: LocalKafka) -> KafkaLink:
    """A link as a subscriber: what a test reading the events topic uses."""
    return local_kafka.link(SubjectRole.SUBSCRIBER, "test-reader")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres_server() -> AsyncIterator[LocalPostgres]:
    """The session's real PostgreSQL server (shared: tests that crash a server start their own)."""
    async with LocalPostgres() as server:
        print(
            f"\n[ckms] test PostgreSQL ready in {server.startup_seconds:.1f} s "
            f"at {server.url} (log: {server.log_path})",
            file=sys.__stderr__,
            flush=True,
        )
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres_databases(postgres_server: LocalPostgres) -> DatabasePool:
    """The session's empty databases, reused from test to test once emptied."""
    return DatabasePool(postgres_server)


@pytest_asyncio.fixture(loop_scope="session")
async def postgres_database(postgres_databases: DatabasePool) -> AsyncIterator[PostgresDatabase]:
    """An empty database of this test's own on the session's server, emptied afterwards."""
    database = await postgres_databases.take()
    try:
        yield database
    finally:
        await postgres_databases.give_back(database)


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``: every test using a store target runs once on each."""
    chosen = request.config.getoption("--store-backend")
    if chosen not in ("both", request.param):
        pytest.skip(f"--store-backend {chosen}")
    return str(request.param)


@pytest.fixture
def store_target(
    store_backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> StoreTarget:
    """This test's store location on ``store_backend``: a fresh file, or a fresh database."""
    if store_backend == "sqlite":
        return StoreTarget.sqlite(tmp_path_factory.mktemp("store") / "ckms.db")
    database: PostgresDatabase = request.getfixturevalue("postgres_database")
    return StoreTarget.postgresql(database)


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Return a function that makes a topic name unique to this test (and this run)."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:60]
    run = uuid.uuid4().hex[:8]

    def make(suffix: str = "events") -> str:
        # The broker's ACLs cover every topic under the ckms names; anything else is a
        # data topic of the test's own, read and written as the controller.
        role = {"fleet": FLEET_TOPIC, "audit": AUDIT_TOPIC}.get(suffix, EVENTS_TOPIC)
        return f"{role}.{base}.{suffix}.{run}"

    return make


@pytest.fixture(scope="session")
def age_binary() -> str:
    """Debian's ``age`` (to check what ckms encrypts with a second implementation).

    Installed with apt-get when missing and running as root, as CI and ``make test`` do;
    otherwise the test is skipped with the reason.
    """
    found = shutil.which("age")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        for argv in (
            ["apt-get", "install", "-y", "-q", "age"],
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "age"],
        ):
            subprocess.run(argv, capture_output=True, timeout=600, check=False)
            found = shutil.which("age")
            if found:
                break
    if found is None:
        pytest.skip("Debian's age is not installed (apt-get install age, or run as root)")
    return found
