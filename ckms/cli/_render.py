"""Rendering replies: JSON for scripts (``--json``), rich tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

__all__ = ["age", "console", "err_console", "print_json", "table", "when"]


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Pipes get a wide fixed width so tables are not folded for scripts and logs.
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def console() -> Console:
    """A console on stdout (created per call so tests' captured streams are used)."""
    return _console(False)


def err_console() -> Console:
    """A console on stderr (progress bars, notes that must not pollute --json output)."""
    return _console(True)


def print_json(value: BaseModel | dict[str, Any] | list[Any]) -> None:
    """Print a reply as indented, sorted JSON on stdout."""
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    typer.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def when(value: datetime | None) -> str:
    """A UTC time in a compact readable form, or ``-``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def age(seconds: float | None) -> str:
    """A duration such as ``45s``, ``12m``, ``3h``, ``2d`` (negative: ``in 2d``)."""
    if seconds is None:
        return "-"
    future = seconds < 0
    s = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            text = f"{int(s // size)}{unit}"
            break
    else:
        text = f"{int(s)}s"
    return f"in {text}" if future else text


def until(value: datetime | None, now: datetime | None = None) -> str:
    """How far ``value`` is from now (``in 3d`` or ``2d ago``)."""
    if value is None:
        return "-"
    delta = (value - (now or datetime.now(UTC))).total_seconds()
    return age(-delta) if delta >= 0 else f"{age(-delta)} ago"


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A simple table; cells are converted with ``str``."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*("-" if cell is None else str(cell) for cell in row))
    return t
