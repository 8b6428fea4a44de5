"""Rendering replies: JSON for scripts (``--json``), rich tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pydantic_core
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

__all__ = [
    "age",
    "console",
    "err_console",
    "json_text",
    "print_json",
    "print_table",
    "table",
    "when",
]


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


def json_text(value: Any) -> str:
    """``value`` (JSON data) as ``json.dumps(value, indent=2, sort_keys=True)`` writes it.

    Through pydantic-core's encoder, about 4x faster than the json module's indenting one
    (listing 100,000 keys spent most of its time there); text that is not all ASCII, which
    the two would write differently (escaped or not), goes through the json module.
    """
    text = pydantic_core.to_json(_sorted(value), indent=2).decode("utf-8")
    if text.isascii():
        return text
    return json.dumps(value, indent=2, sort_keys=True)


_LEAVES = frozenset((str, int, float, bool, type(None)))


def _sorted(value: Any) -> Any:
    """``value`` with every object's keys in order (what ``sort_keys`` does), copying only the
    objects and arrays: every item of a 100,000-key listing goes through here."""
    if isinstance(value, dict):
        return {
            k: v if type(v) in _LEAVES else _sorted(v)
            for k, v in sorted(value.items())  # keys differ: values are never compared
        }
    if isinstance(value, list | tuple):
        return [v if type(v) in _LEAVES else _sorted(v) for v in value]
    return value


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


PLAIN_ROWS_ABOVE = 1000
"""Rows above which :func:`print_table` writes plain aligned columns: rich lays a table out at
about half a millisecond a row (100,000 keys took 45 s to print)."""


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a table on stdout: :func:`table` for a screenful, plain aligned columns (two
    spaces apart, as the table lays them out, never folded) for a long listing."""
    cells = [tuple("-" if cell is None else str(cell) for cell in row) for row in rows]
    if len(cells) <= PLAIN_ROWS_ABOVE:
        console().print(table(None, columns, cells))
        return
    widths = [max(len(name), *(len(row[i]) for row in cells)) for i, name in enumerate(columns)]
    out = sys.stdout
    for row in [tuple(columns), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A simple table; cells are converted with ``str``."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*("-" if cell is None else str(cell) for cell in row))
    return t
