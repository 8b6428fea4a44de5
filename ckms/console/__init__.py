"""``ckms console``: a web console on the operator's own machine, over the admin RPC.

It listens on loopback only and talks to the controller with the operator's SSH identity, like
the CLI, so the controller enforces roles and dual control exactly as for the CLI and gains no
network-facing service. See :mod:`ckms.console._security` for how the browser is let in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import webbrowser
from collections.abc import Callable

from ckms.cli._errors import UsageError
from ckms.errors import DependencyMissingError

__all__ = ["check_loopback", "serve_console"]


def check_loopback(host: str) -> None:
    """UsageError unless ``host`` is a loopback address (the console listens nowhere else)."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise UsageError(f"--listen {host}: the console listens on loopback only (127.0.0.1, ::1)")


async def serve_console(
    connection: object,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    open_browser: bool = False,
    announce: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the console until ``stop`` is set (or the task is cancelled)."""
    check_loopback(host)
    try:
        from aiohttp import web

        from ckms.console._app import build_app
        from ckms.console._security import Gate
    except ImportError as exc:
        raise DependencyMissingError(
            f"the console needs its extra ({exc.name} is missing): pip install 'ckms[console]'"
        ) from None
    from ckms.cli._client import Connection

    assert isinstance(connection, Connection)
    gate = Gate()
    async with connection.session() as session:
        app = build_app(session, gate, connection.address)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            server = site._server
            assert server is not None and server.sockets  # type: ignore[attr-defined]
            bound = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
            gate.allow(host, bound)
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{bound}/login?token={gate.login_token}"
            announce(url)
            if open_browser:
                webbrowser.open(url)
            await (stop or asyncio.Event()).wait()
        finally:
            await runner.cleanup()
