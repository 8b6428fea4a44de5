"""Fixtures of the fault suite: one real 3-node Kafka cluster for the module, healthy per test.

Every test gets its own topics and controller home; the cluster is shared (starting three
brokers takes 20-50 s on a 2-core machine). Before and after each test every node is running
again, so a test that failed in the middle of an outage does not take the next one down too.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from ckms.devkafka import LocalKafka
from tests.faults.harness import restart_stopped_nodes


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster() -> AsyncIterator[LocalKafka]:
    """A real 3-node KRaft cluster (replication 3, min.insync.replicas 2) for this module."""
    kafka = LocalKafka(nodes=3, startup_timeout=180)  # a loaded 2-core box can be slow
    await kafka.start()
    print(
        f"\n[ckms] 3-node Kafka ready in {kafka.startup_seconds:.1f} s at {kafka.bootstrap}",
        file=sys.__stderr__,
        flush=True,
    )
    try:
        yield kafka
    finally:
        # The data is thrown away: kill at once instead of waiting for controlled shutdowns.
        for i in range(kafka.node_count):
            await kafka.stop_node(i, kill=True)
        await kafka.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def healthy_cluster(cluster: LocalKafka) -> AsyncIterator[LocalKafka]:
    """The module's cluster with every node running before and after the test."""
    await restart_stopped_nodes(cluster)
    yield cluster
    await restart_stopped_nodes(cluster)


@pytest.fixture
def note(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Print one line about what the fault did, past pytest's capture (for the run's log)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(text: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\n[faults] {request.node.name}: {text}", flush=True)

    return write
