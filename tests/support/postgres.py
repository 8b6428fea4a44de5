"""Connecting to the test PostgreSQL and giving each test a database of its own.

Clients read the password from the server's 0600 password file, as the store backend will
(never from a URL or an argument list).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from ckms.devpostgres import LocalPostgres

__all__ = [
    "DatabasePool",
    "PostgresDatabase",
    "connect",
    "create_database",
    "drop_database",
    "read_password",
]


@dataclass(frozen=True)
class PostgresDatabase:
    """One database on the test server: its URL (without the password) and the password file."""

    name: str
    url: str
    password_file: Path


def read_password(password_file: Path) -> str:
    """The password in a password file (the whole file: no newline is written)."""
    return password_file.read_text(encoding="utf-8")


async def connect(url: str, password_file: Path, **kwargs: object) -> asyncpg.Connection:
    """An asyncpg connection to ``url`` with the password read from ``password_file``."""
    password = read_password(password_file)
    return await asyncpg.connect(url, password=password, **kwargs)  # type: ignore[arg-type]


async def create_database(server: LocalPostgres) -> PostgresDatabase:
    """Create an empty database (from template0) with a unique name on ``server``."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    conn = await connect(server.url, server.password_file)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        await conn.close()
    return PostgresDatabase(name, server.url_for(name), server.password_file)


async def drop_database(server: LocalPostgres, database: PostgresDatabase) -> None:
    """Drop a test's database, disconnecting whatever the test left connected to it."""
    conn = await connect(server.url, server.password_file)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {database.name} WITH (FORCE)")
    finally:
        await conn.close()


class DatabasePool:
    """Empty databases for tests, emptied and handed out again rather than made each time.

    ``CREATE DATABASE`` copies a template and ``DROP DATABASE`` removes its files: about half
    a second each on a busy machine, for each of hundreds of store tests. Emptying one (its
    sessions ended, its one schema dropped and made again) is a few catalog changes. A
    database that cannot be emptied is dropped, and the next test gets a new one.
    """

    def __init__(self, server: LocalPostgres) -> None:
        self._server = server
        self._free: list[PostgresDatabase] = []

    async def take(self) -> PostgresDatabase:
        """An empty database of the caller's own until :meth:`give_back`."""
        if self._free:
            return self._free.pop()
        return await create_database(self._server)

    async def give_back(self, database: PostgresDatabase) -> None:
        """Empty ``database`` for the next test (or drop it if that fails)."""
        try:
            admin = await connect(self._server.url, self._server.password_file)
            try:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database.name,
                )
            finally:
                await admin.close()
            conn = await connect(database.url, database.password_file, timeout=10)
            try:
                schemas = await conn.fetch(
                    "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' "
                    "AND nspname <> 'information_schema'"
                )
                for (name,) in schemas:
                    await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
                await conn.execute("CREATE SCHEMA public")
            finally:
                await conn.close()
        except (asyncpg.PostgresError, OSError, TimeoutError):
            await drop_database(self._server, database)
            return
        self._free.append(database)
