"""``ckms controller run``: the controller service, until SIGTERM or SIGINT (a clean stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from ckms import _aio
from ckms._hardening import protect_memory
from ckms._logging import configure_logging
from ckms.cli._errors import cli_errors
from ckms.controller.home import load_settings
from ckms.controller.service import Controller, ControllerSettings

app = typer.Typer(help="Run the controller service.", no_args_is_help=True)

log = logging.getLogger(__name__)


def _setup_logging(level: str, *, ssh_debug: bool) -> None:
    try:
        configure_logging(level, ssh_debug=ssh_debug, stream=sys.stderr)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None


async def serve(settings: ControllerSettings) -> None:
    """Run the controller until SIGTERM/SIGINT; then stop every task and close the store."""
    protect_memory()  # before it ever holds the unsealed secrets
    loop = asyncio.get_running_loop()
    async with Controller(settings) as controller:
        task = asyncio.create_task(controller.run(), name="controller")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            started = asyncio.create_task(controller.wait_started())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if started.done() and not task.done():
                state = "sealed" if controller.vault.sealed else "unsealed"
                print(  # one line scripts and tests can wait for
                    f"ckms: controller listening on {settings.listen_host}:{controller.port} "
                    f"(host key {controller.host_key_fingerprint}, {state})",
                    file=sys.stderr,
                    flush=True,
                )
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("controller stopped")


@app.command("run")
def run_controller(
    config: Annotated[
        Path,
        typer.Option(
            "--config", envvar="CKMS_CONFIG", help="controller.toml (CKMS_<FIELD> overrides)."
        ),
    ],
    log_level: Annotated[
        str, typer.Option(envvar="CKMS_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    ssh_debug: Annotated[
        bool,
        typer.Option(help="Let asyncssh log at DEBUG too (also the ssh_debug setting)."),
    ] = False,
) -> None:
    """Run the controller (starts sealed: `ckms unseal`); SIGTERM/SIGINT stop it cleanly."""
    with cli_errors():
        settings = load_settings(config)
        _setup_logging(log_level, ssh_debug=ssh_debug or settings.ssh_debug)
        _aio.run(serve(settings), loop=settings.event_loop)
