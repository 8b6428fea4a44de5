"""``ckms report inventory|compliance [--json|--html] [--output FILE]``: evidence for auditors.

Both read the live controller: ``report.summary`` once (it verifies the audit log), then every
page of ``report.keys``, written out as each page arrives, so a report of 100,000 keys never
sits whole in memory on either side. ``inventory`` lists every key (PCI DSS 3.6.1.1);
``compliance`` lists the findings (controller-wide, then the keys that have any) and totals.
HTML is one self-contained page, every value escaped, no script.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import typer

from ckms.cli._client import run
from ckms.cli._common import conn, output_file
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._render import age
from ckms.protocol import admin as api

app = typer.Typer(
    help="Evidence for auditors: key inventory and compliance findings, from the live system.",
    no_args_is_help=True,
)

Kind = Literal["inventory", "compliance"]

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON (one document, streamed).")]
HtmlOpt = Annotated[bool, typer.Option("--html", help="A self-contained HTML page.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Write to FILE (atomically, mode 0600) instead of stdout."),
]


@app.command("inventory")
def inventory(
    ctx: typer.Context, as_json: JsonOpt = False, as_html: HtmlOpt = False, output: OutputOpt = None
) -> None:
    """Every key: type, purpose, cryptoperiod, created/rotated/next due, dual-control requests
    with requesters and approvers, which hosts hold which version, and the audit verification."""
    _report(ctx, "inventory", as_json=as_json, as_html=as_html, output=output)


@app.command("compliance")
def compliance(
    ctx: typer.Context, as_json: JsonOpt = False, as_html: HtmlOpt = False, output: OutputOpt = None
) -> None:
    """What needs attention: overdue rotations, keys without an Active primary or without dual
    control on destroy, revoked versions still installed, hosts behind, audit problems."""
    _report(ctx, "compliance", as_json=as_json, as_html=as_html, output=output)


def _report(
    ctx: typer.Context, kind: Kind, *, as_json: bool, as_html: bool, output: Path | None
) -> None:
    with cli_errors():
        if as_json and as_html:
            raise UsageError("give --json or --html, not both")
        style = "json" if as_json else "html" if as_html else "text"
        connection = conn(ctx)

        async def go(out: TextIO) -> None:
            async with connection.session() as session:
                summary = await session.call("report.summary", api.Empty(), api.ReportSummary)
                writer = _WRITERS[style](out, kind, summary)
                async for page in api.report_pages(session.call):
                    for key in page.keys:
                        writer.key(key)
                writer.end()

        with output_file(output) as out:
            run(go(out))


def _t(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def _holders(key: api.ReportKey) -> str:
    parts = []
    for v in key.versions:
        if v.holders_total:
            shown = ", ".join(v.holders)
            more = v.holders_total - len(v.holders)
            parts.append(f"v{v.version}: {shown}" + (f" (+{more} more)" if more else ""))
    return "; ".join(parts) or "-"


def _approvals(key: api.ReportKey) -> str:
    out = []
    for r in key.approvals:
        deciders = ", ".join(
            f"{d.get('decision')} by {d.get('by')} ({d.get('role')})"
            + (f": {d['reason']}" if d.get("reason") else "")
            for d in r.decisions
        )
        out.append(
            f"{r.id} {r.operation} by {r.requester}: {r.state}"
            + (f" [{deciders}]" if deciders else "")
        )
    return "; ".join(out) or "-"


class _Totals:
    def __init__(self) -> None:
        self.keys = 0
        self.with_findings = 0
        self.overdue = 0
        self.findings = 0

    def add(self, key: api.ReportKey) -> None:
        self.keys += 1
        self.overdue += key.overdue
        self.findings += len(key.findings)
        self.with_findings += bool(key.findings)

    def dump(self) -> dict[str, int]:
        return {
            "keys": self.keys,
            "keys_with_findings": self.with_findings,
            "rotations_overdue": self.overdue,
            "findings": self.findings,
        }


class _Writer:
    """Writes one report as its keys arrive."""

    def __init__(self, out: TextIO, kind: Kind, summary: api.ReportSummary) -> None:
        self.out = out
        self.kind = kind
        self.summary = summary
        self.totals = _Totals()
        self.begin()

    def shows(self, key: api.ReportKey) -> bool:
        return self.kind == "inventory" or bool(key.findings)

    def key(self, key: api.ReportKey) -> None:
        self.totals.add(key)
        if self.shows(key):
            self.row(key)

    def begin(self) -> None: ...

    def row(self, key: api.ReportKey) -> None: ...

    def end(self) -> None: ...


class _Text(_Writer):
    def begin(self) -> None:
        s, a = self.summary, self.summary.audit
        w = self.out.write
        w(
            f"ckms {self.kind} report, generated {_t(s.generated_at)} from the live controller "
            f"(signer {s.signer_key_id or '-'})\n"
        )
        w(
            f"keys {s.keys}, hosts {s.hosts} (+{s.hosts_revoked} revoked), overdue rotations "
            f"{s.rotations_overdue}, pending requests {s.pending_requests}\n"
        )
        w(
            f"audit log: {'verified' if a.ok else 'DOES NOT VERIFY: ' + str(a.reason)}, "
            f"{a.size} records, head {a.head_hash}, checkpoint {a.checkpoint_size} "
            f"({a.checkpoint_head or '-'}), {a.checkpoints_verified} checkpoints verified\n"
        )
        w("custodians: " + (", ".join(p.name for p in s.custodians) or "-") + "\n")
        w("approvers: " + (", ".join(f"{p.name} ({p.role})" for p in s.approvers) or "-") + "\n")
        for finding in s.findings:
            w(f"finding: {finding}\n")
        w("\n")

    def row(self, key: api.ReportKey) -> None:
        w = self.out.write
        primary = next((v for v in key.versions if v.primary), None)
        w(
            f"{key.name}  {key.type} ({key.purpose})  cryptoperiod {age(key.cryptoperiod_s)}  "
            f"primary v{key.primary_version or '-'}"
            f"{' (' + primary.origin + ')' if primary else ''}  created {_t(key.created_at)}  "
            f"rotated {_t(key.rotated_at)}  next due {_t(key.next_rotation_at)}"
            f"{'  OVERDUE' if key.overdue else ''}\n"
        )
        w(
            f"  hosts {key.hosts_converged}/{key.hosts_targeted} converged; holding: "
            f"{_holders(key)}\n"
        )
        w(
            f"  dual control: {', '.join(key.approvals_required) or 'none'}; requests: "
            f"{_approvals(key)}\n"
        )
        for finding in key.findings:
            w(f"  finding: {finding}\n")

    def end(self) -> None:
        t = self.totals
        self.out.write(
            f"\n{t.keys} keys, {t.with_findings} with findings ({t.findings} findings), "
            f"{t.overdue} rotations overdue\n"
        )


class _Json(_Writer):
    def begin(self) -> None:
        head = json.dumps({"report": self.kind, "summary": self.summary.model_dump(mode="json")})
        self.out.write(head[:-1] + ', "keys": [')
        self.first = True

    def row(self, key: api.ReportKey) -> None:
        self.out.write(("" if self.first else ",") + "\n" + key.model_dump_json())
        self.first = False

    def end(self) -> None:
        self.out.write('\n], "totals": ' + json.dumps(self.totals.dump()) + "}\n")


_CSS = (
    "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}"
    ".bad{color:#a00;font-weight:bold}"
)


def _e(value: Any) -> str:
    """Every value a page shows goes through here: escaped, quotes included."""
    return html.escape("-" if value is None else str(value), quote=True)


class _Html(_Writer):
    def begin(self) -> None:
        s, a = self.summary, self.summary.audit
        w = self.out.write
        title = f"ckms {self.kind} report"
        w(
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        )
        w(f"<h1>{_e(title)}</h1>\n<table>\n")
        facts: list[tuple[str, Any]] = [
            ("generated", _t(s.generated_at)),
            ("signer key id", s.signer_key_id),
            ("keys", s.keys),
            ("hosts", f"{s.hosts} (+{s.hosts_revoked} revoked)"),
            ("rotations overdue", s.rotations_overdue),
            ("pending requests", s.pending_requests),
            ("stale hosts", ", ".join(s.stale_hosts) or "-"),
            ("custodians", ", ".join(p.name for p in s.custodians) or "-"),
            ("approvers", ", ".join(f"{p.name} ({p.role})" for p in s.approvers) or "-"),
            ("audit log", "verified" if a.ok else f"DOES NOT VERIFY: {a.reason}"),
            ("audit head", f"{a.size} records, {a.head_hash}"),
            (
                "checkpoint verified",
                f"{a.checkpoint_size} records, {a.checkpoint_head}, signed {a.checkpoint_at}",
            ),
        ]
        for name, value in facts:
            w(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>\n")
        w("</table>\n")
        if s.findings:
            w("<h2>Findings</h2>\n<ul>\n")
            for finding in s.findings:
                w(f'<li class="bad">{_e(finding)}</li>\n')
            w("</ul>\n")
        w(
            "<h2>Keys</h2>\n<table>\n<tr>"
            + "".join(
                f"<th>{_e(h)}</th>"
                for h in (
                    "key",
                    "type",
                    "purpose",
                    "cryptoperiod",
                    "created",
                    "rotated",
                    "next due",
                    "primary",
                    "versions",
                    "hosts holding",
                    "dual control",
                    "requests",
                    "findings",
                )
            )
            + "</tr>\n"
        )

    def row(self, key: api.ReportKey) -> None:
        versions = "; ".join(f"v{v.version} {v.state} ({v.origin})" for v in key.versions)
        cells = [
            key.name,
            key.type,
            key.purpose,
            age(key.cryptoperiod_s),
            _t(key.created_at),
            _t(key.rotated_at),
            _t(key.next_rotation_at) + (" OVERDUE" if key.overdue else ""),
            key.primary_version,
            versions,
            f"{key.hosts_converged}/{key.hosts_targeted} converged; {_holders(key)}",
            ", ".join(key.approvals_required) or "none",
            _approvals(key),
        ]
        row = "".join(f"<td>{_e(c)}</td>" for c in cells)
        found = "<br>".join(_e(f) for f in key.findings) or "-"
        self.out.write(f'<tr>{row}<td class="bad">{found}</td></tr>\n')

    def end(self) -> None:
        t = self.totals
        self.out.write(
            f"</table>\n<p>{_e(t.keys)} keys, {_e(t.with_findings)} with findings "
            f"({_e(t.findings)} findings), {_e(t.overdue)} rotations overdue.</p>\n"
            "</body></html>\n"
        )


_WRITERS: dict[str, type[_Writer]] = {"text": _Text, "json": _Json, "html": _Html}
