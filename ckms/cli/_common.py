"""Shared bits of the noun modules: the connection from the root context, common options, waits."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ckms.cli._client import Connection, Session
from ckms.cli._errors import NotConvergedError
from ckms.cli._render import err_console
from ckms.protocol import admin as api

__all__ = ["JsonOption", "conn", "wait_converged"]

JsonOption = Annotated[bool, typer.Option("--json", help="Print the reply as JSON.")]

POLL_S = 0.5


def conn(ctx: typer.Context) -> Connection:
    """The connection options given to the root command."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Connection) else Connection()


async def wait_converged(
    session: Session, key: str, timeout_s: float, *, progress: bool = True
) -> api.KeyFleet:
    """Poll ``fleet.status`` until every targeted host acknowledged; NotConvergedError if not.

    Shows a live bar (acknowledged hosts / targeted hosts) on stderr.
    """
    deadline = time.monotonic() + timeout_s
    params = api.FleetStatusParams(key=key, limit=20000)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        disable=not progress,
    )
    with bar:
        task = bar.add_task(f"{key}: hosts converged", total=None)
        while True:
            reply = await session.call("fleet.status", params, api.FleetStatusReply)
            fleet = reply.keys[0]
            bar.update(task, total=fleet.targeted, completed=fleet.converged)
            if fleet.converged >= fleet.targeted:
                return fleet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = fleet.not_converged
                failed = [h.host for h in fleet.hosts if h.failed]
                note = f" (failed: {', '.join(failed)})" if failed else ""
                raise NotConvergedError(
                    f"{key}: {fleet.targeted - fleet.converged} of {fleet.targeted} targeted "
                    f"hosts did not converge within {timeout_s:g}s: {', '.join(late)}{note}",
                    late,
                )
            await asyncio.sleep(min(POLL_S, remaining))
