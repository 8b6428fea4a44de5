"""The unauthenticated surface is bounded, against a real controller over real SSH.

No Kafka is needed (the controller serves SSH while its publisher waits for a broker). The
junk comes from 127.0.0.2 (any 127/8 address is loopback on Linux) so that the real agent, on
127.0.0.1, is another source, as it would be in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import asyncssh
import pytest

from ckms.controller.service import Controller
from ckms.protocol import SyncRequest
from ckms.ssh import RpcClient, generate_ssh_key
from ckms.store import audit as audit_log
from ckms_agent.config import load_config
from ckms_agent.identity import load_keys
from tests.support.controller import running_controller
from tests.support.fleet import enroll_agent

NO_KAFKA = "127.0.0.1:9"
JUNK_SOURCE = "127.0.0.2"
JUNK_REQUESTS = 10_000


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind((JUNK_SOURCE, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _loopback_alias_works(), reason=f"cannot bind {JUNK_SOURCE} (not Linux loopback)"
)


async def agent_key(controller: Controller, base: Path, name: str) -> asyncssh.SSHKey:
    """Enroll a real agent as ``name``; return its SSH identity key."""
    config = load_config(await enroll_agent(controller, base, name, {}))
    keys = load_keys(
        config.state_dir / "identity.key", config.state_dir / "wrapping.key", config.wrap_suite
    )
    return keys.ssh_key()


async def agent_client(controller: Controller, base: Path, name: str) -> RpcClient:
    return RpcClient(
        host="127.0.0.1",
        port=controller.port,
        username=name,
        client_key=await agent_key(controller, base, name),
        host_key_fingerprint=controller.host_key_fingerprint,
    )


async def junk_attempt(port: int, i: int) -> None:
    """One stranger: a fresh key, as ``enroll`` (a bogus token) or as an unknown user."""
    enroll = i % 2 == 0
    try:
        async with asyncio.timeout(20):
            async with asyncssh.connect(
                "127.0.0.1",
                port,
                username="enroll" if enroll else f"mallory{i}",
                client_keys=[generate_ssh_key()],
                known_hosts=None,
                local_addr=(JUNK_SOURCE, 0),
                agent_path=None,
                config=[],
                preferred_auth="publickey",
            ) as conn:
                body = json.dumps({"token": f"junk-token-{i:08d}-xxxx", "identity_key": "x" * 20})
                await request(conn, "enroll", body.encode())
    except (OSError, asyncssh.Error, TimeoutError):
        pass  # refused or dropped: what the attacker gets


async def audit_count(controller: Controller) -> int:
    assert controller.store is not None
    return len(await audit_log.load_records(controller.store))


async def test_junk_from_unknown_keys_leaves_a_bounded_audit_log_and_agents_served(
    tmp_path: Path,
) -> None:
    async with running_controller(tmp_path / "ctl", NO_KAFKA, "e", "a") as controller:
        agent = await agent_client(controller, tmp_path / "agents", "web-1")
        before = await audit_count(controller)
        heartbeat = SyncRequest().model_dump(mode="json")
        async with agent:
            port = controller.port
            sem = asyncio.Semaphore(32)

            async def bounded(i: int) -> None:
                async with sem:
                    await junk_attempt(port, i)

            for start in range(0, JUNK_REQUESTS, 1000):
                await asyncio.gather(*(bounded(i) for i in range(start, start + 1000)))
                # The open agent connection is answered throughout the flood.
                reply = await agent.call("heartbeat", heartbeat, timeout_s=30)
                assert reply["drift"] == [] and reply["controller_time"]
            # ...and a new agent connection from another address gets in at once.
        fresh = await agent_client(controller, tmp_path / "agents", "web-2")
        async with fresh:
            await fresh.call("heartbeat", heartbeat, timeout_s=30)
        await controller.rpc.guard.flush()
        assert controller.store is not None
        records = await audit_log.load_records(controller.store)
        added = records[before:]
        bursts = [r for r in added if r.action == "ssh.refused"]
        # One record per burst (a burst is written at least every 6 x 10 s while it lasts).
        assert 1 <= len(bursts) <= 10, [r.details for r in bursts]
        assert all(r.actor == f"source:{JUNK_SOURCE}" for r in bursts)
        # Every junk attempt is counted in them: refused (key or token) or dropped on arrival.
        assert sum(r.details["count"] for r in bursts) == JUNK_REQUESTS
        assert sum(r.details["dropped"] for r in bursts) > JUNK_REQUESTS // 2
        # Nothing else per attempt: the rest is the second agent's enrollment (and its token).
        assert len(added) - len(bursts) <= 4, [r.action for r in added if r not in bursts]
    # The server stayed up and kept its caps: nothing is left counted for the junk source.
    assert controller.rpc.guard._unauthenticated.get(JUNK_SOURCE, 0) == 0


async def test_an_enrolling_connection_gets_one_request(tmp_path: Path) -> None:
    async with (
        running_controller(tmp_path / "ctl", NO_KAFKA, "e", "a") as controller,
        await junk_connect(controller.port, "127.0.0.1") as conn,
    ):
        if True:
            body = json.dumps({"token": "t" * 20}).encode()
            first = await request(conn, "enroll", body)
            assert "bad parameters" in first["error"]["message"]
            error = (await request(conn, "enroll", body))["error"]
            assert error["type"] == "PermissionDeniedError"
            assert "one connection may send 1" in error["message"]


async def test_unauthenticated_connections_are_capped_per_source_and_in_total(
    tmp_path: Path,
) -> None:
    async with running_controller(
        tmp_path / "ctl",
        NO_KAFKA,
        "e",
        "a",
        ssh_max_unauthenticated_per_source=3,
        ssh_max_connections=6,
        ssh_max_unauthenticated_share=1.0,  # the total cap is what this test reaches
    ) as controller:
        agent = await agent_client(controller, tmp_path / "agents", "web-1")
        known = await agent_key(controller, tmp_path / "agents", "web-2")
        held: list[asyncssh.SSHClientConnection] = []
        try:
            # Known keys leave the per-source count once authenticated: three web-2
            # connections from the junk source, and the source still has all three slots.
            for _ in range(3):
                held.append(
                    await asyncssh.connect(
                        "127.0.0.1",
                        controller.port,
                        username="web-2",
                        client_keys=[known],
                        known_hosts=None,
                        local_addr=(JUNK_SOURCE, 0),
                        agent_path=None,
                        config=[],
                    )
                )
            assert controller.rpc.guard._unauthenticated.get(JUNK_SOURCE, 0) == 0
            for conn in held:
                conn.close()
            for conn in held:
                await conn.wait_closed()
            held.clear()
            for _ in range(3):  # enrolling connections that just sit there
                held.append(
                    await asyncssh.connect(
                        "127.0.0.1",
                        controller.port,
                        username="enroll",
                        client_keys=[generate_ssh_key()],
                        known_hosts=None,
                        local_addr=(JUNK_SOURCE, 0),
                        agent_path=None,
                        config=[],
                    )
                )
            with pytest.raises((OSError, asyncssh.Error)):
                await junk_connect(controller.port)
            # A known key from another address is not capped per source.
            async with agent:
                await agent.call("heartbeat", SyncRequest().model_dump(mode="json"))
                for source in ("127.0.0.3", "127.0.0.4"):
                    held.append(await junk_connect(controller.port, source))
                # 3 held + 2 more + the agent = 6: the total cap turns the next one away.
                with pytest.raises((OSError, asyncssh.Error)):
                    await junk_connect(controller.port, "127.0.0.5")
        finally:
            for conn in held:
                conn.close()


async def request(conn: asyncssh.SSHClientConnection, method: str, body: bytes) -> dict:
    """One raw request; the server may answer (refuse) before it reads the body."""
    process = await conn.create_process(method, encoding=None)
    with contextlib.suppress(BrokenPipeError):
        process.stdin.write(body)
        process.stdin.write_eof()
    out = await asyncio.wait_for(process.stdout.read(), 20)
    process.close()
    return json.loads(out)


async def junk_connect(port: int, source: str = JUNK_SOURCE) -> asyncssh.SSHClientConnection:
    async with asyncio.timeout(20):
        return await asyncssh.connect(
            "127.0.0.1",
            port,
            username="enroll",
            client_keys=[generate_ssh_key()],
            known_hosts=None,
            local_addr=(source, 0),
            agent_path=None,
            config=[],
        )
