"""A replica answers a host about a version another replica committed a moment ago.

The host learns of a rotation from its signed event, published after the commit by the
leader; it may then ask a follower, whose key view notices other replicas' commits by polling
the store (every 50 ms). A sync or fetch that named the new version, answered from the view
before that poll, left the host without it until its next reconcile, minutes later. The
replicas here are opened but not run, and the poll is made to never fall due by itself, so
the window is the whole test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.controller.service import Controller
from ckms.crypto import KeyType
from ckms.protocol import InstallSpec, Targets
from ckms.ssh import Principal
from ckms.store import _store
from tests.support.cli import enroll_host
from tests.support.replicas import open_replica, target_settings
from tests.support.stores import StoreTarget
from tests.unit.controller.conftest import FakeClock

KEY = "web/session"


@pytest.fixture
async def replicas(
    tmp_path: Path, clock: FakeClock, store_target: StoreTarget
) -> AsyncIterator[tuple[Controller, Controller]]:
    where = target_settings(store_target)
    a = await open_replica(tmp_path / "a", clock=clock, name="ctl-a", **where)
    b = await open_replica(tmp_path / "b", clock=clock, name="ctl-b", **where)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_version_committed_by_another_replica_is_served_to_the_host_that_asks(
    replicas: tuple[Controller, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = replicas
    await enroll_host(a, "web-1", {"env": "prod"})
    await a.lifecycle.create(
        KEY,
        KeyType.AES_256,
        targets=Targets.parse(["env=prod"], env="prod"),
        install=InstallSpec(path="/etc/ckms/{team}/{purpose}.json", format="keyring-json"),
        actor="alice",
    )
    host = Principal("web-1", "agent", "SHA256:test")
    first = await b.agents.sync(host, {"installed": [], "fetch": []})  # b's view is filled
    assert [v.version for d in first.keys for v in d.versions] == [1]

    monkeypatch.setattr(_store, "FOREIGN_CHECK_S", 3600.0)  # b's next poll never falls due
    await a.lifecycle.rotate(KEY, actor="alice")
    asked = {"key": KEY, "version": 2}

    reply = await b.agents.sync(host, {"installed": [], "fetch": [asked]})
    assert [(m.key, m.version) for m in reply.material] == [(KEY, 2)]
    assert [v.version for d in reply.keys for v in d.versions] == [1, 2]
    fetched = await b.agents.fetch(host, asked)
    assert (fetched.key, fetched.version) == (KEY, 2)

    # A version nobody committed is still refused (after one look at the store).
    reply = await b.agents.sync(host, {"installed": [], "fetch": [{"key": KEY, "version": 9}]})
    assert reply.material == ()
