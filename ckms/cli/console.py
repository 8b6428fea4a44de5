"""``ckms console``: open the web console (see :mod:`ckms.console`)."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from ckms.cli._client import run
from ckms.cli._common import conn
from ckms.cli._errors import cli_errors
from ckms.cli._parse import parse_controller

__all__ = ["console"]


def console(
    ctx: typer.Context,
    listen: Annotated[
        str, typer.Option(help="Loopback HOST:PORT to listen on (port 0: a free one).")
    ] = "127.0.0.1:0",
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the URL in the default browser.")
    ] = False,
) -> None:
    """Serve the web console on loopback; prints a one-time URL (the token works once)."""
    from ckms.console import check_loopback, serve_console

    with cli_errors():
        host, port = parse_controller(listen, option="--listen", allow_any_port=True)
        check_loopback(host)
        connection = conn(ctx)
        connection.client()  # the connection options are checked before anything listens

        def announce(url: str) -> None:
            print(f"ckms console for {connection.address}: open {url}", flush=True)
            print("(the link works once; stop with Ctrl-C)", file=sys.stderr, flush=True)

        with contextlib.suppress(KeyboardInterrupt):
            run(
                serve_console(
                    connection, host=host, port=port, open_browser=open_browser, announce=announce
                )
            )
