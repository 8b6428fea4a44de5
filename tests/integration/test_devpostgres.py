"""The local PostgreSQL launcher runs a real server: password-only, durable, never as root."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ckms._localproc import pid_alive
from ckms.devpostgres import LocalPostgres
from tests.support.postgres import PostgresDatabase, connect, read_password

pytestmark = pytest.mark.postgres


async def test_connects_with_the_password_file(postgres_server: LocalPostgres) -> None:
    conn = await connect(postgres_server.url, postgres_server.password_file)
    try:
        who = await conn.fetchrow("SELECT current_user AS role, current_database() AS db")
        assert (who["role"], who["db"]) == ("ckms", "ckms")
        # TCP on loopback, with the password proven by SCRAM.
        assert await conn.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
    finally:
        await conn.close()
    local = await connect(
        "postgresql://ckms@/ckms",
        postgres_server.password_file,
        host=str(postgres_server.socket_dir),
        port=postgres_server.port,
    )
    try:
        assert await local.fetchval("SELECT inet_server_addr()") is None  # the unix socket
    finally:
        await local.close()


def _command_line(pid: int | None) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_the_secret_stays_in_its_file(postgres_server: LocalPostgres) -> None:
    password = read_password(postgres_server.password_file)
    info = postgres_server.password_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert len(password) >= 32
    assert password not in postgres_server.url
    assert password not in repr(postgres_server)
    assert password.encode() not in postgres_server.log_path.read_bytes()
    assert password.encode() not in _command_line(postgres_server.pid)
    assert not (postgres_server.data_path.parent / "initdb.pw").exists()


@pytest.mark.parametrize("over", ["tcp", "socket"])
async def test_a_wrong_or_missing_password_is_refused(
    postgres_server: LocalPostgres, over: str
) -> None:
    where: dict[str, object] = (
        {"dsn": postgres_server.url}
        if over == "tcp"
        else {"host": str(postgres_server.socket_dir), "port": postgres_server.port}
    )
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(user="ckms", database="ckms", password="not-it", **where)
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ClientCannotConnectError)):
        # No trust or peer rule lets a password-less client in, over either way.
        await asyncpg.connect(user="ckms", database="ckms", password="", **where)


async def test_the_server_never_runs_as_root(postgres_server: LocalPostgres) -> None:
    assert postgres_server.pid is not None
    uid = os.stat(f"/proc/{postgres_server.pid}").st_uid
    assert uid == postgres_server.server_uid
    if os.geteuid() == 0:
        assert uid != 0  # CI runs as root: the server dropped to its own user
    else:
        assert uid == os.geteuid()


async def test_each_test_gets_an_empty_database(postgres_database: PostgresDatabase) -> None:
    conn = await connect(postgres_database.url, postgres_database.password_file)
    try:
        assert await conn.fetchval("SELECT current_database()") == postgres_database.name
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
    finally:
        await conn.close()


async def test_a_crash_keeps_what_was_committed() -> None:
    async with LocalPostgres() as pg:
        conn = await connect(pg.url, pg.password_file)
        await conn.execute("CREATE TABLE t (v text)")
        await conn.execute("INSERT INTO t VALUES ('committed')")
        open_tx = await connect(pg.url, pg.password_file)
        tx = open_tx.transaction()
        await tx.start()
        await open_tx.execute("INSERT INTO t VALUES ('in flight')")
        old_pid = pg.pid
        assert old_pid is not None
        backends = [r["pid"] for r in await conn.fetch("SELECT pid FROM pg_stat_activity")]
        assert len(backends) >= 4  # two client backends, the checkpointer, the WAL writer, ...

        await pg.stop_server(kill=True)

        assert pg.pid is None
        alive = [pid for pid in [old_pid, *backends] if pid_alive(pid)]
        assert alive == []  # no process of the old server outlived the crash
        await pg.start_server()
        assert pg.pid not in (None, old_pid)
        assert "automatic recovery in progress" in pg.log_path.read_text()
        again = await connect(pg.url, pg.password_file)
        try:
            rows = await again.fetch("SELECT v FROM t")
            assert [r["v"] for r in rows] == ["committed"]
        finally:
            await again.close()
        for stale in (conn, open_tx):
            stale.terminate()


async def test_a_clean_restart_keeps_data_and_port() -> None:
    async with LocalPostgres() as pg:
        conn = await connect(pg.url, pg.password_file)
        await conn.execute("CREATE TABLE t AS SELECT 7 AS v")
        await conn.close()
        url = pg.url
        await pg.restart()
        assert pg.url == url
        conn = await connect(pg.url, pg.password_file)
        try:
            assert await conn.fetchval("SELECT v FROM t") == 7
        finally:
            await conn.close()


_OWNER = """
import asyncio, sys
from pathlib import Path
from ckms.devpostgres import LocalPostgres

async def main():
    pg = LocalPostgres(data_dir=Path(sys.argv[1]))
    await pg.start()
    print(pg.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_the_server_dies_with_its_owner() -> None:
    # Not pytest's tmp_path: its 0700 parents are closed to the server's user under root.
    directory = Path(tempfile.mkdtemp(prefix="ckms-pg-test-"))
    try:
        await _kill_owner_and_wait(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _kill_owner_and_wait(directory: Path) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OWNER, str(directory), stdout=subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        pid = int(await asyncio.wait_for(owner.stdout.readline(), 90))
        os.kill(pid, 0)
    finally:
        owner.kill()
        await owner.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return  # its backends follow the postmaster on their own
        await asyncio.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the server outlived the process that started it")


async def test_up_and_down_from_a_shell(tmp_path: Path) -> None:
    env = {**os.environ, "CKMS_CACHE_DIR": str(tmp_path)}

    async def run(*args: str) -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ckms.devpostgres", *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err
        return out.decode().strip(), err.decode()

    url, err = await run("up")
    state = _read_json(tmp_path / "devpostgres.json")
    password_file = Path(state["directory"]) / "password"
    try:
        assert url == state["url"] and str(password_file) in err
        assert read_password(password_file) not in url + err
        conn = await connect(url, password_file)
        assert await conn.fetchval("SELECT current_database()") == "ckms"
        await conn.close()
        assert (await run("up"))[0] == url  # already up: the same server
    finally:
        await run("down")
    assert not pid_alive(state["pid"])
    assert not _exists(state["directory"])


def _exists(path: str) -> bool:
    return Path(path).exists()


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))
