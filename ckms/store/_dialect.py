"""The few places SQL differs between the store's two engines, in one place.

The application writes one SQL text for both engines: ``?`` placeholders, ``ON CONFLICT``
upserts, ``IS NOT DISTINCT FROM``, fixed-width RFC 3339 text for times. What still differs is
here: placeholders (PostgreSQL numbers them, ``$1``), reading one field of a JSON text column,
and the outbox's never-reused sequence. No regular expressions over SQL: the placeholder
translation is a tokenizer that skips string literals, quoted names and comments.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ckms.errors import StoreError

Engine = Literal["sqlite", "postgresql"]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one engine spells the constructs the application SQL cannot share."""

    name: Engine

    def sql(self, text: str) -> str:
        """``text`` with its ``?`` placeholders in this engine's form."""
        return text if self.name == "sqlite" else numbered_placeholders(text)

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


@lru_cache(maxsize=4096)
def numbered_placeholders(text: str) -> str:
    """Turn each ``?`` outside literals, quoted names and comments into ``$1``, ``$2``, ...

    Cached: the application's statements are a fixed set of texts (those built with a
    variable number of ``?`` in an ``IN`` list are a few shapes each).
    """
    out: list[str] = []
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
        elif c == "?":
            n += 1
            out.append(f"${n}")
            i += 1
        elif c == "$":
            raise StoreError("write SQL with ? placeholders: $ is PostgreSQL's own form")
        else:
            out.append(c)
            i += 1
    return "".join(out)
