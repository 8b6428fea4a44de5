"""``whoami``: the controller names the caller as it authenticated them (the console uses it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckms.cli._client import Connection
from ckms.controller.service import Controller
from ckms.errors import PermissionDeniedError
from ckms.protocol import admin as api
from tests.support.cli import Operators

pytestmark = pytest.mark.kafka


def _connection(c: Controller, ops: Operators, who: str) -> Connection:
    return Connection(
        controller=f"127.0.0.1:{c.port}",
        identity=ops.people[who].identity,
        user=who,
        fingerprint=c.host_key_fingerprint,
    )


async def test_whoami_names_every_operator_role(controller: Controller, tmp_path: Path) -> None:
    ops = Operators(controller, tmp_path)
    for name, role in [("alice", "admin"), ("carol", "custodian"), ("audrey", "auditor")]:
        await ops.add(name, role)
        async with _connection(controller, ops, name).session() as session:
            reply = await session.call("whoami", None, api.WhoamiReply)
        assert (reply.name, reply.role) == (name, role)


async def test_agents_may_not_ask(controller: Controller) -> None:
    from ckms.ssh import Principal

    agent = Principal("web-1", "agent", "SHA256:x")
    with pytest.raises(PermissionDeniedError, match="agent may not call whoami"):
        await controller.rpc.call(agent, "whoami")
