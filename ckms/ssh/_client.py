"""A persistent SSH connection to a controller that makes JSON requests on it.

Requests go on exec channels, one each (what OpenSSH's ``ssh`` does, and the operator CLI), or,
with ``channel=True`` (agents), as frames on one long-lived ``ckms-rpc`` channel
(:mod:`ckms.ssh._channel`, a fifth of the server's CPU per request) when the server offers
it, falling back to exec channels when it does not. A channel that breaks takes its connection
down with it; the next ``connect()`` (the agent's reconnect loop, with its backoff) opens both
again, on whichever replica answers.

A new connection costs about 4 ms of CPU on each side (docs/architecture.md §8) and a request
on an open one 0.85-1.6 ms per side as measured by ``bench/rpc.py`` (many in flight vs one at
a time), so agents and the CLI keep one connection and reuse it. The controller's
host key is pinned: either its full public key or, at enrollment, its ``SHA256:`` fingerprint;
a different key is refused with an error that says so.

Several controllers (replicas on one store) are several endpoints of one client: they share
one host key (docs/architecture.md, "Replicas"), so one pin covers them all. The client
connects to one of them (chosen by a stable hash of the login name, so a fleet spreads over
the replicas), and when that one cannot be reached it tries the next; an endpoint that failed
is skipped for a jittered backoff (:mod:`ckms._backoff`) while another answers, and tried again
after it, so a replica that returns is used again. A request whose connection broke is sent
again on another replica only when that cannot apply it twice: it never reached the server (the
channel did not open), or its method is in :data:`~ckms.protocol._rpc.IDEMPOTENT_METHODS`.
A replica that answers "sealed" (it refused before changing anything) is skipped the same way,
so agents and operators reach an unsealed replica while another waits for its custodians.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh

from ckms._backoff import Backoff
from ckms.errors import (
    CKMSError,
    ConfigError,
    RequestTimeoutError,
    SealedError,
    TransportError,
)
from ckms.protocol._rpc import IDEMPOTENT_METHODS, MAX_REPLY_BYTES, format_request, parse_reply
from ckms.ssh._channel import ChannelClient, NotSent
from ckms.ssh._keepalive import KEEPALIVE_S

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


TIMEOUTS_BEFORE_LEAVING = 3
"""Requests in a row on one connection that time out before a client of several replicas
leaves it for the next one: one slow reply is a busy controller, several with no reply
between them a replica that answers nothing while its SSH layer still does (a hung store),
which keepalives cannot tell from a healthy one."""


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


@dataclass(frozen=True)
class Endpoint:
    """One controller address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(value: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """``"ctl-1:2222"``, ``"ctl-1:2222,ctl-2:2222"`` or a list of such; ConfigError if bad.

    ``[v6addr]:PORT`` for IPv6. Duplicates are dropped (the first one stays), order is kept.
    """
    items = [value] if isinstance(value, str) else list(value)
    texts = [t.strip() for item in items for t in str(item).split(",")]
    out: list[Endpoint] = []
    for text in texts:
        if not text:
            raise ConfigError("empty controller address (expected HOST:PORT)")
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"bad controller address {text!r} (expected [v6addr]:PORT)")
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        elif ":" in text:
            raise ConfigError(f"bad controller address {text!r} (write IPv6 as [addr]:PORT)")
        else:
            raise ConfigError(f"expected HOST:PORT, got {text!r}")
        if port_text.isdigit() and 1 <= int(port_text) < 65536:
            port = int(port_text)
        else:
            raise ConfigError(f"bad controller port in {text!r} (expected HOST:PORT, 1-65535)")
        if not host or len(host) > 255 or any(c.isspace() for c in host):
            raise ConfigError(f"bad controller host in {text!r}")
        endpoint = Endpoint(host, port)
        if endpoint not in out:
            out.append(endpoint)
    if not out:
        raise ConfigError("no controller address given")
    return tuple(out)


REPLICA_BOUND = frozenset({"unseal", "seal"})
"""Methods about the replica that answers (its own seal): never moved to another one."""

_NotSent = NotSent


