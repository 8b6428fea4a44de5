"""While sealed the controller answers operators only what unsealing needs.

Operator rows are checked against their MAC only once unsealed (the MAC key comes from the
root KEK). Before this, the owner of the database file could add an admin row of their own
while the controller was sealed, log in over SSH and read key metadata and the audit log, or
cast approvals, before any custodian had unsealed.
"""

from __future__ import annotations

import pytest

from ckms.controller.service import Controller
from ckms.errors import SealedError
from ckms.ssh import RpcClient, generate_ssh_key, public_key_text
from tests.support.stores import StoreTarget

pytestmark = pytest.mark.kafka

REFUSED = {
    "key.list": {},
    "key.show": {"name": "web/tls"},
    "host.list": {},
    "audit.tail": {},
    "audit.export": {},
    "operator.list": {},
    "operator.add": {"name": "mallory2", "role": "admin", "ssh_public_key": "x"},
    "request.list": {},
    "request.approve": {"id": "r-1"},
    "host.enroll": {"name": "evil-1"},
}


async def test_an_operator_row_added_while_sealed_gets_only_status(
    controller: Controller, store_target: StoreTarget
) -> None:
    c = controller
    assert c.store is not None
    await c.lifecycle.create("web/tls", "aes-256", actor="alice")
    await c.vault.seal(actor="alice")
    mine = generate_ssh_key()
    await store_target.tamper(  # the running controller's own store, as its owner
        "INSERT INTO operators(name, role, ssh_public_key, created_at, created_by) "
        "VALUES ('mallory', 'admin', ?, '2025-01-01T00:00:00Z', 'alice')",
        params=(public_key_text(mine),),
    )
    async with RpcClient(
        host="127.0.0.1",
        port=c.port,
        username="mallory",
        client_key=mine,
        host_key_fingerprint=c.host_key_fingerprint,
    ) as rpc:
        status = await rpc.call("status", {})
        assert status["sealed"] is True
        assert (await rpc.call("whoami", {}))["role"] == "admin"
        for method, params in REFUSED.items():
            with pytest.raises(SealedError, match=f"{method} is refused until it is unsealed"):
                await rpc.call(method, params)

