"""The framed ``ckms-rpc`` channel, real asyncssh on both sides: many requests on one channel,
and a hostile peer's frames (oversized, malformed, floods, methods of another role, after its
key was revoked) refused as exec requests are, with the channel closed where framing breaks."""

from __future__ import annotations

import asyncio
import json
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
from ckms.protocol._frames import (
    CHANNEL_SUBSYSTEM,
    MAX_REQUEST_FRAME,
    encode_request,
    length_prefix,
)
from ckms.protocol._rpc import MAX_REQUEST_BYTES
from ckms.ssh import Principal, RpcClient, RpcServer, fingerprint, generate_ssh_key
from ckms.ssh._keys import write_private_key

MAX_IN_FLIGHT = 3
BIG_REPLY = 256 * 1024


class Fixture:
    def __init__(self) -> None:
        self.host_key = generate_ssh_key()
        self.keys = {"alice": generate_ssh_key(), "web-1": generate_ssh_key()}
        self.roles = {"alice": "admin", "web-1": "agent"}
        self.revoked: set[str] = set()
        self.refusals: list[tuple[str | None, str, str]] = []
        self.gate = asyncio.Event()
        self.entered = 0
        self.audit_open = asyncio.Event()
        self.audit_open.set()
        self.auditing = 0
        self.served_big = 0

    async def authenticate(self, username: str, key: asyncssh.SSHKey) -> Principal | None:
        known = self.keys.get(username)
        if known is None or username in self.revoked or fingerprint(known) != fingerprint(key):
            return None
        return Principal(username, self.roles[username], fingerprint(key))

    async def refused(self, principal: Principal | None, method: str, exc: CKMSError) -> None:
        self.auditing += 1
        await self.audit_open.wait()  # an audit write, as slow as the store makes it
        self.refusals.append((principal.name if principal else None, method, type(exc).__name__))


