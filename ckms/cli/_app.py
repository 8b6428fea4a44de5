"""The root Typer app; each noun lives in its own module and is added here.

Connection options live on the root (``ckms --controller HOST:PORT key list``), each with an
environment variable, so scripts set them once. Exit codes are documented in
:mod:`ckms.cli._errors` and in ``ckms --help``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ckms._logging import configure_logging
from ckms.cli import (
    audit,
    backup,
    ca,
    console,
    controller,
    dev,
    fleet,
    host,
    init,
    key,
    operator,
    report,
    request,
    rollout,
    store,
    vault,
)
from ckms.cli._client import Connection
from ckms.cli._errors import EXIT_CODES_HELP, ExitCode

app = typer.Typer(
    name="ckms",
    help=(
        "ckms: cryptographic key management for fleets of hosts.\n\n"
        "Talks to the controller over SSH with your key; the controller's host key is pinned. "
        f"Every read command takes --json.\n\n{EXIT_CODES_HELP}"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def root(
    ctx: typer.Context,
    controller_address: Annotated[
        str | None,
        typer.Option(
            "--controller",
            envvar="CKMS_CONTROLLER",
            help="Controller SSH endpoint HOST:PORT [default: 127.0.0.1:2222]; several "
            "replicas separated by commas (tried in turn).",
            show_default=False,
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option(
            "--identity",
            envvar="CKMS_IDENTITY",
            help="Your SSH private key [default: ~/.ssh/id_ed25519].",
            show_default=False,
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            envvar="CKMS_USER",
            help="Your operator name [default: your login name].",
            show_default=False,
        ),
    ] = None,
    host_key_fingerprint: Annotated[
        str | None,
        typer.Option(
            "--host-key-fingerprint",
            envvar="CKMS_CONTROLLER_FINGERPRINT",
            help="The controller's SSH host key, SHA256:... (pinned; printed by ckms init).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Keep the connection options for the command that runs."""
    ctx.obj = Connection(
        controller=controller_address,
        identity=identity,
        user=user,
        fingerprint=host_key_fingerprint,
    )


app.command("init")(init.init)
app.command("status")(vault.status)
app.command("console")(console.console)
app.command("unseal")(vault.unseal)
app.command("seal")(vault.seal)
app.command("backup")(backup.backup)
app.command("restore")(backup.restore)
app.command("approve", help="Approve another person's request (same as `request approve`).")(
    request.approve
)
app.add_typer(controller.app, name="controller")
app.add_typer(key.app, name="key")
app.add_typer(host.app, name="host")
app.add_typer(fleet.app, name="fleet")
app.add_typer(ca.app, name="ca")
app.add_typer(rollout.app, name="rollout")
app.add_typer(audit.app, name="audit")
app.add_typer(operator.app, name="operator")
app.add_typer(request.app, name="request")
app.add_typer(report.app, name="report")
app.add_typer(store.app, name="store")
app.add_typer(dev.app, name="dev")


@app.command()
def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the work directory (logs, host roots).")
    ] = False,
) -> None:
    """Run the end-to-end demo: Kafka, a controller, three agents, rotate, revoke, audit."""
    from ckms.demo import main as run_demo  # imported on use: it pulls in the whole stack

    raise typer.Exit(run_demo(keep=keep))


def main() -> None:
    """Console-script entry point."""
    level = os.environ.get("CKMS_LOG_LEVEL")
    if level:
        ssh_debug = os.environ.get("CKMS_SSH_DEBUG", "").lower() in ("1", "true", "yes", "on")
        try:
            configure_logging(level, ssh_debug=ssh_debug, stream=sys.stderr)
        except ValueError:
            print(f"ckms: CKMS_LOG_LEVEL={level!r} is not a log level", file=sys.stderr)
            raise SystemExit(2) from None
    app()


__all__ = ["ExitCode", "app", "main"]
