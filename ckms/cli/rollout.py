"""``ckms rollout``: status, list, resume, abort a key's staged (or converging) rotation."""

from __future__ import annotations

from typing import Annotated

import typer

from ckms.cli._common import JsonOption, MaxFailuresOpt, call_and_show
from ckms.cli._errors import cli_errors
from ckms.cli._parse import parse_duration
from ckms.cli._render import console, table, when
from ckms.protocol import admin as api
from ckms.protocol import format_stages, validate_key_name

app = typer.Typer(
    help="Rollouts of rotated versions: stages, gates, who holds them up.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Key name, team/purpose.", show_default=False)]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (recorded in the audit).")]

_SHOWN = 20


def _hosts(hosts: tuple[str, ...]) -> str:
    shown = ", ".join(hosts[:_SHOWN])
    return shown + (f" and {len(hosts) - _SHOWN} more" if len(hosts) > _SHOWN else "")


def render_rollout(info: api.RolloutInfo) -> None:
    """A rollout as ``rollout status`` prints it (also used by ``status``)."""
    out = console()
    released = "every targeted host" if info.released is None else f"{info.released} hosts"
    out.print(
        f"{info.key} v{info.version}: {info.state}, stage {info.stage} of {len(info.stages)} "
        f"({format_stages(info.stages)}, gate {info.gate}); released to {released}; "
        f"primary v{info.primary_version or '-'}"
    )
    out.print(
        f"  started {when(info.started_at)} by {info.started_by}; stage out since "
        f"{when(info.stage_started_at)}; deadline {when(info.deadline_at)}"
    )
    if info.reason:
        out.print(f"  last step: {info.reason}")
    if info.hosts is not None:
        out.print(
            f"  gate {'holds' if info.gate_holds else 'does not hold'}: {len(info.acked)} of "
            f"{info.hosts - len(info.uncounted)} counted hosts acknowledged "
            f"(threshold {info.threshold_pct}%)"
        )
    if info.failed:
        within = info.gate_holds or info.state != "halted"
        label = "failed (holdouts, within the failure budget)" if within else "FAILED on"
        out.print(f"  {label}: {_hosts(info.failed)}")
    if info.max_failures:
        out.print(f"  failure budget: {info.max_failures} of a stage's hosts")
    if info.waiting:
        out.print(f"  held up by: {_hosts(info.waiting)}")
    if info.uncounted:
        out.print(f"  not counted (stale past max staleness): {_hosts(info.uncounted)}")


def _name(name: str) -> str:
    with cli_errors():
        return validate_key_name(name)


@app.command("status")
def status(ctx: typer.Context, name: NameArg, as_json: JsonOption = False) -> None:
    """A key's rollout: stage, state, gate, and which hosts hold it up or failed it."""
    call_and_show(
        ctx,
        "rollout.status",
        api.KeyRef(name=_name(name)),
        api.RolloutStatusReply,
        lambda r: render_rollout(r.rollout),
        as_json=as_json,
        json_part=lambda r: r.rollout,
    )


@app.command("list")
def list_rollouts(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every rollout not ended (running, halted, rolled back, expired)."""

    def render(reply: api.RolloutListReply) -> None:
        console().print(
            table(
                None,
                ["key", "version", "state", "stage", "gate", "held up by", "failed"],
                [
                    (
                        r.key,
                        r.version,
                        r.state,
                        f"{r.stage}/{len(r.stages)}",
                        r.gate,
                        _hosts(r.waiting),
                        _hosts(r.failed),
                    )
                    for r in reply.rollouts
                ],
            )
        )

    call_and_show(ctx, "rollout.list", None, api.RolloutListReply, render, as_json=as_json)


@app.command("resume")
def resume(
    ctx: typer.Context,
    name: NameArg,
    reason: ReasonOpt = None,
    deadline: Annotated[
        str | None,
        typer.Option("--deadline", help="A new deadline from now (default: the policy's)."),
    ] = None,
    max_failures: MaxFailuresOpt = None,
    as_json: JsonOption = False,
) -> None:
    """Go on with a halted, rolled-back or expired rollout (dual control as for rotate);
    --max-failures sets the failure budget from now on, to go on past hosts that keep failing
    (they are named as holdouts)."""
    with cli_errors():
        seconds = (
            None
            if deadline is None
            else int(parse_duration(deadline, option="--deadline").total_seconds())
        )
        params = api.RolloutResumeParams(
            name=_name(name), reason=reason, deadline_s=seconds, max_failures=max_failures
        )
    call_and_show(
        ctx,
        "rollout.resume",
        params,
        api.RolloutStatusReply,
        lambda r: render_rollout(r.rollout),
        as_json=as_json,
        json_part=lambda r: r.rollout,
    )


@app.command("abort")
def abort(
    ctx: typer.Context, name: NameArg, reason: ReasonOpt = None, as_json: JsonOption = False
) -> None:
    """Roll back the stage in progress: its hosts drop the new version; the old stays primary."""
    call_and_show(
        ctx,
        "rollout.abort",
        api.RolloutRef(name=_name(name), reason=reason),
        api.RolloutStatusReply,
        lambda r: render_rollout(r.rollout),
        as_json=as_json,
        json_part=lambda r: r.rollout,
    )
