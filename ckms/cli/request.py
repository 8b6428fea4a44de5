"""``ckms request``: list, show, approve, reject dual-control requests (and ``ckms approve``)."""

from __future__ import annotations

from typing import Annotated

import typer

from ckms.cli._common import JsonOption, call_and_show
from ckms.cli._render import console, table, until, when
from ckms.protocol import admin as api

app = typer.Typer(help="Dual-control requests waiting for a second person.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(help="Request id (r-...).", show_default=False)]


def _state(r: api.RequestInfo) -> str:
    return "expired" if r.expired and r.state == "pending" else r.state


@app.command("list")
def list_requests(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include decided requests.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List pending requests (newest first)."""

    def render(reply: api.RequestListReply) -> None:
        console().print(
            table(
                None,
                ["id", "operation", "object", "requester", "state", "created", "expires"],
                [
                    (
                        r.id,
                        r.operation,
                        r.object,
                        r.requester,
                        _state(r),
                        when(r.created_at),
                        until(r.expires_at),
                    )
                    for r in reply.requests
                ],
            )
        )

    call_and_show(
        ctx,
        "request.list",
        api.RequestListParams(all=all_),
        api.RequestListReply,
        render,
        as_json=as_json,
    )


@app.command("show")
def show(ctx: typer.Context, request_id: IdArg, as_json: JsonOption = False) -> None:
    """Show a request: operation, parameters and decisions."""

    def render(reply: api.RequestInfo) -> None:
        out = console()
        out.print(f"[bold]{reply.id}[/bold] {reply.operation} on {reply.object}: {_state(reply)}")
        out.print(f"requested by {reply.requester} at {when(reply.created_at)}")
        out.print(f"expires {when(reply.expires_at)}")
        out.print(f"parameters: {reply.params}")
        for d in reply.decisions:
            outcome = f"{d.get('outcome', '')} {d.get('error') or ''}".strip()
            out.print(f"  {d.get('at')} {d.get('decision')} by {d.get('by')}: {outcome or '-'}")

    call_and_show(
        ctx, "request.show", api.RequestRef(id=request_id), api.RequestInfo, render, as_json=as_json
    )


@app.command("approve")
def approve(ctx: typer.Context, request_id: IdArg, as_json: JsonOption = False) -> None:
    """Approve another person's request; its operation runs now."""

    def render(reply: api.ApproveReply) -> None:
        r = reply.request
        typer.echo(
            f"approved {r.id}: {r.operation} on {r.object} requested by {r.requester} "
            f"ran ({r.state})"
        )
        if r.operation == "backup.create" and "id" in reply.result:
            typer.echo(
                f"backup {reply.result['id']} made: {r.requester} fetches it with "
                f"`ckms backup -o FILE --id {reply.result['id']}` (within the hour)"
            )

    call_and_show(
        ctx,
        "request.approve",
        api.RequestRef(id=request_id),
        api.ApproveReply,
        render,
        as_json=as_json,
    )


@app.command("reject")
def reject(
    ctx: typer.Context,
    request_id: IdArg,
    reason: Annotated[str | None, typer.Option(help="Why (recorded).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Reject a request (or withdraw your own)."""

    def render(reply: api.RequestInfo) -> None:
        typer.echo(f"rejected {reply.id}: {reply.operation} on {reply.object}")

    call_and_show(
        ctx,
        "request.reject",
        api.RequestRejectParams(id=request_id, reason=reason),
        api.RequestInfo,
        render,
        as_json=as_json,
    )
