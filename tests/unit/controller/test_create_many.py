"""Batched create (onboarding): each key exactly as a single create stores it, or none at all."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ckms.controller.lifecycle import Lifecycle, NewKey
from ckms.controller.models import Policy
from ckms.controller.sealing import Vault
from ckms.crypto import KeyType
from ckms.errors import AlreadyExistsError, ConfigError, PolicyError
from ckms.store import Store, outbox
from ckms.store import audit as audit_log

LONG = Policy(cryptoperiod=timedelta(days=36500), grace=timedelta(0))
SPECS = [NewKey(name=f"team/k{i:03}", type=KeyType.AES_256) for i in range(7)]


async def test_each_key_is_sealed_audited_and_evented(
    lifecycle: Lifecycle, store: Store, vault: Vault
) -> None:
    names = await lifecycle.create_many(
        [*SPECS, NewKey(name="team/s", type="secret", secret_length=24)], actor="alice", batch=3
    )
    assert names == [s.name for s in SPECS] + ["team/s"]
    keys = [await lifecycle.get(name) for name in names]
    events = {e.partition_key: e for e in await outbox.all_events(store)}
    records = [r for r in await audit_log.load_records(store) if r.action == "key.create"]
    assert len(records) == len(keys) and len(events) == len(keys)
    for key, record in zip(keys, records, strict=True):
        assert record.object == f"key:{key.name}" and record.outcome == "ok"
        assert events[key.name].type == "key.created"
        assert record.details["event_id"] == events[key.name].event_id
        assert record.details["digest_hmac"] == vault.identifier(key.version(1).digest)
    material = await vault.material("team/s", 1)  # sealed like any other key
    assert len(material) == 24
    assert len({k.version(1).digest for k in keys}) == len(keys)  # no shared material
    assert (await audit_log.verify_store(store, await vault.public_key())).ok


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (NewKey(name="Bad Name", type=KeyType.AES_256), ConfigError, "key 8"),
        (NewKey(name="team/x", type="aes-512"), ConfigError, "unsupported key type"),
        (
            NewKey(name="team/x", type=KeyType.AES_256, policy=LONG),
            PolicyError,
            "key 8",
        ),
        (NewKey(name="team/k001", type=KeyType.AES_256), ConfigError, "named twice"),
        (NewKey(name="team/s", type="secret", secret_length=8), ConfigError, "entropy"),
    ],
)
async def test_one_bad_spec_creates_nothing(
    lifecycle: Lifecycle, store: Store, bad: NewKey, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        await lifecycle.create_many([*SPECS, bad], actor="alice", batch=2)
    assert await lifecycle.list_keys() == []
    assert await outbox.all_events(store) == []
    refusal = (await audit_log.load_records(store))[-1]
    assert (refusal.action, refusal.outcome) == ("key.create", "refused")


async def test_an_existing_name_refuses_the_whole_batch(lifecycle: Lifecycle, store: Store) -> None:
    await lifecycle.create("team/k004", KeyType.AES_256, actor="alice")
    with pytest.raises(AlreadyExistsError, match="team/k004"):
        await lifecycle.create_many(SPECS, actor="alice")
    assert [k.name for k in await lifecycle.list_keys()] == ["team/k004"]
