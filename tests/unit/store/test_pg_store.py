"""The PostgreSQL store: what SQLite's single file gives for free, made to hold across
processes (two Store instances on one database stand for two controllers)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ckms.devpostgres import LocalPostgres
from ckms.errors import ConfigError, StoreError
from ckms.store import Store, outbox, utc_now
from ckms.store import audit as audit_log
from tests.support.audit import build_log, checkpoint
from tests.support.postgres import PostgresDatabase, connect, create_database, read_password
from tests.support.stores import StoreTarget
from tests.unit.store.test_outbox import policy_changed

pytestmark = pytest.mark.postgres

_TYPE = "key.policy_changed"


@pytest.fixture
def pg(postgres_database: PostgresDatabase) -> StoreTarget:
    return StoreTarget.postgresql(postgres_database)


@pytest.mark.requirement("SP800-130-AUDIT")
async def test_two_stores_appending_at_once_never_fork_the_chain(
    pg: StoreTarget, signing_pair: tuple[bytes, bytes]
) -> None:
    # Two controllers on one database, each appending with its own idea of the chain head.
    # Without the writer lock both read head N and write record N+1: a fork (or a failed
    # insert that aborts the operation it records).
    a, b = await pg.open(), await pg.open()
    try:

        async def appender(store: Store, who: str) -> None:
            for i in range(30):
                async with store.write() as tx:
                    await audit_log.append(
                        tx, now=utc_now(), actor=who, action="test.append", object=f"o:{i}"
                    )

        await asyncio.gather(appender(a, "a"), appender(b, "b"))
        await checkpoint(a, signing_pair)
        report = await audit_log.verify_store(b, signing_pair[1])
        assert report.ok, report.reason
        assert report.size == 60
        records = await audit_log.load_records(a)
        assert {r.actor for r in records} == {"a", "b"}
    finally:
        await a.close()
        await b.close()


async def test_another_stores_commit_moves_every_generation(pg: StoreTarget) -> None:
    a, b = await pg.open(), await pg.open()
    try:
        seen = await a.generation("keys")
        async with b.write() as tx:
            await tx.execute(
                "INSERT INTO keys(id, name, key_type, usage, policy, targets, install, "
                "created_at, created_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ("k1", "team/a", "aes-256", "encrypt", "{}", "{}", "{}", "t", "alice", "t"),
            )
        # b's own commit moved b's generation at once, naming the row.
        assert b.changed_since("keys", 0) == frozenset({"k1"})
        for _ in range(200):  # a notices within its poll interval
            if await a.generation("keys") != seen:
                break
            await asyncio.sleep(0.01)
        assert await a.generation("keys") != seen
        assert a.changed_since("keys", seen) is None  # which rows, another replica never says
        # An uninteresting write by b (no watched table) moves nothing on a.
        now_a = await a.generation("keys")
        async with b.write() as tx:
            await tx.set_meta("x", b"1")
        await asyncio.sleep(0.1)
        assert await a.generation("keys") == now_a
    finally:
        await a.close()
        await b.close()


async def test_own_commits_move_generations_with_the_changed_ids(pg: StoreTarget) -> None:
    async with await pg.open() as store:
        g = await store.generation("hosts")
        async with store.write() as tx:
            await tx.execute(
                "INSERT INTO hosts(id, name, identity_public_key, wrapping_public_key, "
                "enrolled_at) VALUES (?, ?, ?, ?, ?)",
                ("h1", "web-1", b"i" * 32, b"w" * 32, "t"),
            )
        assert await store.generation("hosts") == g + 1
        assert store.changed_since("hosts", g) == frozenset({"h1"})
        # last_seen_at is not watched: the generation stays.
        async with store.write() as tx:
            await tx.execute("UPDATE hosts SET last_seen_at = ? WHERE id = ?", ("t2", "h1"))
        assert await store.generation("hosts") == g + 1


async def test_outbox_sequence_is_shared_gapless_and_ordered(pg: StoreTarget) -> None:
    a, b = await pg.open(), await pg.open()
    try:
        async def add(store: Store, n: int) -> None:
            for _ in range(n):
                async with store.write() as tx:
                    await outbox.add_event(
                        tx, partition_key="t/a", data=policy_changed(), type=_TYPE, now=utc_now()
                    )

        with pytest.raises(RuntimeError):
            async with a.write() as tx:
                await outbox.add_event(
                    tx, partition_key="t/a", data=policy_changed(), type=_TYPE, now=utc_now()
                )
                raise RuntimeError("rolled back")
        await asyncio.gather(add(a, 10), add(b, 10))
        events = await outbox.all_events(a)
        assert [e.seq for e in events] == list(range(1, 21))  # no gap from the rollback
        async with b.write() as tx:
            assert await outbox.last_seq(tx) == 20
    finally:
        await a.close()
        await b.close()


async def test_errors_never_carry_bound_values(pg: StoreTarget) -> None:
    secret = "s3cr3t-material-value"
    async with await pg.open() as store:
        async with store.write() as tx:
            await tx.set_meta("dup", b"x")
        failures: list[str] = []
        for sql, params in [
            ("INSERT INTO meta(name, value) VALUES (?, ?)", ("dup", secret.encode())),
            ("SELECT * FROM keys WHERE primary_version = ?", (secret,)),  # wrong type
            ("SELECT CAST(? AS INTEGER)", (secret,)),
        ]:
            with pytest.raises(StoreError) as caught:
                async with store.write() as tx:
                    await tx.execute(sql, params)
            failures.append(str(caught.value))
        assert all(secret not in text for text in failures), failures
        assert "meta_pkey" in failures[0]  # what failed is still said
        assert not any("connection" in text for text in failures)  # nothing was lost


async def test_password_never_in_repr_errors_or_logs(
    postgres_server: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    database = await create_database(postgres_server)
    password = read_password(database.password_file)
    store = await Store.open(database.url, password=password)
    try:
        assert password not in repr(store) and password not in store.path
    finally:
        await store.close()
    with pytest.raises(StoreError) as caught:
        await Store.open(database.url, password=password + "-wrong")
    assert password not in str(caught.value)
    assert "InvalidPasswordError" in str(caught.value)
    assert password not in caplog.text


@pytest.mark.parametrize(
    "locale",
    [
        pytest.param("LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'", id="icu"),
        pytest.param("LC_COLLATE 'en_US.UTF-8' LC_CTYPE 'en_US.UTF-8'", id="libc"),
    ],
)
async def test_a_locale_ordered_database_is_refused(
    postgres_server: LocalPostgres, locale: str
) -> None:
    # A database ordering text by a locale, not bytewise: names would page and times compare
    # otherwise than SQLite and Python order them.
    conn = await connect(postgres_server.url, postgres_server.password_file)
    try:
        await conn.execute(
            f"CREATE DATABASE localeordered TEMPLATE template0 ENCODING 'UTF8' {locale}"
        )
    except Exception as exc:
        await conn.close()
        pytest.skip(f"this server cannot make such a database: {type(exc).__name__}")
    try:
        with pytest.raises(ConfigError, match="bytewise"):
            await Store.open(
                postgres_server.url_for("localeordered"),
                password=read_password(postgres_server.password_file),
            )
    finally:
        await conn.execute("DROP DATABASE localeordered WITH (FORCE)")
        await conn.close()


async def test_replicas_opening_together_migrate_once(pg: StoreTarget) -> None:
    stores = await asyncio.gather(*(pg.open() for _ in range(3)))
    try:
        versions = await pg.query("SELECT version FROM schema_version ORDER BY version")
        assert [v[0] for v in versions] == list(range(1, len(versions) + 1))
        assert [await s.schema_version() for s in stores] == [len(versions)] * 3
    finally:
        for s in stores:
            await s.close()


async def test_a_restarted_server_needs_no_store_restart(
    signing_pair: tuple[bytes, bytes],
) -> None:
    async with LocalPostgres() as server:  # its own: restarting the shared one hurts others
        store = await Store.open(server.url, password=read_password(server.password_file))
        try:
            await build_log(store, 3)
            await server.restart(kill=True)
            # The next write and the next reads work on new connections, nothing lost.
            await build_log(store, 2, start=3)
            assert len(await audit_log.load_records(store)) == 5
            assert await store.get_meta("nothing") is None
            await server.stop_server()
            with pytest.raises(StoreError, match="connection to PostgreSQL"):
                await build_log(store, 1, start=5)
            await server.start_server()
            await build_log(store, 1, start=5)
            report = await audit_log.verify_store(store, signing_pair[1])
            assert report.ok and report.size == 6
        finally:
            await store.close()


async def test_a_read_whose_session_the_server_ended_fails_cleanly_and_the_next_one_works(
    pg: StoreTarget,
) -> None:
    # asyncpg detaches a pooled connection from its proxy as soon as it learns the server ended
    # it; closing that proxy again raised InterfaceError in place of the store's own error.
    store = await pg.open()
    try:
        with pytest.raises(StoreError, match="connection to PostgreSQL was lost"):
            await store.fetchall("SELECT pg_terminate_backend(pg_backend_pid())")
        assert await store.fetchall("SELECT 1") == [(1,)]
    finally:
        await store.close()
