"""The RPC client over several controllers (replicas sharing one host key), real asyncssh.

Failover on a connection that cannot be made, or on one whose requests keep timing out; a
request whose connection broke after it was sent goes to another replica only if applying it
twice is applying it once; a replica that comes back is used again.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncssh
import pytest

from ckms.errors import ConfigError, RequestTimeoutError, TransportError
from ckms.ssh import (
    TIMEOUTS_BEFORE_LEAVING,
    Endpoint,
    Principal,
    RpcClient,
    RpcServer,
    fingerprint,
    generate_ssh_key,
    parse_endpoints,
)


class Replica:
    """One RpcServer with the shared host key; counts what it applied."""

    def __init__(self, host_key: asyncssh.SSHKey, admin_key: asyncssh.SSHKey) -> None:
        self.host_key = host_key
        self.admin_key = admin_key
        self.applied: list[str] = []
        self.entered = asyncio.Event()
        self.hang_sync = False
        self.rpc: RpcServer | None = None
        self.port = 0
        self._release = asyncio.Event()
        self._hung: set[asyncio.Task[Any]] = set()

    async def authenticate(self, username: str, key: asyncssh.SSHKey) -> Principal | None:
        if username == "alice" and fingerprint(key) == fingerprint(self.admin_key):
            return Principal(username, "admin", fingerprint(key))
        return None

    async def start(self, port: int = 0) -> None:
        rpc = RpcServer(host_key=self.host_key, authenticate=self.authenticate)

        async def handler(name: str, hang: bool, principal: Principal, params: dict[str, Any]):
            self.applied.append(name)
            if hang:
                self.entered.set()
                task = asyncio.current_task()
                assert task is not None
                self._hung.add(task)
                await self._release.wait()  # the replica dies before it replies
            return {"by": self.port}

        for method in ("status", "key.rotate"):
            rpc.route(method, lambda p, q, m=method: handler(m, False, p, q), roles={"admin"})
        rpc.route("sync", lambda p, q: handler("sync", self.hang_sync, p, q), roles={"admin"})
        rpc.route("key.revoke", lambda p, q: handler("key.revoke", True, p, q), roles={"admin"})
        await rpc.start(port=port)
        self.rpc, self.port = rpc, rpc.port or 0

    async def stop(self) -> None:
        if self.rpc is not None:
            await self.rpc.close()
            self.rpc = None
        # Its hung handlers end now, into closed channels: left pending, they were destroyed
        # at some later collection, logged as errors inside whichever test then ran.
        self._release.set()
        hung, self._hung = self._hung, set()
        if hung:
            await asyncio.wait(hung, timeout=10)
        self._release = asyncio.Event()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def replicas():
    host_key, admin_key = generate_ssh_key(), generate_ssh_key()
    pair = [Replica(host_key, admin_key), Replica(host_key, admin_key)]
    for r in pair:
        await r.start()
    yield pair
    for r in pair:
        await r.stop()


@pytest.fixture(params=[False, True], ids=["exec", "channel"])
def channel(request: pytest.FixtureRequest) -> bool:
    """Requests as exec channels (the CLI) or as frames on one channel (agents)."""
    return bool(request.param)


@asynccontextmanager
async def _on_one_of_two(
    replicas: list[Replica], channel: bool
) -> AsyncIterator[tuple[RpcClient, Replica, Replica]]:
    """A client of both replicas, connected: (client, the replica it is on, the other one)."""
    a, b = replicas
    endpoints = [Endpoint("127.0.0.1", a.port), Endpoint("127.0.0.1", b.port)]
    async with _client(replicas, endpoints, channel) as c:
        here = a if c.endpoint.port == a.port else b
        yield c, here, (b if here is a else a)


def _client(replicas: list[Replica], endpoints: list[Endpoint], channel: bool) -> RpcClient:
    return RpcClient(
        endpoints=endpoints,
        username="alice",
        client_key=replicas[0].admin_key,
        host_key_fingerprint=fingerprint(replicas[0].host_key),
        connect_timeout_s=5,
        retry_min_s=0.05,
        retry_max_s=0.1,
        channel=channel,
    )


def test_endpoint_lists_parse_and_bad_ones_are_refused() -> None:
    assert parse_endpoints("ctl-1:2222") == (Endpoint("ctl-1", 2222),)
    assert parse_endpoints("ctl-1:2222, ctl-2:2223,ctl-1:2222") == (
        Endpoint("ctl-1", 2222),
        Endpoint("ctl-2", 2223),
    )
    assert parse_endpoints(["[::1]:22", "ctl-3:22"]) == (Endpoint("::1", 22), Endpoint("ctl-3", 22))
    assert str(Endpoint("::1", 22)) == "[::1]:22"
    for bad in ("", "ctl-3", "a:b", "a:0", "::1:22", "[::1]", "a:1,,b:2", "a b:1", []):
        with pytest.raises(ConfigError):
            parse_endpoints(bad)  # type: ignore[arg-type]


async def test_a_controller_that_cannot_be_reached_is_skipped(replicas, channel: bool) -> None:
    live = replicas[1]
    dead = Endpoint("127.0.0.1", _dead_port())
    async with _client(replicas, [dead, Endpoint("127.0.0.1", live.port)], channel) as c:
        assert (await c.call("status"))["by"] == live.port
        assert c.endpoint.port == live.port
    with pytest.raises(TransportError, match=r"no controller reachable.*cannot connect.*cannot"):
        await _client(replicas, [dead, Endpoint("127.0.0.1", _dead_port())], channel).connect()


async def test_fails_over_and_comes_back_when_a_replica_returns(replicas, channel: bool) -> None:
    a, b = replicas
    c = _client(replicas, [Endpoint("127.0.0.1", a.port), Endpoint("127.0.0.1", b.port)], channel)
    async with c:
        first = (await c.call("status"))["by"]
        other = b if first == a.port else a
        here = a if first == a.port else b
        port = here.port
        await here.stop()
        assert (await c.call("status"))["by"] == other.port  # the broken connection: next one
        assert c.failovers == 1
        await here.start(port)
        await other.stop()
        # the replica that returned answers again (its backoff has passed)
        assert (await c.call("status"))["by"] == port
        await other.start(other.port)


async def test_an_idempotent_request_cut_off_after_sending_goes_to_the_other_replica(
    replicas, channel: bool
) -> None:
    async with _on_one_of_two(replicas, channel) as (c, here, other):
        here.hang_sync = True
        call = asyncio.create_task(c.call("sync"))
        await asyncio.wait_for(here.entered.wait(), 10)
        await here.stop()  # it received the request and died before replying
        # sync only reads and records when the host was seen: the other replica answers it
        assert (await asyncio.wait_for(call, 10))["by"] == other.port
        assert here.applied == ["sync"] and other.applied == ["sync"]


async def test_a_non_idempotent_request_is_never_sent_again_after_it_may_have_applied(
    replicas, channel: bool
) -> None:
    async with _on_one_of_two(replicas, channel) as (c, here, other):
        call = asyncio.create_task(c.call("key.revoke", {"key": "t/k"}))
        await asyncio.wait_for(here.entered.wait(), 10)
        await here.stop()
        with pytest.raises(TransportError, match="may have been applied"):
            await asyncio.wait_for(call, 10)
        assert here.applied == ["key.revoke"]
        assert other.applied == []  # not sent blindly to the other replica
        # the next request (a new one, by the caller's choice) goes to the other replica
        assert (await c.call("key.rotate", {"key": "t/k"}))["by"] == other.port
        assert other.applied == ["key.rotate"]


async def test_a_replica_that_answers_nothing_loses_its_clients_to_the_other(
    replicas, channel: bool
) -> None:
    # Its loop is alive (SSH keepalives are answered), its handlers hang (a store that never
    # answers): the connection looks fine, so only the requests timing out can say so.
    async with _on_one_of_two(replicas, channel) as (c, here, other):
        here.hang_sync = True
        for _ in range(TIMEOUTS_BEFORE_LEAVING):
            with pytest.raises(RequestTimeoutError):
                await c.call("sync", timeout_s=0.3)
        assert (await c.call("sync", timeout_s=10))["by"] == other.port
        assert c.failovers == 1
        # One slow reply is a busy controller, not a reason to leave it.
        other.hang_sync = True
        with pytest.raises(RequestTimeoutError):
            await c.call("sync", timeout_s=0.3)
        other.hang_sync = False
        assert (await c.call("status"))["by"] == other.port


async def test_requests_cut_off_by_leaving_a_replica_do_not_send_the_client_back_to_it(
    replicas, channel: bool
) -> None:
    async with _on_one_of_two(replicas, channel) as (c, here, other):
        here.hang_sync = True
        short = [
            asyncio.create_task(c.call("sync", timeout_s=0.5))
            for _ in range(TIMEOUTS_BEFORE_LEAVING)
        ]
        long = asyncio.create_task(c.call("sync", timeout_s=10))
        await asyncio.gather(*short, return_exceptions=True)
        # The long request was cut off when the client left; sync is safe to send again.
        assert (await long)["by"] == other.port
        assert (await c.call("status"))["by"] == other.port
