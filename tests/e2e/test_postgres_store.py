"""A controller moves from SQLite to PostgreSQL and runs there: ``ckms store copy`` through the
real CLI, ``ckms store migrate``, then the controller on the PostgreSQL store with a real agent
converging a rotation, and ``ckms audit verify`` passing on the copy."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from ckms.devpostgres import LocalPostgres
from ckms.protocol import InstallSpec, Targets
from ckms.store import audit as audit_log
from ckms.store import outbox
from tests.support.cli import Operators, run_cli
from tests.support.controller import running_controller
from tests.support.fleet import enroll_agent, running_agent, wait_until
from tests.support.postgres import PostgresDatabase

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

APP = {"env": "prod", "role": "app"}


async def _converged(c: Controller, key: str, host: str, version: int) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return any(s.host == host and s.converged and s.primary == version for s in status)


def _env() -> dict[str, str]:
    """The CLI's environment: no PGPASSWORD, no CKMS_ settings (the password is a file's)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CKMS_", "PG")) or k == "CKMS_CACHE_DIR"
    }


async def test_a_sqlite_store_copied_to_postgresql_serves_the_fleet(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    postgres_database: PostgresDatabase,
) -> None:
    topics = (unique_topic("events"), unique_topic("fleet"))
    home = tmp_path / "home"
    spec = InstallSpec(path="/keys/{purpose}", format="raw")
    async with running_controller(home, controller_kafka, *topics) as c:
        port = c.port
        agent = await enroll_agent(c, tmp_path, "app-1", APP)
        await c.lifecycle.create(
            "app/db", "aes-256", targets=Targets(selectors=(APP,)), install=spec, actor="alice"
        )
        async with running_agent(agent):
            await wait_until(lambda: _converged(c, "app/db", "app-1", 1), what="v1 installed")
        ops = Operators(c, tmp_path)
        await ops.add("alice", "admin")
    # The controller is stopped; its SQLite store moves to an empty PostgreSQL database.
    url, password_file = postgres_database.url, postgres_database.password_file
    copy = await run_cli(
        "store", "copy", "--from", f"sqlite:{home / 'controller.db'}", "--to", url,
        "--to-password-file", str(password_file), "--json",
        env=_env(),
    )  # fmt: skip
    assert copy.rc == 0, copy.stderr
    copied = copy.json()
    assert copied["audit_ok"] and copied["rows"]["keys"] == 1 and copied["rows"]["hosts"] == 1
    assert copied["last_event_seq"] >= 1
    # A second copy into the (now not empty) database is refused; nothing changes there.
    again = await run_cli(
        "store", "copy", "--from", f"sqlite:{home / 'controller.db'}", "--to", url,
        "--to-password-file", str(password_file),
        env=_env(),
    )  # fmt: skip
    assert again.rc != 0 and "not empty" in again.stderr
    migrate = await run_cli(
        "store", "migrate", "--store", url, "--password-file", str(password_file), "--json",
        env=_env(),
    )  # fmt: skip
    assert migrate.rc == 0, migrate.stderr
    assert migrate.json()["applied"] == [] and migrate.json()["engine"] == "postgresql"
    # The same home (host key, Kafka identity) runs on the PostgreSQL store.
    settings = {"store": url, "store_password_file": password_file}
    async with running_controller(
        home, controller_kafka, *topics, listen_port=port, **settings
    ) as c:
        assert c.store is not None and c.store.dialect.name == "postgresql"
        assert [k.name for k in await c.lifecycle.list_keys()] == ["app/db"]
        async with running_agent(agent):
            rotated = await c.lifecycle.rotate("app/db", actor="alice")
            assert rotated.version == 2
            await wait_until(lambda: _converged(c, "app/db", "app-1", 2), what="v2 on PostgreSQL")
        again_ops = Operators(c, tmp_path / "again")
        again_ops.people = ops.people  # copied with the store, keys and all
        verified = await again_ops.ckms("audit", "verify", "--json", who="alice")
        assert verified.rc == 0, verified.stderr
        report = verified.json()
        assert report["ok"] and report["size"] > copied["audit_size"]
    assert password_file.read_text() not in copy.stdout + copy.stderr + migrate.stdout


async def test_a_running_controller_survives_a_postgresql_crash(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    # Its own server: crashing the session's would break every other test's database.
    async with LocalPostgres() as server:
        settings = {"store": server.url, "store_password_file": server.password_file}
        topics = (unique_topic("events"), unique_topic("fleet"))
        async with running_controller(
            tmp_path / "home", controller_kafka, *topics, **settings
        ) as c:
            await c.lifecycle.create("app/db", "aes-256", actor="alice")
            await server.restart(kill=True)  # every server process killed at once
            # The next operations reconnect: nothing to restart on the controller's side.
            rotated = await c.lifecycle.rotate("app/db", actor="alice")
            assert rotated.version == 2
            assert [v.version for v in (await c.lifecycle.get("app/db")).versions] == [1, 2]
            await wait_until(lambda: _no_backlog(c), what="the rotation's event published")
            assert c.store is not None
            records = await audit_log.load_records(c.store)
            assert [r.action for r in records].count("key.rotate") == 1
            public = await c.vault.public_key()
            assert (await audit_log.verify_store(c.store, public)).ok


async def _no_backlog(c: Controller) -> bool:
    assert c.store is not None
    return not await outbox.pending_events(c.store)
