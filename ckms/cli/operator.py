"""``ckms operator``: add, list, remove the people who drive the controller (admin only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._common import JsonOption, call_and_show
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import read_text_file
from ckms.cli._render import console, table, when
from ckms.protocol import admin as api

app = typer.Typer(
    help="Operators and their roles: admin, operator, custodian, auditor.", no_args_is_help=True
)

NameArg = Annotated[
    str, typer.Argument(help="Operator name (their SSH login).", show_default=False)
]


@app.command("add")
def add(
    ctx: typer.Context,
    name: NameArg,
    role: Annotated[str, typer.Option(help="admin, operator, custodian or auditor.")],
    key: Annotated[Path, typer.Option("--key", help="Their SSH public key file (.pub).")],
    as_json: JsonOption = False,
) -> None:
    """Add an operator (needs a second admin's or custodian's approval once one exists)."""
    with cli_errors():
        if role not in api.OPERATOR_ROLES:
            raise UsageError(f"--role: use one of {', '.join(api.OPERATOR_ROLES)}")
        public = read_text_file(key, option="--key")
        params = api.OperatorAddParams(name=name, role=role, ssh_public_key=public)  # type: ignore[arg-type]

    def render(reply: api.OperatorReply) -> None:
        op = reply.operator
        typer.echo(f"added operator {op.name} ({op.role}, key {op.fingerprint})")

    call_and_show(ctx, "operator.add", params, api.OperatorReply, render, as_json=as_json)


@app.command("list")
def list_operators(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List operators, their roles and key fingerprints."""

    def render(reply: api.OperatorListReply) -> None:
        console().print(
            table(
                None,
                ["name", "role", "state", "key", "added", "by"],
                [
                    (
                        o.name,
                        o.role,
                        "removed" if o.disabled else "active",
                        o.fingerprint,
                        when(o.created_at),
                        o.created_by,
                    )
                    for o in reply.operators
                ],
            )
        )

    call_and_show(ctx, "operator.list", None, api.OperatorListReply, render, as_json=as_json)


@app.command("remove")
def remove(ctx: typer.Context, name: NameArg, as_json: JsonOption = False) -> None:
    """Remove an operator: their key no longer logs in (dual control)."""

    def render(reply: api.OperatorReply) -> None:
        typer.echo(f"removed operator {reply.operator.name}")

    call_and_show(
        ctx,
        "operator.remove",
        api.OperatorRef(name=name),
        api.OperatorReply,
        render,
        as_json=as_json,
    )
