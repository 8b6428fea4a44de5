"""``ckms audit``: verify the hash chain and signed checkpoints, tail, export as JSON lines."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from ckms._kafka import read_newest
from ckms._kafka_security import KafkaLink, KafkaProtocol, KafkaSecurity
from ckms.cli._client import run
from ckms.cli._common import JsonOption, call_and_show, conn
from ckms.cli._errors import ExitCode, UsageError, cli_errors, fail
from ckms.cli._render import console, print_json, table
from ckms.crypto import signer_key_id
from ckms.errors import AuditVerificationError
from ckms.protocol import AUDIT_TOPIC
from ckms.protocol import admin as api
from ckms.store import audit as audit_log

app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


def _anchor_from_kafka(kafka: KafkaLink, topic: str, public: bytes) -> audit_log.Anchor:
    """The newest checkpoint this controller published on the anchor topic (its signature is
    checked by the verifier)."""
    value = run(read_newest(kafka, topic, key=signer_key_id(public).encode()))
    if value is None:
        raise UsageError(f"{topic} holds no audit anchor of this controller yet")
    try:
        return audit_log.Anchor.of(audit_log.parse_checkpoint_line(value))
    except ValueError:
        raise UsageError(f"the newest record on {topic} is not an audit checkpoint") from None


def _public(signing_key: str) -> bytes:
    try:
        return base64.b64decode(signing_key, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(
            "--signing-key: expected the base64 public key `ckms status --json` shows"
        ) from None


def _verify_file(
    path: Path, signing_key: str, anchor: audit_log.Anchor | None
) -> api.AuditVerifyReply:
    public = _public(signing_key)
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
    report = audit_log.verify_audit(records, checkpoints, public, anchor=anchor)
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
    anchor: Annotated[
        str | None,
        typer.Option(
            help="With --file: an anchor kept elsewhere, SIZE:HEAD (as `ckms status` shows it); "
            "the export must extend it and hold its checkpoint."
        ),
    ] = None,
    anchor_from_kafka: Annotated[
        bool,
        typer.Option(
            "--anchor-from-kafka",
            help="With --file: use the newest checkpoint on the anchor topic as the anchor.",
        ),
    ] = False,
    kafka_bootstrap: Annotated[
        str | None,
        typer.Option(envvar="CKMS_KAFKA_BOOTSTRAP", help="With --anchor-from-kafka: HOST:PORT."),
    ] = None,
    kafka_security_protocol: Annotated[
        KafkaProtocol,
        typer.Option(envvar="CKMS_KAFKA_SECURITY_PROTOCOL", help="SSL, SASL_SSL or PLAINTEXT."),
    ] = KafkaProtocol.SSL,
    kafka_ca_file: Annotated[
        Path | None,
        typer.Option(envvar="CKMS_KAFKA_CA_FILE", help="CA bundle the brokers chain to."),
    ] = None,
    kafka_cert_file: Annotated[
        Path | None,
        typer.Option(envvar="CKMS_KAFKA_CERT_FILE", help="Client certificate (PEM, chain)."),
    ] = None,
    kafka_key_file: Annotated[
        Path | None, typer.Option(envvar="CKMS_KAFKA_KEY_FILE", help="Its private key (PEM).")
    ] = None,
    kafka_sasl_file: Annotated[
        Path | None,
        typer.Option(
            envvar="CKMS_KAFKA_SASL_FILE", help="SASL_SSL: TOML file with username, password."
        ),
    ] = None,
    audit_topic: Annotated[
        str, typer.Option(help="With --anchor-from-kafka: the anchor topic.")
    ] = AUDIT_TOPIC,
    as_json: JsonOption = False,
) -> None:
    """Verify the audit log; name the first record edited, removed, reordered or truncated.

    Against an anchor kept outside the controller (``--anchor`` or ``--anchor-from-kafka``), a
    cut-off tail, deleted checkpoints and a rewritten tail up to the anchor are found too.
    """
    with cli_errors():
        if file is not None:
            if not signing_key:
                raise UsageError("--file needs --signing-key (see `ckms status --json`)")
            if anchor is not None and anchor_from_kafka:
                raise UsageError("give --anchor or --anchor-from-kafka, not both")
            kept: audit_log.Anchor | None = None
            if anchor is not None:
                try:
                    kept = audit_log.parse_anchor(anchor)
                except ValueError as exc:
                    raise UsageError(f"--anchor: {exc}") from None
            elif anchor_from_kafka:
                if not kafka_bootstrap:
                    raise UsageError("--anchor-from-kafka needs --kafka-bootstrap HOST:PORT")
                try:
                    security = KafkaSecurity(
                        protocol=kafka_security_protocol,
                        ca_file=kafka_ca_file,
                        cert_file=kafka_cert_file,
                        key_file=kafka_key_file,
                        sasl_file=kafka_sasl_file,
                    )
                except ValidationError as exc:
                    raise UsageError(exc.errors(include_url=False)[0]["msg"]) from None
                security.check()
                link = KafkaLink(kafka_bootstrap, security)
                kept = _anchor_from_kafka(link, audit_topic, _public(signing_key))
            reply = _verify_file(file, signing_key, kept)
        else:
            if anchor is not None or anchor_from_kafka:
                raise UsageError("--anchor and --anchor-from-kafka verify an export: add --file")
            reply = conn(ctx).call("audit.verify", None, api.AuditVerifyReply)
    if as_json:
        print_json(reply)
    elif reply.ok:
        anchored = "" if reply.anchor_size is None else f", extends anchor {reply.anchor_size}"
        typer.echo(
            f"audit log OK: {reply.size} records, {reply.checkpoints_verified} signed "
            f"checkpoints verified{anchored}, head {reply.head_hash[:16]}"
        )
        if reply.checkpoint_size == reply.size:
            typer.echo(f"anchor (keep a copy elsewhere): {reply.size}:{reply.head_hash}")
    if not reply.ok:
        where = (
            f"first bad record {reply.first_bad_index}: "
            if reply.first_bad_index is not None
            else f"checkpoint {reply.bad_checkpoint_size}: "
            if reply.bad_checkpoint_size is not None
            else ""
        )
        raise fail(f"audit log does NOT verify: {where}{reply.reason}", ExitCode.FAILED)


@app.command("tail")
def tail(
    ctx: typer.Context,
    count: Annotated[
        int, typer.Option("-n", "--count", help="How many records.", min=1, max=1000)
    ] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show the newest audit records."""

    def render(reply: api.AuditTailReply) -> None:
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

    call_and_show(
        ctx,
        "audit.tail",
        api.AuditTailParams(count=count),
        api.AuditTailReply,
        render,
        as_json=as_json,
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
