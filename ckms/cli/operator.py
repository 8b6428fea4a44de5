"""``ckms operator``: add, list, remove the people who drive the controller (admin only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._common import JsonOption, conn
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import read_text_file
from ckms.cli._render import console, print_json, table, when
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
        reply = conn(ctx).call(
            "operator.add",
            api.OperatorAddParams(name=name, role=role, ssh_public_key=public),  # type: ignore[arg-type]
            api.OperatorReply,
        )
    if as_json:
        print_json(reply)
    else:
        op = reply.operator
        typer.echo(f"added operator {op.name} ({op.role}, key {op.fingerprint})")


@app.command("list")
def list_operators(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List operators, their roles and key fingerprints."""
    with cli_errors():
        reply = conn(ctx).call("operator.list", None, api.OperatorListReply)
    if as_json:
        print_json(reply)
        return
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


@app.command("remove")
def remove(ctx: typer.Context, name: NameArg, as_json: JsonOption = False) -> None:
    """Remove an operator: their key no longer logs in (dual control)."""
    with cli_errors():
        reply = conn(ctx).call("operator.remove", api.OperatorRef(name=name), api.OperatorReply)
    if as_json:
        print_json(reply)
    else:
        typer.echo(f"removed operator {reply.operator.name}")
