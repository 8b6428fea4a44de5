"""A principal cut off through one replica is cut off on every replica at once.

Authentication is once per connection, and ``RpcServer.disconnect`` closes only the
connections of the replica that served the removal or revocation. A connection the same
principal holds to another replica of the store must not keep the powers it logged in with.
No Kafka is needed: the replicas serve SSH while their publishers wait for a broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckms.errors import PermissionDeniedError, TransportError
from ckms.protocol import SyncRequest
from ckms.ssh import RpcClient, generate_ssh_key, public_key_text
from tests.support.controller import running_replicas
from tests.support.fleet import enroll_agent, host_rpc
from tests.support.waiting import wait_until


@pytest.mark.parametrize("change", ["removed", "re-added as auditor"])
async def test_an_operator_removed_on_one_replica_loses_its_powers_on_the_other(
    tmp_path: Path, change: str
) -> None:
    """mallory (admin) keeps a connection open to replica b; alice removes her through
    replica a (or removes her and adds her back as an auditor with a new key). mallory's
    connection to b must not go on acting as the admin she logged in as."""
    async with running_replicas(tmp_path) as (a, b):
        await a.operators.add("alice", "admin", public_key_text(generate_ssh_key()), actor="t")
        key = generate_ssh_key()
        await a.operators.add("mallory", "admin", public_key_text(key), actor="t")
        rpc = RpcClient(
            host="127.0.0.1",
            port=b.port,
            username="mallory",
            client_key=key,
            host_key_fingerprint=b.host_key_fingerprint,
        )
        async with rpc:
            assert (await rpc.call("whoami"))["role"] == "admin"
            await a.operators.remove("mallory", actor="alice")
            if change != "removed":
                fresh = public_key_text(generate_ssh_key())
                await a.operators.add("mallory", "auditor", fresh, actor="alice")
            # a method unknown to the server is cut off the same way (not refused as unknown
            # before the principal is checked, one audit record each)
            with pytest.raises(PermissionDeniedError, match="removed or changed"):
                await rpc.call("no.such-method")
            # one audited refusal, then the connection is closed: no flood of refusals
            with pytest.raises(TransportError):
                await rpc.call("whoami")
            assert b.store is not None
            refused = await b.store.fetchval(
                "SELECT count(*) FROM audit WHERE actor = 'mallory' AND outcome = 'refused'"
            )
            assert refused == 1


@pytest.mark.parametrize("channel", [True, False], ids=["channel", "exec"])
async def test_a_host_revoked_on_one_replica_loses_its_connection_to_the_other(
    tmp_path: Path, channel: bool
) -> None:
    """web-1 keeps its connection (its long-lived channel) to replica b; it is revoked through
    replica a. b refuses its next request and closes the connection (not one audited refusal
    per heartbeat for as long as the host keeps asking), and it cannot log in again."""
    async with running_replicas(tmp_path) as (a, b):
        config = await enroll_agent(a, tmp_path, "web-1", {"role": "web"})
        beat = SyncRequest().model_dump(mode="json")
        async with host_rpc(b, config, channel=channel) as rpc:
            await rpc.call("heartbeat", beat)
            await a.hosts.revoke("web-1", actor="alice")

            async def refused() -> bool:  # b sees a's commit within its check interval
                try:
                    await rpc.call("heartbeat", beat)
                except PermissionDeniedError as exc:
                    assert "revoked" in str(exc)
                    return True
                return False

            await wait_until(refused, 10, "the revocation refused by replica b")
            with pytest.raises(TransportError):
                await rpc.call("heartbeat", beat)


async def test_a_connection_of_a_host_enrolled_again_with_a_new_key_is_cut_off(
    tmp_path: Path,
) -> None:
    """web-1's identity key is stolen; the thief keeps an idle connection to replica b while
    the operator revokes web-1 through replica a and enrolls it again with a fresh key. The
    host is no longer revoked, but the connection logged in with the old key: b must refuse
    it (as it does an operator added back with another key), not serve it as web-1."""
    async with running_replicas(tmp_path) as (a, b):
        stolen = await enroll_agent(a, tmp_path / "first", "web-1", {"role": "web"})
        beat = SyncRequest().model_dump(mode="json")
        async with host_rpc(b, stolen, channel=True) as rpc:
            await rpc.call("heartbeat", beat)
            await a.hosts.revoke("web-1", actor="alice")
            await enroll_agent(a, tmp_path / "second", "web-1", {"role": "web"})
            new_key = (await a.hosts.identity("web-1"))[0].identity_public_key

            async def b_sees_the_new_key() -> bool:
                host, _ = await b.hosts.identity("web-1")
                return not host.revoked and host.identity_public_key == new_key

            await wait_until(b_sees_the_new_key, 10, "replica b sees the new enrollment")
            with pytest.raises(PermissionDeniedError, match="web-1"):
                await rpc.call("heartbeat", beat)
            with pytest.raises(TransportError):
                await rpc.call("heartbeat", beat)
