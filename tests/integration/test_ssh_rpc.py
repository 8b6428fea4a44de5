"""The SSH RPC transport with real asyncssh on both sides, and OpenSSH's ssh as a client."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from ckms.errors import (
    CKMSError,
    PermissionDeniedError,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
)
from ckms.protocol._rpc import MAX_REPLY_BYTES, MAX_REQUEST_BYTES
from ckms.ssh import Principal, RpcClient, RpcServer, fingerprint, generate_ssh_key
from ckms.ssh._keys import write_private_key


class Fixture:
    def __init__(self) -> None:
        self.host_key = generate_ssh_key()
        self.admin_key = generate_ssh_key()
        self.auditor_key = generate_ssh_key()
        self.refusals: list[tuple[str | None, str, str]] = []
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.returned = asyncio.Event()

    async def authenticate(self, username: str, key: asyncssh.SSHKey) -> Principal | None:
        known = {"alice": (self.admin_key, "admin"), "audrey": (self.auditor_key, "auditor")}
        entry = known.get(username)
        if entry and fingerprint(entry[0]) == fingerprint(key):
            return Principal(username, entry[1], fingerprint(key))
        return None

    async def refused(self, principal: Principal | None, method: str, exc: CKMSError) -> None:
        self.refusals.append((principal.name if principal else None, method, type(exc).__name__))


async def echo(principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
    return {"caller": principal.name, "role": principal.role, "params": params}


@pytest.fixture
async def server():
    fx = Fixture()

    async def slow(principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
        fx.entered.set()
        try:
            await fx.gate.wait()
        finally:
            fx.returned.set()
        return {}

    rpc = RpcServer(
        host_key=fx.host_key, authenticate=fx.authenticate, on_refused=fx.refused, max_concurrent=2
    )
    rpc.route("echo", echo, roles={"admin", "auditor"})
    rpc.route("key.destroy", echo, roles={"admin"})
    rpc.route("slow", slow, roles={"admin"})
    await rpc.start()
    yield fx, rpc
    await rpc.close()


def client(fx: Fixture, rpc: RpcServer, user: str, key: asyncssh.SSHKey, **kw: Any) -> RpcClient:
    return RpcClient(
        host="127.0.0.1",
        port=rpc.port or 0,
        username=user,
        client_key=key,
        host_key_fingerprint=kw.pop("pin", fingerprint(fx.host_key)),
        **kw,
    )


async def test_requests_on_one_persistent_connection(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        first = await c.call("echo", {"n": 1, "text": "héllo"})
        second = await c.call("echo")
        assert first == {"caller": "alice", "role": "admin", "params": {"n": 1, "text": "héllo"}}
        assert second["params"] == {}
        results = await asyncio.gather(*(c.call("echo", {"i": i}) for i in range(2)))
        assert [r["params"]["i"] for r in results] == [0, 1]


@pytest.mark.requirement("PCI-3.6.1")
async def test_roles_are_enforced_on_the_server_and_refusals_reported(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "audrey", fx.auditor_key) as c:
        assert (await c.call("echo"))["role"] == "auditor"
        with pytest.raises(PermissionDeniedError, match=r"auditor may not call key\.destroy"):
            await c.call("key.destroy", {"key": "a/b"})
        with pytest.raises(ProtocolError, match="unknown method"):
            await c.call("nope")
    assert ("audrey", "key.destroy", "PermissionDeniedError") in fx.refusals
    assert ("audrey", "nope", "ProtocolError") in fx.refusals


async def test_unknown_key_and_wrong_username_are_refused(server) -> None:
    fx, rpc = server
    with pytest.raises(TransportError, match="refused the key"):
        await client(fx, rpc, "alice", generate_ssh_key()).connect()
    with pytest.raises(TransportError, match="refused the key"):
        await client(fx, rpc, "mallory", fx.admin_key).connect()


async def test_a_different_host_key_is_refused_with_the_reason(server) -> None:
    fx, rpc = server
    other = fingerprint(generate_ssh_key())
    with pytest.raises(TransportError, match=r"presented host key SHA256:.*not the pinned"):
        await client(fx, rpc, "alice", fx.admin_key, pin=other).connect()


async def test_bad_requests_get_clear_errors_and_the_connection_survives(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        conn = c._conn
        assert conn is not None
        for command, message in [
            ("echo {not json", "not valid JSON"),
            ("echo [1,2]", "must be a JSON object"),
            ("Bad$Method", "bad method name"),
            ("echo " + json.dumps({"x": "a" * MAX_REQUEST_BYTES}), "exceeds"),
        ]:
            result = await conn.run(command, encoding=None, check=False)
            reply = json.loads(result.stdout)
            assert result.exit_status == 1
            assert reply["ok"] is False and message in reply["error"]["message"], reply
        assert (await c.call("echo", {"still": "works"}))["params"] == {"still": "works"}


async def test_requests_in_flight_are_bounded_per_connection(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        calls = [asyncio.create_task(c.call("slow")) for _ in range(4)]
        done, _pending = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        busy = [t for t in done if isinstance(t.exception(), CKMSError)]
        assert len(busy) == 2 and all("in flight" in str(t.exception()) for t in busy)
        fx.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert sum(1 for r in results if r == {}) == 2


async def test_a_request_timeout_keeps_the_connection(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        with pytest.raises(
            RequestTimeoutError, match=r"slow to 127\.0\.0\.1:\d+ timed out after 0\.2 s"
        ):
            await c.call("slow", timeout_s=0.2)
        assert c.connected  # a busy server is not a dead connection: no new handshake
        assert (await c.call("echo", {"n": 1}))["params"] == {"n": 1}
        fx.gate.set()


@pytest.mark.parametrize("closed", ["connection", "channel"])
async def test_a_client_gone_before_the_reply_is_logged_quietly(
    server, caplog: pytest.LogCaptureFixture, closed: str
) -> None:
    fx, rpc = server
    caplog.set_level(logging.DEBUG, logger="ckms")
    secret = "do-not-log-this-param"
    c = client(fx, rpc, "alice", fx.admin_key)
    await c.connect()
    conn = c._conn
    assert conn is not None
    process = await conn.create_process(f'slow {{"token":"{secret}"}}', encoding=None)
    await asyncio.wait_for(fx.entered.wait(), 5)
    if closed == "connection":
        await c.close()  # as when the agent is killed while the controller is still working
    else:
        process.close()
        await asyncio.wait_for(process.wait_closed(), 5)
    fx.gate.set()
    await asyncio.wait_for(fx.returned.wait(), 5)
    for _ in range(100):  # the reply is written right after the handler returns
        if any("went away" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno <= logging.INFO
    assert "slow" in gone[0].getMessage() and "alice" in gone[0].getMessage()
    assert "\n" not in gone[0].getMessage() and secret not in caplog.text
    if closed == "channel":  # the other requests on that connection are not dropped with it
        assert not conn.is_closed()
        assert (await c.call("echo", {"same": "connection"}))["params"] == {"same": "connection"}
        assert c._conn is conn
    await c.close()
    async with client(fx, rpc, "alice", fx.admin_key) as fresh:
        assert (await fresh.call("echo", {"after": closed}))["params"] == {"after": closed}


def openssh_argv(fx: Fixture, port: int, tmp_path: Path, command: str) -> list[str]:
    """OpenSSH's ``ssh`` as alice (the admin's key), pinning the server's host key."""
    key_path = tmp_path / "id_ed25519"
    write_private_key(key_path, fx.admin_key)
    known = tmp_path / "known_hosts"
    known.write_bytes(f"[127.0.0.1]:{port} ".encode() + fx.host_key.export_public_key("openssh"))
    return [
        "ssh", "-p", str(port), "-i", str(key_path), "-F", "/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known}", "alice@127.0.0.1", command,
    ]  # fmt: skip


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_openssh_client_can_call_the_endpoint(server, tmp_path: Path) -> None:
    fx, rpc = server
    argv = openssh_argv(fx, rpc.port, tmp_path, 'echo {"from":"openssh"}')
    proc = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    reply = json.loads(proc.stdout)
    assert reply == {
        "ok": True,
        "result": {"caller": "alice", "params": {"from": "openssh"}, "role": "admin"},
    }
    denied = await asyncio.to_thread(
        subprocess.run, [*argv[:-1], "no.such.method"], capture_output=True, timeout=30, check=False
    )
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["error"]["type"] == "ProtocolError"


