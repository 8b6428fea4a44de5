"""A minimal asyncio HTTP endpoint that serves ``GET /metrics`` and nothing else.

Shared by the controller and the agent. It answers one request per connection (Prometheus
scrapers open a connection per scrape or reuse it; ``Connection: close`` is always valid),
reads at most a few kilobytes of request head with a deadline, and never serves files. No
framework: the controller and agents gain no web stack for one read-only page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ckms.errors import ConfigError, TransportError

__all__ = ["MetricsEndpoint", "parse_listen"]

log = logging.getLogger(__name__)

_MAX_HEAD = 8192
_READ_TIMEOUT_S = 5.0

Render = Callable[[], Awaitable[bytes]]


def parse_listen(text: str, *, loopback_only: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair; ConfigError if malformed.

    With ``loopback_only`` (the agent), anything but 127.0.0.0/8, ``::1`` or ``localhost`` is
    refused: hosts get no new network-facing port.
    """
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics address {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9464)")
    if loopback_only and not (host == "localhost" or host == "::1" or host.startswith("127.")):
        raise ConfigError(
            f"metrics address {text!r}: the agent serves metrics on loopback only "
            "(127.0.0.1 or ::1); use the textfile collector for anything else"
        )
    return host, int(port_text)


class MetricsEndpoint:
    """``async with MetricsEndpoint(render, host, port) as ep: ...``; ``render`` makes the page."""

    def __init__(self, render: Render, host: str, port: int) -> None:
        # Imported here: a process that parses a listen address serves no metrics yet.
        from prometheus_client import CONTENT_TYPE_LATEST

        self._content_type = CONTENT_TYPE_LATEST
        self._render = render
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Listen (port 0 picks a free one, see ``self.port``)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=_MAX_HEAD
            )
        except OSError as exc:
            raise TransportError(
                f"cannot serve metrics on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def close(self) -> None:
        """Stop listening; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(OSError):
                await server.wait_closed()

    async def __aenter__(self) -> MetricsEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                await self._respond(writer, 400, b"bad request\n")
                return
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if target != b"/metrics":
                await self._respond(writer, 404, b"only /metrics is served here\n")
                return
            if method not in (b"GET", b"HEAD"):
                await self._respond(writer, 405, b"GET only\n", extra=b"Allow: GET, HEAD\r\n")
                return
            try:
                body = await self._render()
            except Exception:
                log.exception("rendering metrics failed")
                await self._respond(writer, 500, b"metrics unavailable\n")
                return
            await self._respond(
                writer, 200, body, content_type=self._content_type, head_only=method == b"HEAD"
            )
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        extra: bytes = b"",
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\nX-Content-Type-Options: nosniff\r\n"
        ).encode() + extra + b"\r\n"
        writer.write(head if head_only else head + body)
        await writer.drain()
