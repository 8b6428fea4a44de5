"""Shared bits of the noun modules: the connection from the root context, common options, waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar

import typer
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ckms import _gc
from ckms.cli._client import Connection, Session, run
from ckms.cli._errors import NotConvergedError, cli_errors
from ckms.cli._render import err_console, json_text, print_json
from ckms.protocol import admin as api

__all__ = [
    "JsonOption",
    "MaxFailuresOpt",
    "call_and_show",
    "conn",
    "output_file",
    "show_pages",
    "wait_converged",
    "write_output",
]

M = TypeVar("M", bound=BaseModel)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the reply as JSON.")]

MaxFailuresOpt = Annotated[
    str | None,
    typer.Option(
        "--max-failures",
        help="How many hosts of a stage may fail before it halts: N hosts or P% of the stage's "
        "(default 0: one failure halts). Failed hosts within it are named as holdouts.",
    ),
]

POLL_S = 0.5


@contextlib.contextmanager
def output_file(output: Path | None, *, mode: int = 0o600) -> Iterator[TextIO]:
    """stdout, or a temporary file beside ``output`` (same directory, so the rename is atomic)
    renamed over it once complete and fsync'd: a reader of ``output`` sees the old file or the
    whole new one, never a truncated one, and a failure leaves the old file and no temp."""
    if output is None:
        yield sys.stdout
        return
    tmp = output.parent / f".{output.name}.{secrets.token_hex(4)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def write_output(output: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``output`` atomically (:func:`output_file`)."""
    with output_file(output, mode=mode) as out:
        out.write(text)


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
    # Failures and hosts still pending sort first: the page names the late ones.
    params = api.FleetStatusParams(key=key, limit=api.FLEET_ROWS_MAX)
    bar = _progress_bar(progress)
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


_ROLLOUT_ENDED = {"completed": None, "cancelled": "was cancelled"}
_ROLLOUT_STUCK = {"halted": "halted", "expired": "expired", "rolled-back": "was rolled back"}


async def wait_rollout(
    session: Session, key: str, version: int, timeout_s: float, *, progress: bool = True
) -> api.RolloutInfo:
    """Poll ``rollout.status`` until the rollout of ``version`` completed (the version is
    primary); NotConvergedError when it halted, expired, was rolled back or cancelled, or the
    time ran out, naming the hosts that failed or hold it up."""
    deadline = time.monotonic() + timeout_s
    params = api.KeyRef(name=key)
    bar = _progress_bar(progress)
    with bar:
        task = bar.add_task(f"{key} v{version}: stage 1", total=None)
        while True:
            info = (await session.call("rollout.status", params, api.RolloutStatusReply)).rollout
            if info.version != version:
                raise NotConvergedError(f"{key}: another rollout replaced v{version}", [])
            bar.update(
                task,
                description=f"{key} v{version}: stage {info.stage} of {len(info.stages)}",
                total=info.hosts,
                completed=len(info.acked),
            )
            state = str(info.state)
            if state == "completed":
                return info
            why = _ROLLOUT_STUCK.get(state) or _ROLLOUT_ENDED.get(state)
            remaining = deadline - time.monotonic()
            if why is not None or remaining <= 0:
                hosts = list(info.failed or info.waiting)
                named = f": {', '.join(hosts[:20])}" if hosts else ""
                what = "failed on" if info.failed else "held up by"
                raise NotConvergedError(
                    f"{key} v{version}: rollout "
                    + (why if why is not None else f"not complete within {timeout_s:g}s")
                    + f" at stage {info.stage} of {len(info.stages)}"
                    + (f", {what}{named}" if hosts else "")
                    + (f" ({info.reason})" if info.reason and why is not None else ""),
                    hosts,
                )
            await asyncio.sleep(min(POLL_S, remaining))


def _progress_bar(progress: bool) -> Progress:
    """The live bar of the waits (acknowledged hosts / targeted hosts) on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        disable=not progress,
    )


def call_and_show(
    ctx: typer.Context,
    method: str,
    params: BaseModel | None,
    reply_type: type[M],
    render: Callable[[M], None],
    *,
    as_json: bool,
    json_part: Callable[[M], BaseModel] | None = None,
) -> M:
    """Call one admin method and print its reply: indented JSON with ``--json``, else ``render``.

    ``json_part`` picks the part of the reply ``--json`` prints (the whole reply by default).

    The one shape of every read (and most changes) of the CLI: errors of the call become one
    stderr line and the exit code of :func:`~ckms.cli._errors.cli_errors`.
    """
    with cli_errors():
        reply = conn(ctx).call(method, params, reply_type)
    if as_json:
        print_json(reply if json_part is None else json_part(reply))
    else:
        render(reply)
    return reply


def show_pages(
    ctx: typer.Context,
    pages: Callable[[Session], AsyncIterator[BaseModel]],
    field: str,
    render: Callable[[list[M]], None],
    *,
    as_json: bool,
) -> None:
    """Follow every page of a paged read; print ``{field: [...]}`` as JSON or ``render`` them.

    ``--json`` prints each page as it arrives, so memory stays one page however many items
    (100,000 keys, 10,000 hosts); the output is one JSON document either way.
    """

    async def follow() -> list[M]:
        shown: list[M] = []
        first = True
        if as_json:
            typer.echo(f'{{\n  "{field}": [', nl=False)
        async with conn(ctx).session() as session:
            async for page in pages(session):
                items: Sequence[M] = getattr(page, field)
                if not as_json:
                    shown.extend(items)
                    continue
                if items:
                    text = _json_items(page.model_dump(mode="json", include={field})[field])
                    typer.echo(("\n" if first else ",\n") + text, nl=False)  # one write a page
                    first = False
        if as_json:
            typer.echo(("\n  " if not first else "") + "]\n}")
        return shown

    # No garbage collection while the pages arrive: each pass would walk every item kept so
    # far (and every module loaded), so a listing of 100,000 keys spent more time collecting
    # than reading. What a page leaves behind is freed by reference counts as before.
    with cli_errors(), _gc.paused():
        items = run(follow())
    if not as_json:
        render(items)


def _json_items(items: list[Any]) -> str:
    """``items`` as :func:`show_pages` prints them: each as ``json_text`` writes it, indented
    by four spaces, separated by ``,`` and a newline (one encoding a page, not one an item)."""
    text = json_text({"": items})  # {"": [items at four spaces]}: the array's inside is the text
    start, end = text.index("[\n") + 2, text.rindex("\n  ]")
    return text[start:end]

