"""``ckms fleet status``: which host holds which version, failures and drift first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from ckms.cli._common import JsonOption, call_and_show, show_pages
from ckms.cli._render import age, console, table, when
from ckms.protocol import admin as api

app = typer.Typer(help="The fleet view: what each host acknowledged.", no_args_is_help=True)


def _versions(host: api.FleetHost) -> str:
    return ", ".join(f"v{v} {s}" for v, s in sorted(host.versions.items())) or "nothing acked"


def _state(host: api.FleetHost) -> str:
    if host.failed:
        return "FAILED"
    if host.drift:
        return "DRIFT"
    return "ok" if host.converged else "pending"


@app.command("status")
def status(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(help="One key (default: every key).")] = None,
    limit: Annotated[
        int,
        typer.Option(help="At most this many hosts per key.", min=1, max=api.FLEET_ROWS_MAX),
    ] = 1000,
    as_json: JsonOption = False,
) -> None:
    """Per key: host x version x status x age, and how much of the fleet converged."""

    def render(keys: Sequence[api.KeyFleet]) -> None:
        out = console()
        for fleet in keys:
            wanted = ", ".join(f"v{v}" for v in fleet.wanted_versions) or "none"
            title = (
                f"{fleet.key}: {fleet.converged}/{fleet.targeted} converged "
                f"({fleet.converged_pct:g}%), {fleet.failed} failed, {fleet.drift} drift; "
                f"primary v{fleet.primary_version or '-'}, distributing {wanted}"
            )
            out.print(title)
            r = fleet.rollout
            if r is not None:
                out.print(
                    f"  rollout v{r.version}: {r.state}, stage {r.stage} of {len(r.stages)} "
                    f"(gate {r.gate})"
                    + (f"; failed on {', '.join(r.failed[:10])}" if r.failed else "")
                    + (f"; held up by {', '.join(r.waiting[:10])}" if r.waiting else "")
                )
            certs = any(h.cert_serial for h in fleet.hosts)
            columns = ["host", "state", "versions", "age", "reason"]
            if certs:
                columns[4:4] = ["certificate", "expires"]
            rows = []
            for h in fleet.hosts:
                row = [h.host, _state(h), _versions(h), age(h.age_s), h.error or ""]
                if certs:
                    installed = "" if h.cert_installed or not h.cert_serial else " (not acked)"
                    row[4:4] = [(h.cert_serial or "-") + installed, when(h.cert_not_after)]
                rows.append(tuple(row))
            out.print(table(None, columns, rows))
            if fleet.truncated:
                out.print(f"... {fleet.truncated} more hosts (raise --limit)")

    if key is not None:
        call_and_show(
            ctx,
            "fleet.status",
            api.FleetStatusParams(key=key, limit=limit),
            api.FleetStatusReply,
            lambda reply: render(reply.keys),
            as_json=as_json,
        )
        return
    show_pages(
        ctx, lambda s: api.fleet_pages(s.call, limit=limit), "keys", render, as_json=as_json
    )
