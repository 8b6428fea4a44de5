"""``ckms dev``: developer helpers such as a local Apache Kafka for manual use."""

from __future__ import annotations

import typer

from ckms import devkafka

app = typer.Typer(help="Developer helpers (local Kafka).", no_args_is_help=True)
kafka_app = typer.Typer(help="A real local Apache Kafka on loopback.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")


@kafka_app.command("up")
def kafka_up(nodes: int = typer.Option(1, help="1 node, or 3 for a replicated cluster")) -> None:
    """Start a local Kafka in the background and print its bootstrap string."""
    raise typer.Exit(devkafka.main(["up", "--nodes", str(nodes)]))


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the local Kafka started by `ckms dev kafka up`."""
    raise typer.Exit(devkafka.main(["down"]))
