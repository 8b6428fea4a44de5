"""The agent state DB: keys, positions and pending acks survive a reopen; no material in it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ckms.consumer import Position
from ckms.crypto import generate_signing_key, signing_public_key
from ckms.errors import StoreError
from ckms.protocol import (
    Ack,
    AckStatus,
    EventType,
    InstallSpec,
    encode_event,
    trust_keys,
    verify_message,
)
from ckms_agent.state import SCHEMA_VERSION, AgentState, KeyRecord, VersionRecord

AT = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def record(name: str = "payments/db") -> KeyRecord:
    return KeyRecord(
        name=name,
        key_type="aes-256",
        spec=InstallSpec(path="/etc/ckms/{name}.json", format="keyring-json", mode=0o640),
        versions={
            1: VersionRecord(1, "Active", False, D1),
            2: VersionRecord(2, "Active", True, D2),
        },
        files={Path("/root/etc/ckms/payments/db.json"): "ab" * 32},
        max_staleness_s=3600,
        updated_at=1234.5,
    )


async def test_keys_round_trip_and_replace(tmp_path: Path) -> None:
    async with AgentState(tmp_path / "state.db") as state:
        await state.put_key(record())
        await state.put_key(record("app/sig"))
        assert await state.key("payments/db") == record()
        changed = KeyRecord(
            name="payments/db",
            key_type="aes-256",
            spec=record().spec,
            versions={2: VersionRecord(2, "Active", True, D2)},
            files={},
        )
        await state.put_key(changed)
        assert (await state.key("payments/db")) == changed
        await state.forget_key("app/sig")
        assert set(await state.keys()) == {"payments/db"}
    async with AgentState(tmp_path / "state.db") as state:
        held = await state.key("payments/db")
        assert held is not None and held.primary == VersionRecord(2, "Active", True, D2)


async def test_pending_acks_survive_reopen_in_order_and_verify(tmp_path: Path) -> None:
    identity = generate_signing_key()
    path = tmp_path / "state.db"

    def build(version: int):
        ack = Ack(
            agent="web-1",
            key="payments/db",
            version=version,
            status=AckStatus.INSTALLED,
            digest=D1,
            elapsed_ms=3,
        )
        return lambda seq: encode_event(EventType.ACK, ack, seq=seq, signing_key=identity, at=AT)

    async with AgentState(path) as state:
        seqs = [
            await state.enqueue_ack(
                build(v), key="payments/db", version=v, status="installed", now=1.0
            )
            for v in (1, 2, 3)
        ]
        assert seqs == [1, 2, 3]
        await state.delete_acks([1])
    async with AgentState(path) as state:  # a restart, Kafka still down
        pending = await state.pending_acks()
        assert [a.seq for a in pending] == [2, 3]
        assert await state.pending_ack_count() == 2
        envelope = verify_message(
            pending[0].message.value,
            list(pending[0].message.headers),
            trust_keys([signing_public_key(identity)]),
        )
        assert envelope.seq == 2 and envelope.data.version == 2
        assert pending[0].message.key == b"web-1"
        # The counter never goes back, even after every ack was published and deleted.
        await state.delete_acks([2, 3])
        nxt = await state.enqueue_ack(
            build(4), key="payments/db", version=4, status="installed", now=2.0
        )
        assert nxt == 4 and await state.ack_seq() == 4


async def test_a_failing_ack_build_leaves_no_row_and_no_gap(tmp_path: Path) -> None:
    async with AgentState(tmp_path / "state.db") as state:

        def boom(seq: int):
            raise StoreError("signing failed")

        with pytest.raises(StoreError):
            await state.enqueue_ack(boom, key="a/b", version=1, status="failed", now=0)
        assert await state.pending_ack_count() == 0 and await state.ack_seq() == 0


async def test_offsets_are_the_subscriber_offset_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with AgentState(path) as state:
        store = state.offset_store()
        assert await store.load("ckms.events") == {}
        await store.save("ckms.events", {0: Position(10, 4), 1: Position(3, None)})
        await store.save("ckms.events", {0: Position(12, 6)})
        await store.save("other", {0: Position(1, 1)})
    async with AgentState(path) as state:
        assert await state.offset_store().load("ckms.events") == {
            0: Position(12, 6),
            1: Position(3, None),
        }
        await state.reset_positions()
        assert await state.load_positions("ckms.events") == {}


async def test_contact_and_revocation_flags(tmp_path: Path) -> None:
    async with AgentState(tmp_path / "state.db") as state:
        assert await state.last_contact() is None and not await state.revoked()
        await state.set_last_contact(1700000000.25)
        await state.set_revoked(True)
    async with AgentState(tmp_path / "state.db") as state:
        assert await state.last_contact() == 1700000000.25
        assert await state.revoked()


async def test_file_is_private_wal_and_at_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    async with AgentState(path) as state:
        await state.put_key(record())
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        columns = {
            row[1]
            for table in ("keys", "key_versions", "key_files", "pending_acks")
            for row in db.execute(f"PRAGMA table_info({table})")
        }
        assert not {"material", "wrapped", "secret"} & columns
    finally:
        db.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with AgentState(path):
        pass
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this agent"):
        async with AgentState(path):
            pass


async def test_in_memory_state_for_tests() -> None:
    async with AgentState(":memory:") as state:
        await state.put_key(record())
        assert list(await state.keys()) == ["payments/db"]


async def test_a_write_cancelled_in_flight_is_all_or_nothing_and_leaves_the_state_usable(
    tmp_path: Path,
) -> None:
    # A stop can cancel a task while its write is on the DB's thread: the write still ends in
    # COMMIT or ROLLBACK there, so no transaction is left open and every later write works.
    async with AgentState(tmp_path / "state.db") as state:
        for _ in range(20):
            task = asyncio.create_task(state.put_key(record()))
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            held = await state.keys()
            assert held == {} or held["payments/db"] == record()
            await state.forget_key("payments/db")
        await state.set_last_contact(1700000000.5)
        assert await state.last_contact() == 1700000000.5
    async with AgentState(tmp_path / "state.db") as state:
        assert await state.last_contact() == 1700000000.5
        assert await state.keys() == {}


async def test_keys_in_memory_match_what_a_reopen_reads(tmp_path: Path) -> None:
    shuffled = replace(
        record(),
        versions=dict(reversed(record().versions.items())),
        files={Path("/root/b"): "b" * 64, Path("/root/a"): "a" * 64},
    )
    async with AgentState(tmp_path / "state.db") as state:
        assert await state.keys() == {}
        await state.put_key(shuffled)
        await state.put_key(record("other/key"))
        await state.forget_key("other/key")
        held = await state.keys()
    async with AgentState(tmp_path / "state.db") as state:
        reread = await state.keys()
    assert held == reread == {"payments/db": shuffled}
    assert list(held["payments/db"].versions) == list(reread["payments/db"].versions) == [1, 2]
    assert list(held["payments/db"].files) == list(reread["payments/db"].files)
