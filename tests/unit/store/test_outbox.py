"""The transactional outbox."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ckms.errors import ProtocolError
from ckms.protocol import KeyPolicyChanged
from ckms.store import Store, outbox

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def policy_changed(key: str = "t/a", **policy: object) -> dict[str, object]:
    """A valid key.policy_changed payload (outbox rows are checked against the protocol)."""
    full = {
        "cryptoperiod": 86400,
        "grace": 3600,
        "activation_delay": 0,
        "max_staleness": 60,
        "approvals_required": [],
        **policy,
    }
    return {"key": key, "key_id": "k-1", "policy": full}


async def test_events_get_monotonic_sequence_and_canonical_payload(mem_store: Store) -> None:
    async with mem_store.write() as tx:
        a = await outbox.add_event(
            tx,
            type="key.policy_changed",
            partition_key="t/a",
            data=policy_changed(grace=1, max_staleness=7),
            now=T0,
        )
        b = await outbox.add_event(
            tx, type="key.policy_changed", partition_key="t/a", data=policy_changed(), now=T0
        )
    assert b.seq == a.seq + 1
    assert a.payload == (
        b'{"key":"t/a","key_id":"k-1","policy":{"activation_delay":0,"approvals_required":[],'
        b'"cryptoperiod":86400,"grace":1,"max_staleness":7}}'
    )
    pending = await outbox.pending_events(mem_store)
    assert [e.event_id for e in pending] == [a.event_id, b.event_id]
    assert pending[0].data["policy"]["grace"] == 1
    assert pending[0].partition_key == "t/a"


async def test_rolled_back_event_leaves_no_row_and_no_gap(mem_store: Store) -> None:
    async with mem_store.write() as tx:
        first = await outbox.add_event(
            tx, type="key.policy_changed", partition_key="t/a", data=policy_changed(), now=T0
        )
    with pytest.raises(RuntimeError):
        async with mem_store.write() as tx:
            await outbox.add_event(
                tx, type="key.policy_changed", partition_key="t/a", data=policy_changed(), now=T0
            )
            raise RuntimeError("abort")
    async with mem_store.write() as tx:
        third = await outbox.add_event(
            tx, type="key.policy_changed", partition_key="t/a", data=policy_changed(), now=T0
        )
    assert third.seq == first.seq + 1
    assert len(await outbox.all_events(mem_store)) == 2


async def test_mark_sent_removes_from_pending(mem_store: Store) -> None:
    async with mem_store.write() as tx:
        a = await outbox.add_event(
            tx, type="key.policy_changed", partition_key="t/a", data=policy_changed(), now=T0
        )
        b = await outbox.add_event(
            tx, type="key.policy_changed", partition_key="t/a", data=policy_changed(), now=T0
        )
    assert await outbox.mark_sent(mem_store, [a.seq], now=T0) == 1
    assert await outbox.mark_sent(mem_store, [a.seq], now=T0) == 0
    assert [e.seq for e in await outbox.pending_events(mem_store)] == [b.seq]
    sent = (await outbox.all_events(mem_store))[0]
    assert sent.sent_at == T0


async def test_payload_must_match_its_protocol_model(mem_store: Store) -> None:
    for event_type, data in [
        ("key.policy_changed", {"key": "t/a", "key_id": "k-1", "policy": {}, "material": "x"}),
        # The policy of an event is a typed model, not any object.
        ("key.policy_changed", {"key": "t/a", "key_id": "k-1", "policy": {"a": "x", "b": 1}}),
        ("key.nonsense", policy_changed()),
        ("key.revoked", policy_changed()),
    ]:
        with pytest.raises(ProtocolError):
            async with mem_store.write() as tx:
                await outbox.add_event(tx, type=event_type, partition_key="t/a", data=data, now=T0)
    assert await outbox.all_events(mem_store) == []


async def test_typed_event_names_its_own_type(mem_store: Store) -> None:
    typed = KeyPolicyChanged.model_validate(policy_changed())
    async with mem_store.write() as tx:
        stored = await outbox.add_event(tx, partition_key="t/a", data=typed, now=T0)
    assert stored.type == "key.policy_changed"
    assert stored.payload == outbox.canonical_json(typed.model_dump(mode="json", by_alias=True))
    with pytest.raises(ProtocolError, match="is not the type of"):
        async with mem_store.write() as tx:
            await outbox.add_event(tx, type="key.revoked", partition_key="t/a", data=typed, now=T0)
    assert len(await outbox.all_events(mem_store)) == 1
