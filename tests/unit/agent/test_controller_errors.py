"""What the agent does with a controller's report that its own store failed.

A controller whose database restarts answers "StoreError"; the agent must not take that for
its own state DB failing (which stops it): every loop waits it out on the same connection.
"""

from __future__ import annotations

from typing import Any

import pytest

from ckms.errors import AuditError, ControllerUnavailableError, StoreError
from ckms.protocol import HeartbeatReply, SyncRequest
from ckms.protocol._rpc import error_reply, parse_reply
from ckms_agent.config import build_config
from ckms_agent.daemon import Agent


class Refusing:
    """An open connection on which the controller refuses every request with ``error``."""

    connected = True

    def __init__(self, error: StoreError) -> None:
        self._reply = error_reply(error)

    async def call(self, method: str, params: dict[str, Any], *, timeout_s: float) -> Any:
        return parse_reply(self._reply)  # the error rebuilt, as the SSH client raises it


@pytest.mark.parametrize(
    "error",
    [
        StoreError("cannot connect to the PostgreSQL store: the connection was lost"),
        AuditError("audit record for fleet.ack could not be written: query failed"),
    ],
)
async def test_a_controller_store_failure_is_the_controllers_not_the_agents(
    values: dict[str, Any], error: StoreError
) -> None:
    agent = Agent(build_config(values, environ={}))
    agent._rpc = Refusing(error)  # type: ignore[assignment]
    agent._connected.set()
    with pytest.raises(ControllerUnavailableError, match="heartbeat: ") as raised:
        await agent._call("heartbeat", SyncRequest(installed=()), HeartbeatReply)
    assert not isinstance(raised.value, StoreError)  # what the loops let stop the agent
    assert not agent._lost.is_set()  # the connection is kept: it is not what failed
