"""Sealing: init, unseal with shares or a passphrase, seal, and refusing material while sealed."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import RevocationReason
from ckms.controller.sealing import (
    META_DATA_KEK,
    InitResult,
    Vault,
    init_controller,
)
from ckms.crypto import KeyType
from ckms.errors import (
    AlreadyExistsError,
    ConfigError,
    IntegrityError,
    SealedError,
    UnsealError,
)
from ckms.store import Store
from ckms.store import audit as audit_log

if TYPE_CHECKING:
    from conftest import FakeClock

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
async def shares_3_of_5(store: Store, clock: FakeClock) -> InitResult:
    return await init_controller(store, shares=(3, 5), clock=clock)


@pytest.mark.requirement("PCI-3.6.1")
async def test_init_returns_shares_once_and_stores_no_root_kek(
    store: Store, shares_3_of_5: InitResult
) -> None:
    assert len(shares_3_of_5.mnemonics) == 5
    assert "mnemonics" not in repr(shares_3_of_5)
    rows = await store.fetchall("SELECT name, value FROM meta")
    stored = b"".join(bytes(r["value"]) for r in rows)
    for mnemonic in shares_3_of_5.mnemonics:
        assert mnemonic.encode() not in stored
    vault = Vault(store)
    assert vault.sealed
    status = await vault.status()
    assert (status.initialized, status.sealed, status.mode, status.threshold, status.count) == (
        True,
        True,
        "shares",
        3,
        5,
    )
    assert status.signer_key_id == shares_3_of_5.signer_key_id


async def test_init_twice_is_refused(store: Store, shares_3_of_5: InitResult) -> None:
    with pytest.raises(AlreadyExistsError):
        await init_controller(store, passphrase=PASSPHRASE)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"shares": (2, 3), "passphrase": PASSPHRASE}, {"shares": (1, 3)}, {"passphrase": "short"}],
)
async def test_init_argument_errors(store: Store, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        await init_controller(store, **kwargs)


@pytest.mark.requirement("PCI-3.7.6")
async def test_fewer_than_threshold_shares_fail(store: Store, shares_3_of_5: InitResult) -> None:
    vault = Vault(store)
    with pytest.raises(UnsealError, match="1 more share needed"):
        await vault.unseal_with_shares(shares_3_of_5.mnemonics[:2])
    assert vault.sealed
    with pytest.raises(UnsealError):
        await vault.unseal_with_shares(shares_3_of_5.mnemonics[:1])
    assert vault.sealed


@pytest.mark.parametrize("pick", [(0, 1, 2), (2, 4, 1), (0, 1, 2, 3, 4)])
async def test_threshold_shares_unseal(
    store: Store, shares_3_of_5: InitResult, pick: tuple[int, ...]
) -> None:
    vault = Vault(store)
    await vault.unseal_with_shares([shares_3_of_5.mnemonics[i] for i in pick])
    assert not vault.sealed


@pytest.mark.requirement("PCI-3.7.6")
async def test_a_repeated_share_does_not_count_twice(
    store: Store, shares_3_of_5: InitResult
) -> None:
    vault = Vault(store)
    s = shares_3_of_5.mnemonics
    with pytest.raises(UnsealError, match="twice"):
        await vault.unseal_with_shares([s[0], s[1], s[1]])
    retyped = "  " + s[1].upper().replace(" ", "   ") + "\n"
    with pytest.raises(UnsealError, match="twice"):
        await vault.unseal_with_shares([s[0], s[1], retyped])
    assert vault.sealed


async def test_shares_of_another_controller_fail(store: Store, shares_3_of_5: InitResult) -> None:
    other_store = await Store.open(":memory:")
    try:
        other = await init_controller(other_store, shares=(3, 5))
    finally:
        await other_store.close()
    vault = Vault(store)
    with pytest.raises(UnsealError, match="does not match this controller"):
        await vault.unseal_with_shares(other.mnemonics[:3])
    with pytest.raises(UnsealError):
        await vault.unseal_with_shares([*shares_3_of_5.mnemonics[:2], other.mnemonics[0]])
    assert vault.sealed
    failed = [r for r in await audit_log.load_records(store) if r.outcome == "failed"]
    assert len(failed) == 2
    assert all(r.action == "controller.unseal" for r in failed)
    for r in failed:
        for mnemonic in other.mnemonics + shares_3_of_5.mnemonics:
            assert mnemonic.split()[0] + " " + mnemonic.split()[1] not in r.model_dump_json()


async def test_shares_one_at_a_time(
    store: Store, shares_3_of_5: InitResult, clock: FakeClock
) -> None:
    vault = Vault(store, clock=clock)
    s = shares_3_of_5.mnemonics
    progress = await vault.submit_share(s[0], custodian="ann")
    assert (progress.sealed, progress.given, progress.threshold) == (True, 1, 3)
    with pytest.raises(UnsealError, match="already gave"):
        await vault.submit_share(s[1], custodian="ann")
    with pytest.raises(UnsealError, match="already given"):
        await vault.submit_share(s[0], custodian="bob")
    assert (await vault.submit_share(s[1], custodian="bob")).given == 2
    progress = await vault.submit_share(s[2], custodian="cat")
    assert not progress.sealed
    assert not vault.sealed
    record = next(
        r for r in reversed(await audit_log.load_records(store)) if r.action == "controller.unseal"
    )
    assert (record.action, record.actor, record.outcome) == (
        "controller.unseal",
        "ann,bob,cat",
        "ok",
    )
    assert len(record.details["share_ids"]) == 3
    assert all(i.startswith("hmac:") for i in record.details["share_ids"])


async def test_pending_shares_expire(
    store: Store, shares_3_of_5: InitResult, clock: FakeClock
) -> None:
    vault = Vault(store, clock=clock, pending_ttl=timedelta(minutes=10))
    s = shares_3_of_5.mnemonics
    await vault.submit_share(s[0], custodian="ann")
    await vault.submit_share(s[1], custodian="bob")
    clock.advance(minutes=11)
    progress = await vault.submit_share(s[2], custodian="cat")
    assert (progress.sealed, progress.given) == (True, 1)


async def test_passphrase_unseal(store: Store, clock: FakeClock) -> None:
    result = await init_controller(store, passphrase=PASSPHRASE, clock=clock)
    assert result.mnemonics == []
    vault = Vault(store, clock=clock)
    with pytest.raises(UnsealError):
        await vault.unseal_with_passphrase("wrong horse battery staple")
    assert vault.sealed
    with pytest.raises(UnsealError, match="passphrase"):
        await vault.unseal_with_shares(["abandon"] * 20)
    await vault.unseal_with_passphrase(PASSPHRASE)
    assert not vault.sealed


async def test_tampered_sealed_secret_keeps_controller_sealed(
    store: Store, init_result: InitResult
) -> None:
    blob = bytearray(await store.get_meta(META_DATA_KEK) or b"")
    blob[-1] ^= 1
    async with store.write() as tx:
        await tx.set_meta(META_DATA_KEK, bytes(blob))
    vault = Vault(store)
    with pytest.raises(IntegrityError, match="data_kek"):
        await vault.unseal_with_shares(init_result.mnemonics[:2])
    assert vault.sealed


@pytest.mark.requirement("PCI-3.7.3")
async def test_sealed_controller_refuses_material_operations(
    store: Store, vault: Vault, lifecycle: Lifecycle
) -> None:
    await lifecycle.create("team/key", KeyType.AES_256, actor="alice")
    await vault.seal(actor="alice")
    assert vault.sealed
    calls = [
        lambda: lifecycle.create("team/other", KeyType.AES_256, actor="alice"),
        lambda: lifecycle.rotate("team/key", actor="alice"),
        lambda: lifecycle.suspend("team/key", 1, actor="alice"),
        lambda: lifecycle.revoke("team/key", RevocationReason.KEY_COMPROMISE, actor="alice"),
        lambda: vault.material("team/key", 1),
        lambda: vault.checkpoint_audit(),
    ]
    for call in calls:
        with pytest.raises(SealedError, match="controller is sealed: "):
            await call()
    with pytest.raises(SealedError):
        vault.sign(b"event")
    with pytest.raises(SealedError):
        vault.identifier("x")
    # Reads need no secrets.
    assert (await lifecycle.get("team/key")).primary_version == 1
    assert await vault.public_key()
    refused = [r for r in await audit_log.load_records(store) if r.outcome == "refused"]
    assert len(refused) == 4
    assert {r.details["error"] for r in refused} == {"SealedError"}


async def test_seal_then_unseal_again(
    store: Store, vault: Vault, lifecycle: Lifecycle, init_result: InitResult
) -> None:
    await lifecycle.create("team/key", KeyType.AES_256, actor="alice")
    material = await vault.material("team/key", 1)
    await vault.seal()
    await vault.seal()  # already sealed: no-op, no second record
    await vault.unseal_with_shares(init_result.mnemonics[1:])
    assert await vault.material("team/key", 1) == material
    actions = [r.action for r in await audit_log.load_records(store)]
    assert actions.count("controller.seal") == 1
    assert actions.count("controller.unseal") == 2


async def test_checkpoint_signed_by_controller_key_verifies(store: Store, vault: Vault) -> None:
    cp = await vault.checkpoint_audit()
    assert cp.size == len(await audit_log.load_records(store))
    report = await audit_log.verify_store(store, await vault.public_key())
    assert report.ok and report.checkpoints_verified == 1
