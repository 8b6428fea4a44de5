"""``ckms console``: a web console on the operator's own machine, over the admin RPC.

It listens on loopback only and talks to the controller with the operator's SSH identity, like
the CLI, so the controller enforces roles and dual control exactly as for the CLI and gains no
network-facing service. See :mod:`ckms.console._security` for how the browser is let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import os
import shutil
import tempfile
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path

from ckms.cli._errors import UsageError
from ckms.errors import DependencyMissingError

__all__ = ["check_loopback", "launch_file", "serve_console"]


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


@contextlib.contextmanager
def launch_file(url: str) -> Iterator[Path]:
    """A private page (0600 in a 0700 directory) that sends the browser on to ``url``.

    ``--open`` hands the browser this file, never the URL: a command line is visible to every
    local user (``ps``), who could spend the one-time token first. The file goes on exit.
    """
    folder = Path(tempfile.mkdtemp(prefix="ckms-console-"))
    try:
        page = folder / "open.html"
        fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            target = html.escape(url, quote=True)
            out.write(
                '<!doctype html><meta charset="utf-8">'
                f'<meta http-equiv="refresh" content="0;url={target}">'
                f'<title>ckms console</title><a href="{target}">Open the ckms console</a>\n'
            )
        yield page
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
            with contextlib.ExitStack() as opened:
                if open_browser:
                    webbrowser.open(opened.enter_context(launch_file(url)).as_uri())
                await (stop or asyncio.Event()).wait()
        finally:
            await runner.cleanup()
