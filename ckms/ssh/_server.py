"""A JSON RPC server on asyncssh: public-key auth only, bounded requests.

A request comes on an exec channel of its own (the method as the command, the parameters on
stdin) or as a frame on a ``ckms-rpc`` channel (:mod:`ckms.ssh._channel`); both go through one
dispatch, :meth:`RpcServer._serve`, so every rule below holds for both.

The server knows nothing of keys or hosts: an ``authenticate`` callback maps (username, public
key) to a :class:`Principal` with a role, and each method is routed to a handler with the roles
allowed to call it. Authorization is checked here, on the server, for every request, before the
request body is read; refusals of known principals go to an ``on_refused`` callback (the
controller audits them). Per connection, at most ``max_concurrent`` requests run at once; more
are refused with a retriable error. Strangers (unknown keys, and principals with
``known=False`` such as an enrolling agent) are bounded by :mod:`ckms.ssh._limits`: capped
connections, a per-source refusal budget, and refusals summed into one report per burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from pydantic import BaseModel, ValidationError

from ckms.errors import CKMSError, PermissionDeniedError, ProtocolError, TransportError
from ckms.protocol._frames import CHANNEL_ID, CHANNEL_SUBSYSTEM, RequestFrame, encode_reply
from ckms.protocol._rpc import (
    MAX_REQUEST_BYTES,
    check_method,
    error_reply,
    ok_reply,
    parse_params,
    split_command,
)
from ckms.ssh._channel import ChannelServer
from ckms.ssh._keepalive import SERVER_KEEPALIVE_S
from ckms.ssh._limits import BurstHook, ConnectionLimits, SourceGuard, source_of
from ckms.store import Clock, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name, a role (admin, operator, custodian, auditor, agent, enroll)."""

    name: str
    role: str
    key_fingerprint: str
    public_key: str = field(default="", repr=False)
    known: bool = True
    """False when any key is let in (enrollment): refusals then count against the source's
    budget and are reported per burst, not audited one by one."""
    max_requests: int | None = None
    """Requests one connection of this principal may make (None: unlimited)."""


_AGENT_ROLE = "agent"  # ckms.protocol.Role.AGENT; this package names roles only as text

Authenticator = Callable[[str, asyncssh.SSHKey], Awaitable[Principal | None]]
Handler = Callable[[Principal, dict[str, Any]], Awaitable[BaseModel | dict[str, Any] | None]]
Revalidator = Callable[[Principal], Awaitable[str | None]]
"""Why a principal authenticated earlier on this connection no longer holds (None: it does)."""
RefusalHook = Callable[[Principal | None, str, CKMSError], Awaitable[None]]


class _Busy(CKMSError):
    """Raised when a connection has too many requests in flight."""

    retriable = True


@dataclass
class _Route:
    handler: Handler
    roles: frozenset[str]
    secret_params: bool


class _ServerConnection(asyncssh.SSHServer):
    """One client connection: authenticates once, then counts its requests."""

    def __init__(self, rpc: RpcServer) -> None:
        self._rpc = rpc
        self._conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self.principal: Principal | None = None
        self.in_flight = 0
        self.requests = 0
        self.channels = 0
        """Session channels served and not yet closed by both ends."""
        self.cut_off = False
        """Set when the principal no longer holds (``RpcServer.revalidate``): the connection is
        closed once that request's refusal is written."""
        self._capped = False  # counted by the guard as not (yet) known

    @property
    def connection(self) -> asyncssh.SSHServerConnection | None:
        """The SSH connection, once admitted."""
        return self._conn

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self.source = source_of(str(peer[0])) if peer else "?"
        refusal = self._rpc.guard.admit(self.source, open_connections=len(self._rpc._connections))
        if refusal is not None:
            log.debug("dropping connection from %s: %s", self.source, refusal)
            conn.abort()
            return
        self._capped = True
        self._conn = conn
        self._rpc._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._rpc._connections.discard(self._conn)
        if self._capped:
            self._capped = False
            self._rpc.guard.closed(self.source)

    def auth_completed(self) -> None:
        if self._capped and self.principal is not None and self.principal.known:
            self._capped = False
            self._rpc.guard.authenticated(self.source)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        try:
            principal = await self._rpc.authenticate(username, key)
        except CKMSError as exc:
            log.warning("authentication of %r failed: %s", username, exc)
            return False
        if principal is None:
            # DEBUG only: strangers choose how often this happens; the burst report sums them.
            log.debug("refused key %s for user %r", key.get_fingerprint("sha256"), username)
            self._rpc.guard.refused(self.source, "auth")
            return False
        self.principal = principal
        return True