async def echo(principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
    return {"caller": principal.name, "params": params}


@pytest.fixture
async def server():
    fx = Fixture()

    async def slow(principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
        fx.entered += 1
        await fx.gate.wait()
        return {"slow": params}

    rpc = RpcServer(
        host_key=fx.host_key,
        authenticate=fx.authenticate,
        on_refused=fx.refused,
        max_concurrent=MAX_IN_FLIGHT,
    )
    rpc.route("echo", echo, roles={"admin", "agent"})
    rpc.route("heartbeat", echo, roles={"agent"})
    rpc.route("key.destroy", echo, roles={"admin"})
    rpc.route("slow", slow, roles={"admin", "agent"})

    async def big(principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
        fx.served_big += 1
        return {"blob": "b" * BIG_REPLY}

    rpc.route("big", big, roles={"agent"})
    await rpc.start()
    yield fx, rpc
    fx.gate.set()
    await rpc.close()


def client(fx: Fixture, rpc: RpcServer, user: str = "web-1", **kw: Any) -> RpcClient:
    return RpcClient(
        host="127.0.0.1",
        port=rpc.port or 0,
        username=user,
        client_key=fx.keys[user],
        host_key_fingerprint=fingerprint(fx.host_key),
        **kw,
    )


async def read_frame(process: asyncssh.SSHClientProcess[bytes]) -> tuple[int, dict[str, Any]]:
    length = int.from_bytes(await process.stdout.readexactly(4), "big")
    body = await process.stdout.readexactly(length)
    return int.from_bytes(body[:4], "big"), json.loads(body[4:])


async def raw_channel(c: RpcClient) -> asyncssh.SSHClientProcess[bytes]:
    """The channel opened by hand (to send what RpcClient never would); its hello read."""
    assert c._conn is not None
    process = await c._conn.create_process(subsystem=CHANNEL_SUBSYSTEM, encoding=None)
    frame_id, hello = await asyncio.wait_for(read_frame(process), 5)
    assert frame_id == 0 and hello["hello"]["max_in_flight"] == MAX_IN_FLIGHT
    return process


async def closed_with(process: asyncssh.SSHClientProcess[bytes]) -> dict[str, Any]:
    """The refusal that ends the channel (id 0), after it the channel's end."""
    frame_id, refusal = await asyncio.wait_for(read_frame(process), 5)
    assert frame_id == 0 and refusal["ok"] is False, refusal
    assert await asyncio.wait_for(process.stdout.read(), 5) == b""
    await asyncio.wait_for(process.wait_closed(), 5)
    assert process.exit_status == 1
    return refusal["error"]


# -- the channel works ----------------------------------------------------------------------


async def test_an_agent_sends_its_requests_as_frames_on_one_channel(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, channel=True) as c:
        assert c.multiplexed
        assert (await c.call("echo", {"n": 1, "text": "héllo"})) == {
            "caller": "web-1",
            "params": {"n": 1, "text": "héllo"},
        }
        results = await asyncio.gather(*(c.call("echo", {"i": i}) for i in range(10)))
        assert [r["params"]["i"] for r in results] == list(range(10))
    assert rpc.request_counts[("echo", "ok")] == 11


async def test_a_slow_request_does_not_hold_up_the_ones_after_it(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, channel=True) as c:
        slow = asyncio.create_task(c.call("slow", {"fetch": 1}))
        assert (await asyncio.wait_for(c.call("heartbeat", {"beat": 1}), 5))["params"] == {
            "beat": 1
        }
        assert not slow.done()
        fx.gate.set()
        assert (await asyncio.wait_for(slow, 5)) == {"slow": {"fetch": 1}}


async def test_refusals_and_errors_map_as_on_exec(server) -> None:
    """The same dispatch: an operator-only method over an agent's channel is refused and the
    refusal reported, a made-up method is a ProtocolError, bad parameters too."""
    fx, rpc = server
    async with client(fx, rpc, channel=True) as c:
        with pytest.raises(PermissionDeniedError, match=r"role agent may not call key\.destroy"):
            await c.call("key.destroy", {"key": "a/b"})
        with pytest.raises(ProtocolError, match="unknown method"):
            await c.call("nope")
        assert c.multiplexed  # a refusal is an answer, not a broken channel
        assert (await c.call("echo"))["caller"] == "web-1"
    assert ("web-1", "key.destroy", "PermissionDeniedError") in fx.refusals
    assert ("web-1", "nope", "ProtocolError") in fx.refusals
    assert rpc.request_counts[("key.destroy", "denied")] == 1


@pytest.mark.parametrize("server_kind", ["refuses-subsystem", "speaks-no-frames"])
async def test_the_client_falls_back_to_exec_where_no_channel_is_offered(
    server, monkeypatch: pytest.MonkeyPatch, server_kind: str
) -> None:
    """A server that refuses the subsystem (as OpenSSH's sshd does) or answers it with
    something that is no hello (a controller without the channel): exec per request."""
    fx, rpc = server
    if server_kind == "refuses-subsystem":
        monkeypatch.setattr(asyncssh.SSHServerProcess, "subsystem_requested", lambda *_: False)
    else:

        async def old_server(process: asyncssh.SSHServerProcess[bytes], owner: Any) -> None:
            process.stdout.write(b'{"ok":false,"error":{"type":"ProtocolError","message":"x"}}\n')
            process.exit(1)

        monkeypatch.setattr(rpc, "_serve_channel", old_server)
    async with client(fx, rpc, channel=True) as c:
        assert c.connected and not c.multiplexed
        assert (await c.call("echo", {"via": "exec"}))["params"] == {"via": "exec"}


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_openssh_can_speak_the_channel(server, tmp_path: Path) -> None:
    """``ssh -s HOST ckms-rpc`` with frames on stdin: the subsystem is plain SSH."""
    fx, rpc = server
    key_path = tmp_path / "id_ed25519"
    write_private_key(key_path, fx.keys["web-1"])
    known = tmp_path / "known_hosts"
    known.write_bytes(f"[127.0.0.1]:{rpc.port} ".encode() + fx.host_key.export_public_key())
    argv = [
        "ssh", "-p", str(rpc.port), "-i", str(key_path), "-F", "/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known}", "-s", "web-1@127.0.0.1", CHANNEL_SUBSYSTEM,
    ]  # fmt: skip
    frames = encode_request(1, "echo", {"from": "openssh"}) + encode_request(2, "key.destroy", None)
    proc = await asyncio.to_thread(
        subprocess.run, argv, input=frames, capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out, replies = proc.stdout, {}
    while out:
        length = int.from_bytes(out[:4], "big")
        body, out = out[4 : 4 + length], out[4 + length :]
        replies[int.from_bytes(body[:4], "big")] = json.loads(body[4:])
    assert replies[0]["hello"]["protocol"] == "ckms-rpc/1"
    assert replies[1] == {"ok": True, "result": {"caller": "web-1", "params": {"from": "openssh"}}}
    assert replies[2]["error"]["type"] == "PermissionDeniedError"


async def test_the_operator_client_keeps_exec(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, "alice") as c:
        assert not c.multiplexed
        assert (await c.call("echo"))["caller"] == "alice"


# -- attacks --------------------------------------------------------------------------------


async def test_an_oversized_frame_is_refused_before_its_body_and_the_channel_closed(
    server,
) -> None:
    fx, rpc = server
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        # Only the length: a server that waited for the body would wait for ever.
        process.stdin.write(length_prefix(MAX_REQUEST_FRAME + 1))
        error = await closed_with(process)
        assert error["type"] == "ProtocolError" and "exceeds" in error["message"]
        assert str(MAX_REQUEST_FRAME) in error["message"]
        assert c.connected  # the channel, not the connection
    assert ("web-1", CHANNEL_SUBSYSTEM, "ProtocolError") in fx.refusals


async def test_parameters_past_the_exec_bound_are_refused_on_the_channel_too(server) -> None:
    fx, rpc = server
    async with client(fx, rpc, channel=True) as c:
        with pytest.raises(ProtocolError, match="exceeds"):
            await c.call("echo", {"x": "a" * MAX_REQUEST_BYTES})
        assert c.multiplexed
        process = await raw_channel(c)
        body = json.dumps({"x": "a" * MAX_REQUEST_BYTES}).encode()
        frame = (7).to_bytes(4, "big") + bytes([4]) + b"echo" + body
        process.stdin.write(length_prefix(len(frame)) + frame)  # within the frame bound
        frame_id, reply = await asyncio.wait_for(read_frame(process), 5)
        assert frame_id == 7 and "request exceeds" in reply["error"]["message"]
        process.stdin.write(encode_request(8, "echo", None))
        assert (await asyncio.wait_for(read_frame(process), 5))[1]["ok"] is True


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ((0).to_bytes(4, "big") + b"\x04echo", "id 0 is reserved"),
        ((5).to_bytes(4, "big") + b"\x30echo", "does not fit"),
        ((5).to_bytes(4, "big"), "ends before its method"),
        (b"\x00\x01", "too short"),
    ],
    ids=["id-zero", "method-length", "no-method", "no-id"],
)
async def test_a_frame_with_broken_framing_closes_the_channel(server, frame, message) -> None:
    fx, rpc = server
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        process.stdin.write(length_prefix(len(frame)) + frame)
        error = await closed_with(process)
        assert error["type"] == "ProtocolError" and message in error["message"]
        assert (await c.call("echo"))["caller"] == "web-1"  # the connection serves on
    assert fx.refusals == [("web-1", CHANNEL_SUBSYSTEM, "ProtocolError")]


async def test_a_well_framed_bad_request_is_answered_and_the_channel_serves_on(server) -> None:
    fx, rpc = server
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        bad_name = (3).to_bytes(4, "big") + bytes([5]) + b"ECHO!"
        bad_json = (4).to_bytes(4, "big") + bytes([4]) + b"echo" + b"{not json"
        for frame in (bad_name, bad_json):
            process.stdin.write(length_prefix(len(frame)) + frame)
        replies = dict([await read_frame(process), await read_frame(process)])
        assert "bad method name" in replies[3]["error"]["message"]
        assert "not valid JSON" in replies[4]["error"]["message"]
        process.stdin.write(encode_request(5, "echo", {"after": "junk"}))
        assert await read_frame(process) == (
            5,
            {"ok": True, "result": {"caller": "web-1", "params": {"after": "junk"}}},
        )
        process.close()
    assert [r[2] for r in fx.refusals] == ["ProtocolError", "ProtocolError"]


async def test_a_frame_that_never_ends_or_ends_the_channel_is_refused(server) -> None:
    fx, rpc = server
    rpc._body_timeout_s = 0.3
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        process.stdin.write(length_prefix(100) + b"\x00\x00\x00\x09")  # 96 bytes never come
        assert "did not arrive within 0.3 s" in (await closed_with(process))["message"]
        process = await raw_channel(c)
        process.stdin.write(length_prefix(100) + b"\x00\x00\x00\x09")
        process.stdin.write_eof()
        assert "ended inside a frame" in (await closed_with(process))["message"]


async def test_an_idle_channel_is_kept_however_long_between_frames(server) -> None:
    """Only a frame begun is timed: an agent's channel idles between heartbeats."""
    fx, rpc = server
    rpc._body_timeout_s = 0.2
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        with pytest.raises(TimeoutError):  # nothing comes: no refusal, no end
            await asyncio.wait_for(process.stdout.read(1), 1.0)
        process.stdin.write(encode_request(1, "echo", {"after": "idle"}))
        assert (await asyncio.wait_for(read_frame(process), 5))[1]["result"]["params"] == {
            "after": "idle"
        }
        process.stdin.write(b"\x00")  # a frame begun: its length, then its body, are timed
        assert "did not arrive within 0.2 s" in (await closed_with(process))["message"]


async def test_a_request_id_reused_while_in_flight_closes_the_channel(server) -> None:
    fx, rpc = server
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        process.stdin.write(encode_request(9, "slow", None) + encode_request(9, "echo", None))
        assert "id 9 is already in flight" in (await closed_with(process))["message"]


async def test_a_flood_of_frames_past_the_limit_is_refused_as_busy(server) -> None:
    """More requests in flight than the connection takes: the excess are answered at once
    with a retriable refusal, not queued or run; exec requests on the same connection share
    the same bound."""
    fx, rpc = server
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        flood = 50
        process.stdin.write(b"".join(encode_request(i, "slow", {"i": i}) for i in range(1, flood)))
        busy = [await asyncio.wait_for(read_frame(process), 5) for _ in range(flood - 1 - 3)]
        assert all(r["ok"] is False and r["error"]["retriable"] for _, r in busy)
        assert all("in flight" in r["error"]["message"] for _, r in busy)
        assert fx.entered == MAX_IN_FLIGHT
        with pytest.raises(CKMSError, match="in flight") as exc:  # exec: the same slots
            await c.call("echo")
        assert exc.value.retriable
        fx.gate.set()
        done = [await asyncio.wait_for(read_frame(process), 5) for _ in range(MAX_IN_FLIGHT)]
        assert sorted(r["result"]["slow"]["i"] for _, r in done) == [1, 2, 3]
        process.stdin.write(encode_request(1, "echo", None))  # ids are free again once answered
        assert (await read_frame(process))[1]["ok"] is True
    assert rpc.request_counts[("slow", "busy")] == flood - 1 - MAX_IN_FLIGHT
    assert not fx.refusals  # busy is not a refusal to audit (as on exec)


async def test_a_flood_of_refused_frames_does_not_pile_up_audit_writes(server) -> None:
    """Refusals are audited (a write each); frames past the channel's limit are answered busy
    at once instead of each waiting for an audit write of its own."""
    fx, rpc = server
    fx.audit_open.clear()
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        flood = 40
        process.stdin.write(
            b"".join(encode_request(i, "key.destroy", {"i": i}) for i in range(1, flood + 1))
        )
        busy = [await asyncio.wait_for(read_frame(process), 5) for _ in range(flood - 3)]
        assert all(r["error"]["retriable"] for _, r in busy)
        assert fx.auditing == MAX_IN_FLIGHT
        fx.audit_open.set()
        denied = [await asyncio.wait_for(read_frame(process), 5) for _ in range(MAX_IN_FLIGHT)]
        assert all(r["error"]["type"] == "PermissionDeniedError" for _, r in denied)
    assert len(fx.refusals) == MAX_IN_FLIGHT


async def test_a_client_that_never_reads_its_replies_stops_being_served(server) -> None:
    """Back-pressure: replies a client does not read stay in the channel's window and the
    server's send buffer, and the server reads no more frames while they wait, so a client
    sending requests and never reading cannot make the controller buffer without bound."""
    fx, rpc = server
    async with client(fx, rpc) as c:
        process = await raw_channel(c)
        requests = 200  # 50 MiB of replies if all were served
        for start in range(1, requests + 1, MAX_IN_FLIGHT):  # never past the in-flight limit
            ids = range(start, min(start + MAX_IN_FLIGHT, requests + 1))
            process.stdin.write(b"".join(encode_request(i, "big", None) for i in ids))
            await asyncio.sleep(0.01)
        served = -1
        for _ in range(50):  # until the server stops serving
            await asyncio.sleep(0.05)
            if fx.served_big == served:
                break
            served = fx.served_big
        # The SSH window (2 MiB) plus the server's buffer high-water mark plus the requests
        # in flight: a handful of replies, not the 200 asked for.
        assert fx.served_big < 40, fx.served_big
        process.close()


async def test_the_client_never_floods_the_server_past_its_limit(server) -> None:
    """The hello says how many requests the server takes; the client waits for a slot rather
    than being refused as busy."""
    fx, rpc = server
    async with client(fx, rpc, channel=True) as c:
        calls = [asyncio.create_task(c.call("slow", {"i": i})) for i in range(3 * MAX_IN_FLIGHT)]
        for _ in range(100):
            if fx.entered >= MAX_IN_FLIGHT:
                break
            await asyncio.sleep(0.01)
        assert fx.entered == MAX_IN_FLIGHT
        fx.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert len(results) == 3 * MAX_IN_FLIGHT
    assert ("slow", "busy") not in rpc.request_counts


async def test_requests_given_up_on_still_hold_their_slot_until_answered(server) -> None:
    """A caller that timed out leaves its request in flight on the server; the client counts
    it until the reply comes, so the next request waits for a slot instead of being busy."""
    fx, rpc = server
    async with client(fx, rpc, channel=True) as c:
        for _ in range(MAX_IN_FLIGHT):
            with pytest.raises(RequestTimeoutError):
                await c.call("slow", timeout_s=0.2)
        with pytest.raises(RequestTimeoutError):  # waiting for a slot, not refused busy
            await c.call("echo", timeout_s=0.3)
        fx.gate.set()
        assert (await asyncio.wait_for(c.call("echo", {"n": 1}), 5))["params"] == {"n": 1}
        assert c.multiplexed  # the late replies were taken, not treated as junk
    assert ("echo", "busy") not in rpc.request_counts


async def test_strangers_get_no_channel(server) -> None:
    """An enrolling connection (any key, one request) makes its request on exec."""
    fx, rpc = server
    stranger_key = generate_ssh_key()

    async def authenticate(username: str, key: asyncssh.SSHKey) -> Principal | None:
        return Principal("enroll", "enroll", fingerprint(key), known=False, max_requests=1)

    rpc.authenticate = authenticate
    c = RpcClient(
        host="127.0.0.1",
        port=rpc.port or 0,
        username="enroll",
        client_key=stranger_key,
        host_key_fingerprint=fingerprint(fx.host_key),
        channel=True,
    )
    async with c:
        assert not c.multiplexed
        with pytest.raises(PermissionDeniedError, match="may not call"):
            await c.call("echo")


async def test_a_revoked_principal_loses_its_open_channel_at_once(server) -> None:
    """Revoked while connected: its connection (channel and all) is closed on the spot, a
    request in flight fails, and it cannot come back."""
    fx, rpc = server
    c = client(fx, rpc, channel=True)
    await c.connect()
    try:
        assert (await c.call("echo"))["caller"] == "web-1"
        in_flight = asyncio.create_task(c.call("slow"))
        for _ in range(100):
            if fx.entered:
                break
            await asyncio.sleep(0.01)
        fx.revoked.add("web-1")
        assert rpc.disconnect("web-1", roles={"agent"}) == 1
        with pytest.raises(TransportError):
            await asyncio.wait_for(in_flight, 5)
        with pytest.raises(TransportError):
            await c.call("echo")
        assert not c.connected
        with pytest.raises(TransportError, match="refused the key"):
            await c.connect()
    finally:
        await c.close()
    assert rpc.disconnect("alice", roles={"agent"}) == 0  # only the principal named


@pytest.mark.parametrize("kind", ["exec", "channel"])
async def test_a_connection_cannot_hold_unread_replies_on_more_channels_than_its_cap(
    server, kind: str
) -> None:
    """Back-pressure holds per channel; a client opening channel after channel on one
    connection, each asking for a big reply with a receive window that never opens, would
    otherwise leave every reply in the server's memory. Past the cap of open channels per
    connection the connection is closed."""
    fx, rpc = server
    async with client(fx, rpc) as c:
        assert c._conn is not None
        opened = 0
        with pytest.raises((asyncssh.Error, OSError)):
            for _ in range(4 * rpc.max_channels + 8):
                if kind == "exec":
                    process = await c._conn.create_process(
                        "big", encoding=None, window=1024, stdin=asyncssh.DEVNULL
                    )
                else:
                    process = await c._conn.create_process(
                        subsystem=CHANNEL_SUBSYSTEM, encoding=None, window=1024
                    )
                    process.stdin.write(encode_request(1, "big", None))
                opened += 1
                await asyncio.sleep(0.02)
            raise AssertionError(f"{opened} channels stayed open on one connection")
        assert fx.served_big <= rpc.max_channels, fx.served_big
