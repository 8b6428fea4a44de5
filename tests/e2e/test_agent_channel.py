"""A real agent sends every request on one ``ckms-rpc`` channel, and opens a new one when its
connection is lost. Real controller, real agent, real SSH, real Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ckms.controller.service import Controller
from ckms.protocol import InstallSpec, Role, Targets
from tests.support.fleet import enroll_agent, running_agent, wait_until

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}
RAW = InstallSpec(path="/etc/ckms/{team}/{purpose}.key", format="raw")


class Sessions:
    """Counts what the controller serves: channels opened, exec requests."""

    def __init__(self, controller: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
        self.channels = 0
        self.exec_requests = 0
        rpc = controller.rpc
        serve_channel, params = rpc._serve_channel, rpc._params

        async def counted_channel(*args: Any) -> None:
            self.channels += 1
            await serve_channel(*args)

        async def counted_exec(*args: Any) -> dict[str, Any]:
            self.exec_requests += 1
            return await params(*args)

        monkeypatch.setattr(rpc, "_serve_channel", counted_channel)
        monkeypatch.setattr(rpc, "_params", counted_exec)


async def test_an_agent_sends_its_requests_on_one_channel_and_reopens_it(
    controller: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "web-1", WEB)  # enrollment: one exec request
    sessions = Sessions(c, monkeypatch)
    await c.lifecycle.create(
        "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="alice"
    )
    path = tmp_path / "web-1" / "root" / "etc/ckms/web/tls.key"

    async def holds(version: int) -> bool:
        return path.exists() and path.read_bytes() == await c.vault.material("web/tls", version)

    async with running_agent(config) as agent:
        await wait_until(lambda: holds(1), what="first install")
        await c.lifecycle.rotate("web/tls", actor="alice")
        await wait_until(lambda: holds(2), what="v2 after the rotation")
        assert agent._rpc is not None and agent._rpc.multiplexed
        served = sum(n for (route, _), n in c.rpc.request_counts.items() if route == "sync")
        assert served >= 2 and sessions.channels == 1 and sessions.exec_requests == 0

        # The connection goes (a controller restart, a network cut): the agent reconnects
        # with its backoff and opens a channel again.
        assert c.rpc.disconnect("web-1", roles={Role.AGENT}) == 1
        await wait_until(lambda: sessions.channels == 2, what="a new channel")
        await c.lifecycle.rotate("web/tls", actor="alice")
        await wait_until(lambda: holds(3), what="v3 after the reconnect")
        assert agent._rpc.multiplexed and sessions.exec_requests == 0
