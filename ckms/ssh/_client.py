"""A persistent SSH connection to the controller that makes JSON requests on exec channels.

A new connection costs about 4 ms of CPU on each side (docs/architecture.md §8) and a request
on an open one 0.85-1.6 ms per side as measured by ``bench/rpc.py`` (many in flight vs one at
a time), so agents and the CLI keep one connection and reuse it. The controller's
host key is pinned: either its full public key or, at enrollment, its ``SHA256:`` fingerprint;
a different key is refused with an error that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncssh

from ckms.errors import CKMSError, ConfigError, RequestTimeoutError, TransportError
from ckms.protocol._rpc import MAX_REPLY_BYTES, format_request, parse_reply

log = logging.getLogger(__name__)


# AES-GCM first: with AES-NI it costs ~11 µs per packet in asyncssh against ~60 µs for its
# default chacha20-poly1305 (measured on a 2-core box), and every request is a dozen packets
# each way. chacha20-poly1305 stays on the list for servers without AES-GCM.
ENCRYPTION_ALGS = (
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


class _PinnedHostKey(asyncssh.SSHClient):
    """Accepts only the pinned host key; remembers what the server presented."""

    def __init__(self, pinned_fingerprint: str) -> None:
        self.pinned = pinned_fingerprint
        self.presented: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = str(key.get_fingerprint("sha256"))
        return self.presented == self.pinned


class RpcClient:
    """``async with RpcClient(...) as rpc: await rpc.call("sync", {...})``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        client_key: asyncssh.SSHKey,
        host_key_fingerprint: str,
        connect_timeout_s: float = 10.0,
        keepalive_s: float = 15.0,
    ) -> None:
        if not host_key_fingerprint.startswith("SHA256:"):
            raise ConfigError("the controller host key fingerprint must look like SHA256:...")
        self.host = host
        self.port = port
        self.username = username
        self._client_key = client_key
        self._pinned = host_key_fingerprint
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        """Open the connection (no-op when open); raises TransportError naming the reason."""
        async with self._lock:
            if self.connected:
                return
            pin = _PinnedHostKey(self._pinned)
            try:
                self._conn, _ = await asyncio.wait_for(
                    asyncssh.create_connection(
                        lambda: pin,
                        self.host,
                        self.port,
                        username=self.username,
                        client_keys=[self._client_key],
                        known_hosts=([], [], []),  # empty trust: every key goes to the pin check
                        agent_path=None,
                        preferred_auth="publickey",
                        encryption_algs=list(ENCRYPTION_ALGS),
                        keepalive_interval=self._keepalive_s,
                        keepalive_count_max=3,
                        config=[],
                    ),
                    self._connect_timeout_s,
                )
            except asyncssh.HostKeyNotVerifiable:
                raise TransportError(
                    f"controller {self.host}:{self.port} presented host key {pin.presented}, "
                    f"not the pinned {self._pinned}: refusing to connect"
                ) from None
            except asyncssh.PermissionDenied:
                raise TransportError(
                    f"controller {self.host}:{self.port} refused the key of {self.username!r}"
                ) from None
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
                raise TransportError(
                    f"cannot connect to controller {self.host}:{self.port}: {reason}"
                ) from None

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Make one request on the open connection (connecting first if needed)."""
        await self.connect()
        assert self._conn is not None
        command, body = format_request(method, params)
        try:
            # asyncio.timeout rather than wait_for: wait_for runs the call as a task of its own,
            # which costs about three more event-loop iterations per request (bench/rpc.py).
            async with asyncio.timeout(timeout_s):
                stdout, exit_status = await _exchange(self._conn, command, body, method)
        except TimeoutError:
            # First: TimeoutError is an OSError. A slow reply is a busy controller, not a dead
            # connection; dropping it would add a handshake to every retry (a reconnect storm).
            raise RequestTimeoutError(
                f"{method} to {self.host}:{self.port} timed out after {timeout_s:g} s"
            ) from None
        except (OSError, asyncssh.Error, asyncssh.ChannelOpenError) as exc:
            await self.close()
            reason = str(exc) or type(exc).__name__
            raise TransportError(f"{method} to {self.host}:{self.port} failed: {reason}") from None
        if not stdout:
            raise TransportError(
                f"{method} to {self.host}:{self.port} got no reply (exit {exit_status})"
            )
        return parse_reply(stdout)

    async def close(self) -> None:
        """Close the connection and wait until it is closed; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(OSError, asyncssh.Error, CKMSError):
                await conn.wait_closed()

    async def __aenter__(self) -> RpcClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _exchange(
    conn: asyncssh.SSHClientConnection, command: str, body: bytes, method: str
) -> tuple[bytes, int | None]:
    """Send one request (the body on stdin, then EOF) and read its reply, at most
    MAX_REPLY_BYTES: past that the channel is closed, so a hostile or broken server cannot make
    the client buffer more than the limit."""
    process = await conn.create_process(command, encoding=None, stderr=asyncssh.DEVNULL)
    try:
        # The server may refuse (role, method) and close the channel before reading the body;
        # its reply is still there to read, so a write to the closed channel is not an error.
        with contextlib.suppress(BrokenPipeError, asyncssh.Error):
            if body:
                process.stdin.write(body)
            process.stdin.write_eof()
        chunks: list[bytes] = []
        size = 0
        while chunk := await process.stdout.read(MAX_REPLY_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise TransportError(f"{method} reply exceeds {MAX_REPLY_BYTES} bytes")
        return b"".join(chunks), process.exit_status
    finally:
        process.close()