class RpcClient:
    """``async with RpcClient(...) as rpc: await rpc.call("sync", {...})``.

    ``host``/``port`` name one controller; ``endpoints`` several replicas (tried in turn).
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 2222,
        endpoints: Sequence[Endpoint] = (),
        username: str,
        client_key: asyncssh.SSHKey,
        host_key_fingerprint: str,
        connect_timeout_s: float = 10.0,
        keepalive_s: float = KEEPALIVE_S,
        retry_min_s: float = 1.0,
        retry_max_s: float = 30.0,
        channel: bool = False,
    ) -> None:
        if not host_key_fingerprint.startswith("SHA256:"):
            raise ConfigError("the controller host key fingerprint must look like SHA256:...")
        if host is not None:
            endpoints = (Endpoint(host, port), *(e for e in endpoints if e != Endpoint(host, port)))
        if not endpoints:
            raise ConfigError("an RPC client needs a controller address")
        self.endpoints = tuple(endpoints)
        # A stable start per login name: a fleet spreads over the replicas, and each host
        # keeps going to the same one while it is up.
        self._preferred = zlib.crc32(username.encode()) % len(self.endpoints)
        self._current = self._preferred
        self.username = username
        self._client_key = client_key
        self._pinned = host_key_fingerprint
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._retry = [Backoff(retry_min_s, retry_max_s) for _ in self.endpoints]
        self._retry_at = [0.0 for _ in self.endpoints]
        self._conn: asyncssh.SSHClientConnection | None = None
        self._want_channel = channel
        self._channel: ChannelClient | None = None
        self._lock = asyncio.Lock()
        self._last_connected: int | None = None
        self._timeouts = 0
        """Requests in a row on this connection that timed out (TIMEOUTS_BEFORE_LEAVING)."""
        self.failovers = 0
        """How many times the client moved to another endpoint (for status and tests)."""

    @property
    def endpoint(self) -> Endpoint:
        """The controller in use (or tried next)."""
        return self.endpoints[self._current]

    @property
    def host(self) -> str:
        """Host of the controller in use."""
        return self.endpoint.host

    @property
    def port(self) -> int:
        """Port of the controller in use."""
        return self.endpoint.port

    @property
    def connected(self) -> bool:
        """True while the connection (and its channel, when it has one) is open."""
        return (
            self._conn is not None
            and not self._conn.is_closed()
            and (self._channel is None or self._channel.alive)
        )

    async def wait_lost(self) -> None:
        """Return once the open connection, or its channel, is gone (at once if none is open).

        What a long-lived client waits on instead of polling ``connected``: no timer per
        client while all is well."""
        conn, channel = self._conn, self._channel
        if conn is None or conn.is_closed() or (channel is not None and not channel.alive):
            return
        waits = [asyncio.ensure_future(conn.wait_closed())]
        if channel is not None:
            waits.append(asyncio.ensure_future(channel.wait_closed()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    @property
    def multiplexed(self) -> bool:
        """True when requests go as frames on one channel rather than an exec channel each."""
        return self._channel is not None and self._channel.alive

    def _order(self) -> list[int]:
        """Endpoints to try now: those not backing off, from the current one on, then those
        backing off, the one due first first (a replica that just failed is the last resort,
        not skipped: it may be the only one left)."""
        n = len(self.endpoints)
        now = time.monotonic()
        ring = [(self._current + i) % n for i in range(n)]
        ready = [i for i in ring if self._retry_at[i] <= now]
        waiting = sorted(
            (i for i in ring if self._retry_at[i] > now), key=self._retry_at.__getitem__
        )
        return ready + waiting

    async def connect(self) -> None:
        """Open a connection (no-op when open), trying each controller in turn; raises
        TransportError naming why each one failed."""
        async with self._lock:
            if self.connected:
                return
            if self._conn is not None:  # its channel broke: start both again
                await self.close()
            failures: list[str] = []
            for index in self._order():
                try:
                    self._conn = await self._open(self.endpoints[index])
                    if self._want_channel:
                        self._channel = await self._open_channel(self.endpoints[index])
                except TransportError as exc:
                    self._retry_at[index] = time.monotonic() + self._retry[index].next()
                    failures.append(str(exc))
                    if len(self.endpoints) > 1:
                        log.warning("%s; trying the next controller", exc)
                    continue
                self._retry[index].reset()
                self._retry_at[index] = 0.0
                if self._last_connected is not None and index != self._last_connected:
                    self.failovers += 1
                    log.info("connected to controller %s (failed over)", self.endpoints[index])
                self._current = self._last_connected = index
                self._timeouts = 0
                return
            if len(failures) == 1:
                raise TransportError(failures[0])
            raise TransportError("no controller reachable: " + "; ".join(failures))

    async def _open(self, endpoint: Endpoint) -> asyncssh.SSHClientConnection:
        pin = _PinnedHostKey(self._pinned)
        try:
            conn, _ = await asyncio.wait_for(
                asyncssh.create_connection(
                    lambda: pin,
                    endpoint.host,
                    endpoint.port,
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
                f"controller {endpoint} presented host key {pin.presented}, "
                f"not the pinned {self._pinned}: refusing to connect"
            ) from None
        except asyncssh.PermissionDenied:
            raise TransportError(
                f"controller {endpoint} refused the key of {self.username!r}"
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise TransportError(f"cannot connect to controller {endpoint}: {reason}") from None
        return conn

    async def _open_channel(self, endpoint: Endpoint) -> ChannelClient | None:
        """The ``ckms-rpc`` channel on the new connection, None if the server offers none."""
        assert self._conn is not None
        try:
            return await ChannelClient.open(
                self._conn, timeout_s=self._connect_timeout_s, peer=str(endpoint)
            )
        except (OSError, asyncssh.Error) as exc:
            await self.close()
            reason = str(exc) or type(exc).__name__
            raise TransportError(
                f"cannot open a channel to controller {endpoint}: {reason}"
            ) from None

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Make one request on the open connection (connecting first if needed).

        When the connection breaks, the request goes once more, to the next controller that
        answers, if that cannot apply it twice (see the module docstring); otherwise the
        TransportError says it may have been applied.
        """
        command, body = format_request(method, params)
        retry_anywhere = method in IDEMPOTENT_METHODS
        attempts = len(self.endpoints)
        while True:
            await self.connect()
            conn, channel = self._conn, self._channel
            assert conn is not None
            endpoint = self.endpoint
            try:
                # asyncio.timeout rather than wait_for: wait_for runs the call as a task of its
                # own, which costs about three more event-loop iterations per request.
                async with asyncio.timeout(timeout_s):
                    if channel is not None:
                        stdout, exit_status = await channel.call(method, params), None
                    else:
                        stdout, exit_status = await _exchange(conn, command, body, method)
                if not stdout and exit_status is None:
                    # The channel ended without a reply or an exit status: the connection went
                    # away (a replica that stopped) after the request was sent.
                    raise ConnectionResetError("the connection closed before the reply")
            except TimeoutError:
                # First: TimeoutError is an OSError. A slow reply is a busy controller, not a
                # dead connection; dropping it would add a handshake to every retry. Several
                # in a row with no reply between them are not a busy controller.
                await self._timed_out(conn)
                raise RequestTimeoutError(
                    f"{method} to {endpoint} timed out after {timeout_s:g} s"
                ) from None
            except (_NotSent, OSError, asyncssh.Error, asyncssh.ChannelOpenError) as exc:
                # Only the first request to see the connection fail moves on: the others in
                # flight on it were cut off with it, and must not move the client again (back
                # to the replica it just left, with two of them).
                current = conn is self._conn
                await self._drop(conn)
                attempts -= 1
                not_sent = isinstance(exc, _NotSent)
                reason = str(exc) or type(exc).__name__
                if attempts > 0 and len(self.endpoints) > 1 and (not_sent or retry_anywhere):
                    log.warning(
                        "%s to %s failed (%s); trying another controller", method, endpoint, reason
                    )
                    if current:
                        self._move_on()
                    continue
                maybe = (
                    ""
                    if not_sent or retry_anywhere
                    else (" (it may have been applied: check before sending it again)")
                )
                raise TransportError(f"{method} to {endpoint} failed: {reason}{maybe}") from None
            if conn is self._conn:
                self._timeouts = 0  # it answers
            if not stdout:
                raise TransportError(f"{method} to {endpoint} got no reply (exit {exit_status})")
            try:
                return parse_reply(stdout)
            except SealedError:
                # A sealed replica refused before it changed anything (what needs the KEK
                # fails inside its transaction): another, unsealed one may serve it.
                attempts -= 1
                if attempts <= 0 or len(self.endpoints) == 1 or method in REPLICA_BOUND:
                    raise
                log.info("%s: controller %s is sealed; trying another replica", method, endpoint)
                if conn is self._conn:
                    self._move_on()
                await self._drop(conn)

    async def _timed_out(self, conn: asyncssh.SSHClientConnection) -> None:
        """Count a request on ``conn`` that timed out; leave ``conn`` at the limit (the next
        request connects, to the next replica first; requests still waiting on ``conn`` fail
        as cut off). With one controller there is nowhere to go: a new connection to an
        overloaded one would only add a handshake to its load."""
        if conn is not self._conn or len(self.endpoints) == 1:
            return
        self._timeouts += 1
        if self._timeouts < TIMEOUTS_BEFORE_LEAVING:
            return
        log.warning(
            "%d requests in a row to %s timed out: leaving it",
            self._timeouts,
            self.endpoints[self._current],
        )
        self._move_on()
        await self._drop(conn)

    def _move_on(self) -> None:
        """Back off from the current endpoint and make the next one current (before any await:
        the requests cut off with its connection then see that it is no longer current)."""
        self._retry_at[self._current] = time.monotonic() + self._retry[self._current].next()
        self._current = (self._current + 1) % len(self.endpoints)

    async def _drop(self, conn: asyncssh.SSHClientConnection) -> None:
        """Close ``conn`` if it is still the current connection."""
        if self._conn is conn:
            await self.close()

    async def close(self) -> None:
        """Close the connection and wait until it is closed; safe to call twice."""
        # Both forgotten before the first await: a request failing meanwhile sees that its
        # connection is no longer the current one.
        channel, self._channel = self._channel, None
        conn, self._conn = self._conn, None
        if channel is not None:
            await channel.close()
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
    try:
        process = await conn.create_process(command, encoding=None, stderr=asyncssh.DEVNULL)
    except (OSError, asyncssh.Error, asyncssh.ChannelOpenError) as exc:
        raise _NotSent(str(exc) or type(exc).__name__) from None
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
