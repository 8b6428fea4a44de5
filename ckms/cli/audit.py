"""``ckms audit``: verify the hash chain and signed checkpoints, tail, export as JSON lines."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._client import run
from ckms.cli._common import JsonOption, conn
from ckms.cli._errors import ExitCode, UsageError, cli_errors, fail
from ckms.cli._render import console, print_json, table
from ckms.errors import AuditVerificationError
from ckms.protocol import admin as api
from ckms.store import audit as audit_log

app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


def _verify_file(path: Path, signing_key: str) -> api.AuditVerifyReply:
    try:
        public = base64.b64decode(signing_key, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(
            "--signing-key: expected the base64 public key `ckms status --json` shows"
        ) from None
    try:
        with path.open(encoding="utf-8") as lines:
            records, checkpoints = audit_log.parse_jsonl(lines)
    except FileNotFoundError:
        raise UsageError(f"--file: {path} does not exist") from None
    except AuditVerificationError as exc:
        return api.AuditVerifyReply(
            ok=False,
            size=0,
            head_hash="",
            checkpoints_verified=0,
            first_bad_index=exc.index,
            reason=str(exc),
        )
    report = audit_log.verify_audit(records, checkpoints, public)
    return api.AuditVerifyReply(**report.model_dump())


@app.command("verify")
def verify(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify an export offline instead of the controller's log."),
    ] = None,
    signing_key: Annotated[
        str | None, typer.Option(help="With --file: the controller's signing public key (base64).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Verify the audit log; name the first record edited, removed, reordered or truncated."""
    with cli_errors():
        if file is not None:
            if not signing_key:
                raise UsageError("--file needs --signing-key (see `ckms status --json`)")
            reply = _verify_file(file, signing_key)
        else:
            reply = conn(ctx).call("audit.verify", None, api.AuditVerifyReply)
    if as_json:
        print_json(reply)
    elif reply.ok:
        typer.echo(
            f"audit log OK: {reply.size} records, {reply.checkpoints_verified} signed "
            f"checkpoints verified, head {reply.head_hash[:16]}"
        )
    if not reply.ok:
        raise fail(
            f"audit log does NOT verify: first bad record {reply.first_bad_index}: {reply.reason}",
            ExitCode.FAILED,
        )


@app.command("tail")
def tail(
    ctx: typer.Context,
    count: Annotated[
        int, typer.Option("-n", "--count", help="How many records.", min=1, max=1000)
    ] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show the newest audit records."""
    with cli_errors():
        reply = conn(ctx).call("audit.tail", api.AuditTailParams(count=count), api.AuditTailReply)
    if as_json:
        print_json(reply)
        return
    console().print(
        table(
            None,
            ["#", "at", "actor", "action", "object", "outcome", "details"],
            [
                (
                    r.index,
                    r.at,
                    r.actor,
                    r.action,
                    r.object,
                    r.outcome,
                    json.dumps(r.details, sort_keys=True)[:100],
                )
                for r in reply.records
            ],
        )
    )


@app.command("export")
def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default stdout).")
    ] = None,
) -> None:
    """Export every record and signed checkpoint as JSON lines (keep a copy off the controller)."""
    connection = conn(ctx)

    async def fetch() -> list[str]:
        lines: list[str] = []
        async with connection.session() as session:
            params = api.AuditExportParams()
            while True:
                page = await session.call("audit.export", params, api.AuditExportReply)
                lines.extend(page.lines)
                if page.next_start is None:
                    return lines
                params = api.AuditExportParams(start=page.next_start, upto=page.upto)

    with cli_errors():
        lines = run(fetch())
        text = "".join(line + "\n" for line in lines)
        if output is None:
            typer.echo(text, nl=False)
        else:
            try:
                output.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"--output: cannot write {output}: {exc.strerror}") from None
            typer.echo(f"exported {len(lines)} lines to {output}", err=True)