async def test_parameters_travel_in_the_body_not_the_logged_command(server, caplog) -> None:
    """The exec command is the method alone: SSH logs it (asyncssh at INFO), so parameters,
    which may be secret, go on stdin."""
    fx, rpc = server
    caplog.set_level(logging.DEBUG)
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        reply = await c.call("echo", {"token": "body-only-0f3a9c"})
    assert reply["params"] == {"token": "body-only-0f3a9c"}
    commands = [r.getMessage() for r in caplog.records if "Command:" in r.getMessage()]
    assert commands and all(m.strip().endswith("Command: echo") for m in commands), commands
    assert "body-only-0f3a9c" not in caplog.text


async def test_secret_parameters_are_refused_in_the_command_line(server) -> None:
    fx, rpc = server
    rpc.route("unseal", echo, roles={"admin"}, secret_params=True)
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        conn = c._conn
        assert conn is not None
        result = await conn.run('unseal {"share":"x"}', encoding=None, check=False)
        reply = json.loads(result.stdout)
        assert result.exit_status == 1 and "send them on stdin" in reply["error"]["message"]
        assert (await c.call("unseal", {"share": "x"}))["params"] == {"share": "x"}
    assert (("alice", "unseal", "ProtocolError")) in fx.refusals


async def test_a_body_too_large_or_never_ended_is_refused(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        conn = c._conn
        assert conn is not None
        big = json.dumps({"x": "a" * MAX_REQUEST_BYTES}).encode()
        result = await conn.run("echo", input=big, encoding=None, check=False)
        assert "exceeds" in json.loads(result.stdout)["error"]["message"]
    rpc._body_timeout_s = 0.2
    async with client(fx, rpc, "alice", fx.admin_key) as c:
        assert c._conn is not None
        process = await c._conn.create_process("echo", encoding=None)  # stdin never closed
        out = await asyncio.wait_for(process.stdout.read(), 10)
        assert "did not end within" in json.loads(out)["error"]["message"]
        process.close()


async def test_the_client_stops_reading_at_the_reply_limit(tmp_path: Path) -> None:
    """A hostile server that never stops sending cannot make the client buffer past
    MAX_REPLY_BYTES: the client closes the channel at the limit and says so."""
    host_key = generate_ssh_key()
    sent = 0
    stopped = asyncio.Event()

    class Open(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False  # no authentication: any client gets in

    async def flood(process: asyncssh.SSHServerProcess[bytes]) -> None:
        nonlocal sent
        chunk = b"x" * 65536
        try:
            while sent < 256 * MAX_REPLY_BYTES:
                process.stdout.write(chunk)
                sent += len(chunk)
                await process.stdout.drain()
        except (OSError, asyncssh.Error):
            pass  # the client closed the channel: what this test wants
        finally:
            stopped.set()
            process.exit(0)

    acceptor = await asyncssh.create_server(
        Open, "127.0.0.1", 0, server_host_keys=[host_key], process_factory=flood, encoding=None
    )
    port = acceptor.sockets[0].getsockname()[1]
    try:
        c = RpcClient(
            host="127.0.0.1",
            port=port,
            username="x",
            client_key=generate_ssh_key(),
            host_key_fingerprint=fingerprint(host_key),
        )
        async with c:
            with pytest.raises(TransportError, match="exceeds"):
                await c.call("anything", timeout_s=60)
        await asyncio.wait_for(stopped.wait(), 10)
    finally:
        acceptor.close()
    # What the server could send: the limit plus what SSH flow control let it have in flight.
    assert sent < MAX_REPLY_BYTES + 8 * 1024 * 1024, sent


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_openssh_client_sends_the_body_on_stdin(server, tmp_path: Path) -> None:
    fx, rpc = server
    rpc.route("unseal", echo, roles={"admin"}, secret_params=True)
    argv = openssh_argv(fx, rpc.port, tmp_path, "unseal")
    proc = await asyncio.to_thread(
        subprocess.run,
        argv,
        input=b'{"share":"from stdin"}',
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["result"]["params"] == {"share": "from stdin"}
