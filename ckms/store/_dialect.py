"""The few places SQL differs between the store's two engines, in one place.

The application writes one SQL text for both engines: ``?`` placeholders, ``ON CONFLICT``
upserts, ``IS NOT DISTINCT FROM``, fixed-width RFC 3339 text for times. What still differs is
here: placeholders (PostgreSQL numbers them, ``$1``), reading one field of a JSON text column,
and the outbox's never-reused sequence. No regular expressions over SQL: the placeholder
translation is a tokenizer that skips string literals, quoted names and comments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from ckms.errors import StoreError

Engine = Literal["sqlite", "postgresql"]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one engine spells the constructs the application SQL cannot share."""

    name: Engine

    def sql(self, text: str) -> str:
        """``text`` with its ``?`` placeholders in this engine's form."""
        return text if self.name == "sqlite" else numbered_placeholders(text)

    def bind(
        self, text: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> tuple[str, Sequence[Any]]:
        """``text`` in this engine's form and its arguments in order: ``?`` placeholders take
        a sequence, ``:name`` ones a mapping (as sqlite3 does)."""
        if self.name == "sqlite":
            return text, params  # type: ignore[return-value]
        if isinstance(params, Mapping):
            sql, names = _translate(text, named=True)
            try:
                return sql, [params[name] for name in names]
            except KeyError as exc:
                raise StoreError(f"no value for the SQL parameter :{exc.args[0]}") from None
        return _translate(text, named=False)[0], params

    def json_text(self, column: str, field: str) -> str:
        """An expression for the text of top-level ``field`` of JSON text ``column`` (NULL if
        absent). ``column`` and ``field`` are names from the code, never input."""
        _check_name(column)
        _check_name(field)
        if self.name == "sqlite":
            return f"json_extract({column}, '$.{field}')"
        return f"(({column})::jsonb ->> '{field}')"

    def json_int(self, column: str, field: str) -> str:
        """Like :meth:`json_text`, as an integer."""
        if self.name == "sqlite":
            return self.json_text(column, field)
        return f"({self.json_text(column, field)})::bigint"


SQLITE = Dialect("sqlite")
POSTGRESQL = Dialect("postgresql")


def _check_name(name: str) -> None:
    if not name.replace("_", "").isalnum():
        raise StoreError(f"not a plain SQL name: {name!r}")


def numbered_placeholders(text: str) -> str:
    """Turn each ``?`` outside literals, quoted names and comments into ``$1``, ``$2``, ..."""
    return _translate(text, named=False)[0]


@lru_cache(maxsize=4096)
def _translate(text: str, *, named: bool) -> tuple[str, tuple[str, ...]]:
    """``text`` with ``?`` (or, ``named``, ``:name``) placeholders numbered, and the names in
    the order of their numbers (a name used twice keeps its first number).

    Cached: the application's statements are a fixed set of texts (those built with a
    variable number of ``?`` in an ``IN`` list are a few shapes each).
    """
    out: list[str] = []
    names: list[str] = []
    n = 0
    i = 0
    length = len(text)
    while i < length:
        c = text[i]
        if c in ("'", '"'):
            end = text.find(c, i + 1)
            while end != -1 and end + 1 < length and text[end + 1] == c:  # doubled quote
                end = text.find(c, end + 2)
            if end == -1:
                raise StoreError("unterminated quote in SQL")
            out.append(text[i : end + 1])
            i = end + 1
        elif c == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            end = length if end == -1 else end
            out.append(text[i:end])
            i = end
        elif c == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise StoreError("unterminated comment in SQL")
            out.append(text[i : end + 2])
            i = end + 2
        elif c == "?" and not named:
            n += 1
            out.append(f"${n}")
            i += 1
        elif c == ":" and text.startswith("::", i):
            out.append("::")  # a PostgreSQL cast
            i += 2
        elif (
            c == ":" and named and i + 1 < length and (text[i + 1].isalpha() or text[i + 1] == "_")
        ):
            end = i + 1
            while end < length and (text[end].isalnum() or text[end] == "_"):
                end += 1
            name = text[i + 1 : end]
            if name not in names:
                names.append(name)
            out.append(f"${names.index(name) + 1}")
            i = end
        elif c == "$":
            raise StoreError("write SQL with ? placeholders: $ is PostgreSQL's own form")
        else:
            out.append(c)
            i += 1
    return "".join(out), tuple(names)
