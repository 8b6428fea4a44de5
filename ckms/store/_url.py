"""Which engine a store location names: a file path or ``sqlite:PATH`` (SQLite), or
``postgresql://user@host:port/db`` (PostgreSQL).

A PostgreSQL URL must not hold a password (``user:secret@``, ``?password=``, nor the client
key's ``?sslpassword=``): a URL is printed, logged and put on command lines, so the password
comes from a 0600 file named in the settings (``store_password_file``) or the ``PGPASSWORD``
environment instead. The refusal
never echoes the URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from ckms.errors import ConfigError
from ckms.store._dialect import Engine

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PG_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed store location: the engine and what it opens (a path, or a password-free URL)."""

    engine: Engine
    target: str

    def __str__(self) -> str:
        return self.target if self.engine == "postgresql" else f"sqlite:{self.target}"


def parse_store_url(location: str | Path) -> StoreURL:
    """Parse a store location; ConfigError (never naming the URL) for one not to be used."""
    if isinstance(location, Path):
        return StoreURL("sqlite", str(location))
    text = location.strip()
    if text.startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if path.startswith("//"):  # sqlite:///abs/path, as other tools write it
            path = path[2:]
        if not path:
            raise ConfigError("the store URL sqlite: names no file (sqlite:PATH)")
        return StoreURL("sqlite", path)
    scheme, sep, _ = text.partition("://")
    if sep and scheme.lower() in _PG_SCHEMES:
        return StoreURL("postgresql", _password_free(text))
    if text.lower().startswith(tuple(s + ":" for s in _PG_SCHEMES)) or _SCHEME.match(text):
        raise ConfigError(
            "the store URL is not one ckms knows: give a file path, sqlite:PATH or "
            "postgresql://user@host:port/database"
        )
    return StoreURL("sqlite", text)


def _password_free(url: str) -> str:
    """``url`` if it holds no password; the error never includes it."""
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
        parts.port  # noqa: B018  (a bad port raises here, not at connect)
    except ValueError:
        raise ConfigError("the PostgreSQL store URL is malformed") from None
    # Any *password parameter: libpq and asyncpg take the client key's (sslpassword) there too.
    if password is not None or any("password" in name.lower() for name, _ in query):
        raise ConfigError(
            "the PostgreSQL store URL holds a password: remove it and give it in the file "
            "named by store_password_file (mode 0600) or the PGPASSWORD environment"
        )
    if not parts.hostname and not any(name.lower() == "host" for name, _ in query):
        raise ConfigError("the PostgreSQL store URL names no host (postgresql://user@host/db)")
    if not parts.path.strip("/"):
        raise ConfigError("the PostgreSQL store URL names no database (postgresql://.../db)")
    return url
