"""``ckms ca``: the controller's internal CA: show, rotate, retire, crl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._common import JsonOption, call_and_show, write_output
from ckms.cli._render import console, table, when
from ckms.protocol import admin as api

app = typer.Typer(
    help="The internal CA that signs host certificates (tls-cert keys).", no_args_is_help=True
)


def _render(reply: api.CaReply) -> None:
    console().print(
        table(
            None,
            ["generation", "state", "root", "root expires", "issuing", "issuing expires"],
            [
                (
                    g.generation,
                    "active" if g.active else ("trusted" if g.trusted else "retired"),
                    g.root_fingerprint,
                    when(g.root_not_after),
                    g.issuing_fingerprint,
                    when(g.issuing_not_after),
                )
                for g in reply.generations
            ],
        )
    )


def _bundle(path: Path | None, reply: api.CaReply) -> None:
    if path is not None:
        write_output(path, reply.bundle, mode=0o644)
        console().print(f"trust bundle written to {path}")


BundleOpt = Annotated[
    Path | None, typer.Option("--bundle", help="Also write the trust bundle (PEM) to this file.")
]


@app.command("show")
def show(ctx: typer.Context, bundle: BundleOpt = None, as_json: JsonOption = False) -> None:
    """The CA generations (active, trusted, retired) and their fingerprints."""
    reply = call_and_show(ctx, "ca.show", None, api.CaReply, _render, as_json=as_json)
    _bundle(bundle, reply)


@app.command("rotate")
def rotate(ctx: typer.Context, bundle: BundleOpt = None, as_json: JsonOption = False) -> None:
    """Make a new root and intermediate that sign from now on; the old root stays trusted
    until `ckms ca retire` (hosts renew onto the new CA meanwhile)."""
    reply = call_and_show(ctx, "ca.rotate", None, api.CaReply, _render, as_json=as_json)
    _bundle(bundle, reply)


@app.command("retire")
def retire(
    ctx: typer.Context,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Even while hosts still hold certificates of the old generation."
        ),
    ] = False,
    bundle: BundleOpt = None,
    as_json: JsonOption = False,
) -> None:
    """End a rotation's overlap: hosts trust only the active root from now on (refused while
    hosts still hold unexpired certificates of the old generation, unless --force)."""
    reply = call_and_show(
        ctx, "ca.retire", api.CaRetireParams(force=force), api.CaReply, _render, as_json=as_json
    )
    _bundle(bundle, reply)


@app.command("crl")
def crl(
    ctx: typer.Context,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the CRL (PEM) here (default stdout).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a CRL per trusted CA generation listing revoked, unexpired host certificates."""

    def render(reply: api.CrlReply) -> None:
        if out is None:
            typer.echo(reply.crl, nl=False)
            return
        write_output(out, reply.crl, mode=0o644)  # a reader sees the old CRL or the new
        console().print(f"CRL with {len(reply.serials)} revoked serials written to {out}")

    call_and_show(ctx, "ca.crl", None, api.CrlReply, render, as_json=as_json)