class RpcServer:
    """The SSH endpoint: ``route()`` methods, ``start()``, and ``port`` once listening."""

    def __init__(
        self,
        *,
        host_key: asyncssh.SSHKey,
        authenticate: Authenticator,
        on_refused: RefusalHook | None = None,
        revalidate: Revalidator | None = None,
        on_refusal_burst: BurstHook | None = None,
        limits: ConnectionLimits | None = None,
        max_concurrent: int = 16,
        max_channels: int | None = None,
        keepalive_s: float = SERVER_KEEPALIVE_S,
        login_timeout_s: float = 30.0,
        body_timeout_s: float = 30.0,
        reuse_port: bool = False,
        clock: Clock = utc_now,
    ) -> None:
        self.host_key = host_key
        self.authenticate = authenticate
        self.on_refused = on_refused
        self.revalidate = revalidate
        """Asked before each request of a known principal: authentication is once per
        connection, and a principal removed elsewhere (by another replica, whose
        :meth:`disconnect` closes only its own connections) must not keep its powers here."""
        limits = limits or ConnectionLimits()
        self.guard = SourceGuard(limits, on_burst=on_refusal_burst, clock=clock)
        self.host_guard = SourceGuard(
            dataclasses.replace(limits, max_sources=1 << 20), on_burst=on_refusal_burst, clock=clock
        )
        """Refusal budgets of known hosts, by name (kept apart from the source addresses whose
        buckets decide who may connect; sized for a whole fleet)."""
        self.max_concurrent = max_concurrent
        self.max_channels = max_channels if max_channels is not None else 2 * max_concurrent
        """Channels one connection may hold open at once. Back-pressure bounds what one
        channel makes the server buffer (a reply its client does not read stays in the server's
        send buffer while the client's window is shut), not how many channels a connection
        opens: past this, the connection is closed. An agent holds one, the CLI one per
        request in flight."""
        self._body_timeout_s = body_timeout_s
        self._keepalive_s = keepalive_s
        self._login_timeout_s = login_timeout_s
        self._reuse_port = reuse_port
        self._routes: dict[str, _Route] = {}
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self.port: int | None = None
        self.request_counts: dict[tuple[str, str], int] = {}
        """Requests served by (route, outcome); unknown methods count as route ``unknown``."""

    def route(
        self,
        method: str,
        handler: Handler,
        *,
        roles: Collection[str],
        secret_params: bool = False,
    ) -> None:
        """Serve ``method`` with ``handler`` to principals whose role is in ``roles``.

        ``secret_params``: the parameters carry a secret (a share, a passphrase, a token), so
        they are accepted only in the request body, never in the logged exec command.
        """
        self._routes[method] = _Route(handler, frozenset(roles), secret_params)

    @property
    def methods(self) -> list[str]:
        """The routed method names."""
        return sorted(self._routes)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 picks a free port, see ``self.port``)."""
        try:
            self._acceptor = await asyncssh.create_server(
                lambda: _ServerConnection(self),
                host,
                port,
                server_host_keys=[self.host_key],
                process_factory=self._handle,
                encoding=None,
                keepalive_interval=self._keepalive_s,
                keepalive_count_max=3,
                login_timeout=self._login_timeout_s,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                reuse_port=self._reuse_port,
                # Channels are bytes (encoding=None), where asyncssh's line editor never
                # engages; without it each channel skips two wrapper objects.
                line_editor=False,
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        sockets = self._acceptor.sockets
        self.port = int(sockets[0].getsockname()[1])
        log.info("ssh rpc listening on %s:%s", host, self.port)

    async def close(self) -> None:
        """Stop listening and close every connection; safe to call twice."""
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()
            await acceptor.wait_closed()
        # asyncssh's acceptor only stops listening; open connections would keep serving.
        connections, self._connections = list(self._connections), set()
        for conn in connections:
            conn.close()
        for conn in connections:
            with contextlib.suppress(OSError, asyncssh.Error):
                await conn.wait_closed()
        await self.guard.flush()
        await self.host_guard.flush()

    def disconnect(self, name: str, *, roles: Collection[str]) -> int:
        """Close every open connection of the known principal ``name`` (of one of ``roles``)
        at once, with what it has in flight: for a host just revoked or an operator removed.

        Authentication happens once per connection; without this, a connection opened before
        the revocation would stay open (each of its requests refused by the handlers, which
        look the host up again) for as long as its peer keeps it. Returns how many closed."""
        closed = 0
        for conn in list(self._connections):
            owner = conn.get_owner()
            principal = owner.principal if isinstance(owner, _ServerConnection) else None
            if (
                principal is not None
                and principal.known
                and principal.name == name
                and principal.role in roles
            ):
                conn.close()
                closed += 1
        if closed:
            log.info("closed %d connection%s of %s", closed, "s" if closed != 1 else "", name)
        return closed

    async def __aenter__(self) -> RpcServer:
        if self._acceptor is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        conn = process.channel.get_connection()
        owner = conn.get_owner()
        assert isinstance(owner, _ServerConnection)
        if not self._hold_channel(owner, process, conn):
            return
        if process.subsystem == CHANNEL_SUBSYSTEM:
            await self._serve_channel(process, owner)
            return
        inline: str | None = None

        def method_of() -> str:
            nonlocal inline
            if process.command is None:
                raise ProtocolError(
                    "interactive shells are not served: send `<method>` as the command and "
                    f"the JSON parameters on stdin (or open the {CHANNEL_SUBSYSTEM} subsystem)"
                )
            method, inline = split_command(process.command)
            return method

        async def params_of(method: str, route: _Route) -> dict[str, Any]:
            return await self._params(process, method, route, inline)

        method, line, ok = await self._serve(owner, method_of, params_of)
        _reply(process, line, 0 if ok else 1, method, owner.principal)

    def _hold_channel(
        self,
        owner: _ServerConnection,
        process: asyncssh.SSHServerProcess[bytes],
        conn: asyncssh.SSHServerConnection,
    ) -> bool:
        """Count the channel until both ends closed it; False (and the connection closed)
        when it is one more than the connection may hold."""
        owner.channels += 1
        closed = asyncio.ensure_future(process.channel.wait_closed())
        closed.add_done_callback(lambda _f: setattr(owner, "channels", owner.channels - 1))
        if owner.channels <= self.max_channels:
            return True
        self._count("channel", "denied")
        log.warning(
            "closing the connection of %s from %s: more than %d channels open at once",
            _name(owner.principal),
            owner.source,
            self.max_channels,
        )
        conn.close()
        return False

    async def _serve(
        self,
        owner: _ServerConnection,
        method_of: Callable[[], str],
        params_of: Callable[[str, _Route], Awaitable[dict[str, Any]]],
    ) -> tuple[str, bytes, bool]:
        """One request, whatever carried it (an exec channel, a frame): authorization before
        the parameters are read, the connection's limits, the call, refusals recorded, the
        outcome counted. Returns the method, the reply line and whether it succeeded."""
        principal = owner.principal
        started = time.perf_counter()
        method = "?"
        try:
            if self.revalidate is not None and principal is not None and principal.known:
                # First: a principal that no longer holds is cut off whatever it sends (a bad
                # method name or a method of another role included).
                gone = await self.revalidate(principal)
                if gone is not None:
                    owner.cut_off = True
                    with contextlib.suppress(CKMSError):
                        method = method_of()
                    raise PermissionDeniedError(f"{method}: {gone}")
            method = method_of()
            route = self._authorize(principal, method)
            owner.requests += 1
            limit = principal.max_requests if principal is not None else None
            if limit is not None and owner.requests > limit:
                raise PermissionDeniedError(
                    f"{method}: one connection may send {limit} such request"
                    f"{'s' if limit != 1 else ''}; open a new connection"
                )
            if owner.in_flight >= self.max_concurrent:
                raise _Busy(f"more than {self.max_concurrent} requests in flight on one connection")
            owner.in_flight += 1
            try:
                params = await params_of(method, route)
                reply = await self._call(route, principal, method, params)
            finally:
                owner.in_flight -= 1
            line, ok = ok_reply(reply), True
            outcome = "ok"
        except CKMSError as exc:
            outcome = _outcome(exc)
            if isinstance(exc, PermissionDeniedError | ProtocolError):
                exc = await self._refused(owner, principal, method, exc)
            line, ok = error_reply(exc), False
        except Exception:
            log.exception("rpc %s by %s failed unexpectedly", method, _name(principal))
            line, ok = error_reply(CKMSError(f"internal error while serving {method}")), False
            outcome = "internal"
        self._count(method, outcome)
        if owner.cut_off and owner.connection is not None:
            # After the reply is written (it is, in this same step of the caller's task): one
            # audited refusal, then no more requests to refuse on this connection.
            asyncio.get_running_loop().call_soon(owner.connection.close)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rpc %s by %s in %.2f ms",
                method,
                _name(principal),
                1000 * (time.perf_counter() - started),
            )
        return method, line, ok

    def _count(self, method: str, outcome: str) -> None:
        # The route label is bounded by the routes served: a caller's made-up method names
        # must not grow the metrics without limit.
        counted = (method if method in self._routes else "unknown", outcome)
        self.request_counts[counted] = self.request_counts.get(counted, 0) + 1

    async def _serve_channel(
        self, process: asyncssh.SSHServerProcess[bytes], owner: _ServerConnection
    ) -> None:
        """A ``ckms-rpc`` channel: each frame through :meth:`_serve`, as an exec request."""
        principal = owner.principal

        async def refuse(exc: ProtocolError) -> CKMSError:
            self._count(CHANNEL_SUBSYSTEM, "invalid")
            return await self._refused(owner, principal, CHANNEL_SUBSYSTEM, exc)

        if principal is None or not principal.known:
            # A stranger (an enrolling agent) makes its one request on an exec channel.
            refusal = await refuse(
                ProtocolError(f"the {CHANNEL_SUBSYSTEM} channel is for enrolled principals")
            )
            with contextlib.suppress(OSError, asyncssh.Error):
                process.stdout.write(encode_reply(CHANNEL_ID, error_reply(refusal)))
                process.exit(1)
            return

        async def dispatch(frame: RequestFrame) -> bytes:
            def method_of() -> str:
                return check_method(frame.method.decode("ascii", "replace"))

            async def params_of(method: str, route: _Route) -> dict[str, Any]:
                return parse_params(method, frame.params)

            return (await self._serve(owner, method_of, params_of))[1]

        def busy(frame: RequestFrame) -> bytes:
            method = frame.method.decode("ascii", "replace")
            self._count(method, "busy")
            return error_reply(
                _Busy(f"more than {self.max_concurrent} requests in flight on one channel")
            )

        await ChannelServer(
            process,
            dispatch=dispatch,
            busy=busy,
            refuse=refuse,
            max_in_flight=self.max_concurrent,
            frame_timeout_s=self._body_timeout_s,
            who=_name(principal),
        ).run()

    async def call(
        self, principal: Principal, method: str, params: dict[str, Any] | None = None
    ) -> BaseModel | dict[str, Any] | None:
        """Serve one request in-process as ``principal`` (roles checked as for a remote caller).

        For the controller's own readers (metrics) that want exactly what the RPC answers.
        """
        route = self._authorize(principal, method)
        return await self._call(route, principal, method, params or {})

    async def _refused(
        self, owner: _ServerConnection, principal: Principal | None, method: str, exc: CKMSError
    ) -> CKMSError:
        """Record a refusal: a stranger's against its source's budget, a known one's by hook.

        A host (role ``agent``) gets a budget of its own too: one refused in a loop (a CSR for
        names it does not own, a key it is no target of) would otherwise cost one audit record
        and write transaction per request. Past its burst, its refusals are summed into one
        record per burst (source ``host:<name>``), still refused; operators are audited one by
        one."""
        if principal is None or not principal.known:
            self.guard.refused(owner.source, f"rpc.{method}")
            return exc
        if self.on_refused is None:
            return exc
        if principal.role == _AGENT_ROLE:
            budget = f"host:{principal.name}"
            if self.host_guard.penalised(budget):
                self.host_guard.refused(budget, f"rpc.{method}")
                return exc
            self.host_guard.charge(budget)
        try:
            await self.on_refused(principal, method, exc)
        except CKMSError as hook_exc:
            # Fail closed: a refusal that cannot be audited is reported as such.
            return hook_exc
        return exc

    def _authorize(self, principal: Principal | None, method: str) -> _Route:
        """The route of ``method`` if ``principal`` may call it (checked before any body)."""
        route = self._routes.get(method)
        if route is None:
            raise ProtocolError(f"unknown method {method!r}")
        if principal is None or principal.role not in route.roles:
            role = principal.role if principal else "anonymous"
            raise PermissionDeniedError(f"role {role} may not call {method}")
        return route

    async def _params(
        self,
        process: asyncssh.SSHServerProcess[bytes],
        method: str,
        route: _Route,
        inline: str | None,
    ) -> dict[str, Any]:
        if inline is None:
            return parse_params(method, await self._read_body(process, method))
        if route.secret_params:
            raise ProtocolError(
                f"the parameters of {method} are secret: send them on stdin, never in the "
                "command line (SSH logs the command)"
            )
        return parse_params(method, inline)

    async def _read_body(self, process: asyncssh.SSHServerProcess[bytes], method: str) -> bytes:
        """The request body up to EOF, refused past MAX_REQUEST_BYTES or ``body_timeout_s``."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout_s):
                while chunk := await process.stdin.read(MAX_REQUEST_BYTES + 1 - size):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_REQUEST_BYTES:
                        raise ProtocolError(f"request exceeds {MAX_REQUEST_BYTES} bytes")
        except TimeoutError:
            raise ProtocolError(
                f"the body of {method} did not end within {self._body_timeout_s:g} s: close "
                "stdin after the JSON (ssh -n for a call without parameters)"
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise ProtocolError(
                f"the body of {method} could not be read: {type(exc).__name__}"
            ) from None
        return b"".join(chunks)

    async def _call(
        self, route: _Route, principal: Principal | None, method: str, params: dict[str, Any]
    ) -> BaseModel | dict[str, Any] | None:
        assert principal is not None
        try:
            return await route.handler(principal, params)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)[:3]
            )
            raise ProtocolError(f"bad parameters for {method}: {details}") from None


def _outcome(exc: CKMSError) -> str:
    """The metrics outcome of a refused or failed request."""
    if isinstance(exc, _Busy):
        return "busy"
    if isinstance(exc, PermissionDeniedError):
        return "denied"
    if isinstance(exc, ProtocolError):
        return "invalid"
    return "error"


def _name(principal: Principal | None) -> str:
    return principal.name if principal else "?"


def _reply(
    process: asyncssh.SSHServerProcess[bytes],
    line: bytes,
    status: int,
    method: str,
    principal: Principal | None,
) -> None:
    """Write the reply line and exit status; a client that has gone away is only noted.

    asyncssh raises BrokenPipeError (or a connection error) when the channel or connection was
    closed by the client while the request was served, e.g. an agent killed mid-request. Left
    uncaught, asyncssh would treat it as an internal error and drop the whole connection with
    every other request in flight on it.
    """
    try:
        process.stdout.write(line)
        process.exit(status)
    except (OSError, asyncssh.Error) as exc:
        # Only the class name: a disconnect reason is text chosen by the peer.
        log.info(
            "rpc %s by %s: client went away before the reply (%s)",
            method,
            _name(principal),
            type(exc).__name__,
        )
