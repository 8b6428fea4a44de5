"""The benchmarks' store: SQLite (a file per run, one controller) or PostgreSQL (a database per run
on one ``ckms.devpostgres.LocalPostgres`` server, shared by the replicas).

The orchestrator reads the store directly (the fleet view's counts, the leader lease, the
outbox's ``sent_at``) so that polling costs the measured controllers nothing; on PostgreSQL its
one connection's server process is left out of the server's CPU (:meth:`BenchStore.cpu_s`).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from _proc import tree_cpu_seconds

from ckms.devpostgres import LocalPostgres

STORES = ("sqlite", "postgresql")


class BenchStore:
    """One store for one measured configuration; ``await open()``, ``await close()``."""

    def __init__(self, kind: str, work: Path, server: LocalPostgres | None = None) -> None:
        if kind not in STORES:
            raise ValueError(f"store {kind!r}: one of {', '.join(STORES)}")
        if kind == "postgresql" and server is None:
            raise ValueError("a PostgreSQL store needs the run's LocalPostgres server")
        self.kind = kind
        self.work = work
        self.server = server
        self.url = ""
        self._conn: Any = None  # asyncpg.Connection (asyncpg is only needed for PostgreSQL)
        self._backend_pid = 0

    async def open(self) -> None:
        """Create the store's database (PostgreSQL) and connect the orchestrator's reader."""
        if self.server is None:
            self.url = str(self.work / "store" / "controller.db")
            Path(self.url).parent.mkdir(parents=True, exist_ok=True)
            return
        import asyncpg

        name = f"bench_{uuid.uuid4().hex[:12]}"
        password = self.server.password_file.read_text(encoding="utf-8")
        admin = await asyncpg.connect(self.server.url, password=password)
        try:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        finally:
            await admin.close()
        self.url = self.server.url_for(name)
        self._conn = await asyncpg.connect(self.url, password=password)
        self._backend_pid = int(await self._conn.fetchval("SELECT pg_backend_pid()"))

    def settings(self) -> dict[str, str]:
        """``ControllerSettings`` fields naming this store (the password in a file, not inline)."""
        out = {"store": self.url}
        if self.server is not None:
            out["store_password_file"] = str(self.server.password_file)
        return out

    def server_pid(self) -> int:
        """The PostgreSQL postmaster's pid (0 for SQLite: the store is in the controller)."""
        return (self.server.pid or 0) if self.server is not None else 0

    def cpu_s(self) -> float:
        """CPU seconds the PostgreSQL server has used so far, its every process but the
        orchestrator's connection (0 for SQLite, whose work is the controller's own)."""
        pid = self.server_pid()
        return tree_cpu_seconds(pid, frozenset({self._backend_pid})) if pid else 0.0

    async def fetchall(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        """Rows of a read-only query written with ``?`` placeholders."""
        if self._conn is None:
            return await asyncio.to_thread(_sqlite_rows, self.url, sql, params)
        numbers = iter(range(1, len(params) + 1))
        rows = await self._conn.fetch(re.sub(r"\?", lambda _: f"${next(numbers)}", sql), *params)
        return [dict(r) for r in rows]

    async def fetchval(self, sql: str, *params: Any) -> Any:
        rows = await self.fetchall(sql, *params)
        return next(iter(rows[0].values())) if rows else None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _sqlite_rows(path: str, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()
