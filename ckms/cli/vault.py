"""``ckms status``, ``ckms unseal``, ``ckms seal``: the controller's health and sealing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._common import JsonOption, conn
from ckms.cli._errors import ExitCode, UsageError, cli_errors
from ckms.cli._parse import read_text_file
from ckms.cli._render import console, print_json, until, when
from ckms.protocol import admin as api


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Controller health: sealing, Kafka, backlog, due rotations, stale hosts; exit 4 if sealed."""
    with cli_errors():
        reply = conn(ctx).call("status", None, api.StatusReply)
    if as_json:
        print_json(reply)
    else:
        out = console()
        seal = "SEALED" if reply.sealed else "unsealed"
        if reply.sealed and reply.mode == "shares":
            seal += f" ({reply.shares_given} of {reply.threshold} shares given)"
        out.print(f"controller {reply.listen}: {seal}; host key {reply.host_key_fingerprint}")
        k = reply.kafka
        kafka = "connected" if k.connected else "NOT connected"
        out.print(
            f"kafka {k.bootstrap}: {kafka}; outbox backlog {k.backlog}, published {k.published}"
            + (f", last error: {k.last_error}" if k.last_error and not k.connected else "")
        )
        out.print(
            f"keys {reply.keys}; hosts {reply.hosts} ({len(reply.stale_hosts)} stale"
            + (f": {', '.join(reply.stale_hosts[:10])}" if reply.stale_hosts else "")
            + f"), {reply.hosts_revoked} revoked; pending requests {reply.pending_requests}"
        )
        c = reply.due_counts
        out.print(
            f"rotations due: {c.get('overdue', 0)} overdue, {c.get('1d', 0)} within 1 day, "
            f"{c.get('7d', 0)} within 7 days, {c.get('30d', 0)} within 30 days; "
            f"{reply.activations_due} activations and {reply.deactivations_due} deactivations due"
        )
        for due in reply.rotations_due[:10]:
            out.print(
                f"  {due.key} v{due.version}: {when(due.due_at)} ({until(due.due_at, reply.now)})"
            )
    if reply.sealed:
        raise typer.Exit(int(ExitCode.SEALED))


def unseal(
    ctx: typer.Context,
    share_file: Annotated[
        Path | None, typer.Option(help="A file holding your SLIP-39 share (one mnemonic).")
    ] = None,
    passphrase_file: Annotated[
        Path | None, typer.Option(help="A file holding the unseal passphrase.")
    ] = None,
) -> None:
    """Give your share (or the passphrase); prompts when no file is given."""
    with cli_errors():
        if share_file is not None and passphrase_file is not None:
            raise UsageError("give --share-file or --passphrase-file, not both")
        connection = conn(ctx)
        if share_file is not None:
            params = api.UnsealParams(share=read_text_file(share_file, option="--share-file"))
        elif passphrase_file is not None:
            params = api.UnsealParams(
                passphrase=read_text_file(passphrase_file, option="--passphrase-file")
            )
        else:
            state = connection.call("status", None, api.StatusReply)
            if not state.sealed:
                typer.echo("controller is already unsealed")
                return
            if state.mode == "passphrase":
                params = api.UnsealParams(passphrase=typer.prompt("Passphrase", hide_input=True))
            else:
                params = api.UnsealParams(
                    share=typer.prompt(
                        f"Your share ({state.shares_given} of {state.threshold} given so far)",
                        hide_input=True,
                    )
                )
        reply = connection.call("unseal", params, api.SealReply)
    if reply.sealed:
        typer.echo(f"share accepted: {reply.given} of {reply.threshold} given; still sealed")
    else:
        typer.echo("controller unsealed")


def seal(ctx: typer.Context) -> None:
    """Seal the controller: it forgets its keys until unsealed again."""
    with cli_errors():
        conn(ctx).call("seal", None, api.SealReply)
    typer.echo("controller sealed")
