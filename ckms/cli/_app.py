"""The root Typer app; each noun lives in its own module and is added here."""

from __future__ import annotations

import typer

from ckms.cli import dev

app = typer.Typer(
    name="ckms",
    help="ckms: cryptographic key management for fleets of hosts.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(dev.app, name="dev")


@app.command()
def demo() -> None:
    """Run the end-to-end demo: Kafka, a controller, three agents, rotate, revoke, audit."""
    typer.echo(
        "ckms demo is not built yet: it needs the controller, the agent and the operator CLI "
        "(see the README for what works today)",
        err=True,
    )
    raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
