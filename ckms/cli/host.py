"""``ckms host``: enroll (one-time token), list, show, label, revoke."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from ckms.cli._common import JsonOption, call_and_show, conn, show_pages
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import parse_duration, parse_labels
from ckms.cli._render import console, print_json, table, until, when
from ckms.protocol import admin as api

app = typer.Typer(help="Hosts: enroll, list, show, label, revoke.", no_args_is_help=True)

HostArg = Annotated[str, typer.Argument(help="Host id.", show_default=False)]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option("--label", "-l", help="Label name=value (repeat, or comma-separate)."),
]


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _render_hosts(hosts: Sequence[api.HostInfo]) -> None:
    console().print(
        table(
            None,
            ["host", "labels", "state", "last seen", "keys"],
            [
                (
                    h.id,
                    _labels(h.labels),
                    "revoked" if h.revoked else ("stale" if h.stale else "ok"),
                    until(h.last_seen_at),
                    len(h.keys),
                )
                for h in hosts
            ],
        )
    )


@app.command("enroll")
def enroll(
    ctx: typer.Context,
    name: HostArg,
    label: LabelOpt = None,
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token is valid.")] = "1h",
    as_json: JsonOption = False,
) -> None:
    """Make a one-time enrollment token and print the command to run on the host."""
    with cli_errors():
        labels = parse_labels(label or [])
        seconds = int(parse_duration(ttl, option="--ttl").total_seconds())
        if not 1 <= seconds <= 7 * 86400:
            raise UsageError("--ttl: a token lives between 1s and 7d")
        connection = conn(ctx)
        reply = connection.call(
            "host.enroll",
            api.HostEnrollParams(name=name, labels=labels, ttl_s=seconds),
            api.HostEnrollReply,
        )
    command = api.agent_enroll_command(connection.address, reply.host_key_fingerprint)
    if as_json:
        print_json({**reply.model_dump(mode="json"), "agent_command": command})
        return
    # Plain echo, never a rich table: the token must not be wrapped or truncated.
    typer.echo(
        f"Enrollment token for host {reply.host} (single use, expires {when(reply.expires_at)}):"
    )
    typer.echo(f"  {reply.token.get_secret_value()}")
    typer.echo(
        "It is shown only once. On the host, put it in CKMS_AGENT_ENROLL_TOKEN (e.g. "
        "`read -rs CKMS_AGENT_ENROLL_TOKEN; export CKMS_AGENT_ENROLL_TOKEN`) or in a file "
        "given as --token-file, and run:"
    )
    typer.echo(f"  {command}")


@app.command("list")
def list_hosts(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List enrolled hosts (revoked ones included; all pages)."""
    show_pages(ctx, lambda s: api.host_pages(s.call), "hosts", _render_hosts, as_json=as_json)


@app.command("show")
def show(ctx: typer.Context, name: HostArg, as_json: JsonOption = False) -> None:
    """Show a host: labels, last contact and the keys that target it."""

    def render(reply: api.HostInfo) -> None:
        out = console()
        state = "revoked" if reply.revoked else "enrolled"
        stale = "  STALE" if reply.stale else ""
        out.print(f"[bold]{reply.id}[/bold]  {state} {when(reply.enrolled_at)}")
        out.print(f"labels: {_labels(reply.labels)}")
        out.print(f"last seen: {when(reply.last_seen_at)} ({until(reply.last_seen_at)}){stale}")
        out.print(f"wrap suite: {reply.wrap_suite or '-'}")
        out.print(f"keys: {', '.join(reply.keys) or 'none'}")

    call_and_show(ctx, "host.show", api.HostRef(name=name), api.HostInfo, render, as_json=as_json)


@app.command("label")
def label(
    ctx: typer.Context,
    name: HostArg,
    label: LabelOpt = None,
    unset: Annotated[
        list[str] | None, typer.Option("--unset", help="Remove a label (repeat).")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace all labels with the given ones.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Set, remove or replace a host's labels (which keys target it follows from them)."""
    with cli_errors():
        labels = parse_labels(label or [])
        if not labels and not unset and not replace:
            raise UsageError("give --label name=value, --unset name or --replace")
        params = api.HostLabelParams(
            name=name, set=labels, unset=tuple(unset or ()), replace=replace
        )

    def render(reply: api.HostInfo) -> None:
        typer.echo(f"{reply.id}: labels {_labels(reply.labels)}")

    call_and_show(ctx, "host.label", params, api.HostInfo, render, as_json=as_json)


@app.command("revoke")
def revoke(ctx: typer.Context, name: HostArg, as_json: JsonOption = False) -> None:
    """Revoke a host: its key stops working and its keys are no longer sent to it."""

    def render(reply: api.HostInfo) -> None:
        typer.echo(f"revoked host {reply.id}")

    call_and_show(ctx, "host.revoke", api.HostRef(name=name), api.HostInfo, render, as_json=as_json)
