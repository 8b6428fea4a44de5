"""The in-memory key view of the agent requests follows every committed key change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ckms.controller import lifecycle as lifecycle_module
from ckms.controller import rowmac
from ckms.controller.lifecycle import Lifecycle, NewKey
from ckms.controller.sealing import Vault, init_controller
from ckms.errors import IntegrityError
from ckms.protocol import KeyState, RevocationReason
from ckms.store import Store
from ckms.store import _store as store_module

NAME = "payments/db"


async def test_current_keys_follow_create_rotate_and_revoke(lifecycle: Lifecycle) -> None:
    assert dict(await lifecycle.current_keys()) == {}
    await lifecycle.create(NAME, "aes-256", actor="alice")
    first = await lifecycle.current_keys()
    assert [v.version for v in first[NAME].versions] == [1]
    assert await lifecycle.current_keys() is first  # no change, no reload
    await lifecycle.rotate(NAME, actor="alice")
    assert [v.version for v in (await lifecycle.current_keys())[NAME].versions] == [1, 2]
    await lifecycle.revoke(NAME, RevocationReason.KEY_COMPROMISE, actor="alice", version=2)
    keys = await lifecycle.current_keys()
    assert keys[NAME].version(2).state is KeyState.COMPROMISED
    assert keys[NAME] == await lifecycle.get(NAME)


async def test_current_keys_see_a_raw_sql_change(lifecycle: Lifecycle, store: Store) -> None:
    key = await lifecycle.create(NAME, "aes-256", actor="alice")
    await lifecycle.current_keys()
    async with store.write() as tx:  # a change made with the row key (rows stay bound)
        await tx.execute("UPDATE key_versions SET state = 'Suspended' WHERE version = 1")
        await rowmac.stamp_version(tx, key.id, 1)
    assert (await lifecycle.current_keys())[NAME].version(1).state is KeyState.SUSPENDED
    async with store.write() as tx:  # and one made without it
        await tx.execute("UPDATE key_versions SET state = 'Active' WHERE version = 1")
    with pytest.raises(IntegrityError, match="version 1 failed integrity check"):
        await lifecycle.current_keys()


async def test_current_keys_see_a_commit_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FOREIGN_CHECK_S", 0.0)  # look on every call
    # e.g. an operator's tool (or a second controller process) revoking on the same file: the
    # agent-facing key view must not keep serving the version as distributable.
    path = tmp_path / "ckms.db"
    async with await Store.open(path) as store:
        init = await init_controller(store, shares=(2, 3))
        vault = Vault(store)
        await vault.unseal_with_shares(init.mnemonics[:2])
        lifecycle = Lifecycle(store, vault)
        await lifecycle.create(NAME, "aes-256", actor="alice")
        assert (await lifecycle.current_keys())[NAME].version(1).state is KeyState.ACTIVE
        async with await Store.open(path) as other:
            other.row_key = store.row_key  # another controller process, unsealed too
            async with other.write() as tx:
                await tx.execute(
                    "UPDATE key_versions SET state = 'Compromised' WHERE version = 1"
                )
                key_id = await tx.fetchval("SELECT id FROM keys WHERE name = ?", (NAME,))
                await rowmac.stamp_version(tx, key_id, 1)
        assert (await lifecycle.current_keys())[NAME].version(1).state is KeyState.COMPROMISED


async def test_a_key_change_reloads_that_key_only(lifecycle: Lifecycle, store: Store) -> None:
    """Other keys keep their very objects: a change costs the key it touched, not a reload."""
    for i in range(5):
        await lifecycle.create(f"team/k{i}", "aes-256", actor="alice")
    before = await lifecycle.current_keys()
    await lifecycle.rotate("team/k2", actor="alice")
    after = await lifecycle.current_keys()
    assert [v.version for v in after["team/k2"].versions] == [1, 2]
    assert all(after[f"team/k{i}"] is before[f"team/k{i}"] for i in (0, 1, 3, 4))
    assert dict(before)["team/k2"].latest_version == 1  # a view handed out earlier is unchanged
    async with store.write() as tx:  # raw SQL on a key's row (with the row key: still bound)
        await tx.execute("UPDATE key_versions SET state = 'Suspended' WHERE version = 2")
        await rowmac.stamp_version(tx, after["team/k2"].id, 2)
    assert (await lifecycle.current_keys())["team/k2"].version(2).state is KeyState.SUSPENDED
    assert (await lifecycle.current_keys())["team/k0"] is before["team/k0"]
    async with store.write() as tx:
        key_id = after["team/k4"].id
        await tx.execute("DELETE FROM version_transitions WHERE key_id = ?", (key_id,))
        await tx.execute("DELETE FROM key_versions WHERE key_id = ?", (key_id,))
        await tx.execute("DELETE FROM keys WHERE id = ?", (key_id,))
    assert "team/k4" not in await lifecycle.current_keys()
    assert dict(await lifecycle.current_keys()) == {k.name: k for k in await lifecycle.list_keys()}


async def test_pages_follow_the_view_in_name_order(lifecycle: Lifecycle, store: Store) -> None:
    for name in ("b/k", "d/k", "a/k"):
        await lifecycle.create(name, "aes-256", actor="alice")

    async def everything(limit: int) -> list[str]:
        names: list[str] = []
        after = None
        while page := await lifecycle.page(after, limit):
            names += [k.name for k in page]
            after = page[-1].name
        return names

    assert await everything(2) == ["a/k", "b/k", "d/k"]
    await lifecycle.create("c/k", "aes-256", actor="alice")  # lands between two pages
    await lifecycle.rotate("a/k", actor="alice")
    assert await everything(2) == ["a/k", "b/k", "c/k", "d/k"]
    assert (await lifecycle.page(None, 1))[0].latest_version == 2
    key_id = (await lifecycle.get("b/k")).id
    async with store.write() as tx:
        await tx.execute("DELETE FROM version_transitions WHERE key_id = ?", (key_id,))
        await tx.execute("DELETE FROM key_versions WHERE key_id = ?", (key_id,))
        await tx.execute("DELETE FROM keys WHERE id = ?", (key_id,))
    assert await everything(3) == ["a/k", "c/k", "d/k"]
    assert [k.name for k in await lifecycle.page("a/k", 5)] == ["c/k", "d/k"]
    assert await lifecycle.page("zzz/k", 5) == []


async def test_a_view_read_in_slices_is_every_key_as_stored(
    lifecycle: Lifecycle, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view is read a few keys per snapshot, and each entry is what the store holds (the
    pydantic model it stands for), with the parsed policy, targets and times shared."""
    monkeypatch.setattr(lifecycle_module, "_LOAD_SLICE", 3)
    names = await lifecycle.create_many(
        [NewKey(name=f"team/k{i:02}", type="aes-256") for i in range(10)], actor="alice"
    )
    await lifecycle.rotate("team/k07", actor="alice")
    view = await Lifecycle(store, lifecycle._vault).current_keys()  # a fresh view: full load
    assert list(view) == names
    stored = {k.name: k for k in await lifecycle.list_keys()}
    assert all(view[n].to_model() == stored[n] for n in names)
    assert view["team/k07"].latest_version == 2 and view["team/k07"].primary_version == 2
    assert len({id(k.policy) for k in view.values()}) == 1
    assert len({id(k.created_at) for k in view.values()}) == 1  # one batch, one time


async def test_a_tampered_row_in_a_later_slice_refuses_the_whole_view(
    lifecycle: Lifecycle, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "_LOAD_SLICE", 2)
    await lifecycle.create_many(
        [NewKey(name=f"team/k{i}", type="aes-256") for i in range(5)], actor="alice"
    )
    async with store.write() as tx:  # a DB file owner retargets the last key
        await tx.execute(
            "UPDATE keys SET targets = '{\"hosts\":[\"evil\"]}' WHERE name = 'team/k4'"
        )
    with pytest.raises(IntegrityError, match="team/k4 failed integrity check"):
        await Lifecycle(store, lifecycle._vault).current_keys()


async def test_a_tampered_row_before_the_last_slice_leaves_the_store_readable(
    lifecycle: Lifecycle, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused slice ends the fill there: the store serves the next reader (no read left
    holding it), and the next fill refuses the same row again."""
    monkeypatch.setattr(lifecycle_module, "_LOAD_SLICE", 2)
    await lifecycle.create_many(
        [NewKey(name=f"team/k{i}", type="aes-256") for i in range(7)], actor="alice"
    )
    async with store.write() as tx:
        await tx.execute(
            "UPDATE keys SET targets = '{\"hosts\":[\"evil\"]}' WHERE name = 'team/k1'"
        )
    fresh = Lifecycle(store, lifecycle._vault)
    with pytest.raises(IntegrityError, match="team/k1 failed integrity check"):
        await fresh.current_keys()
    rows = await asyncio.wait_for(store.fetchall("SELECT count(*) AS n FROM keys"), 10)
    assert rows[0]["n"] == 7
    with pytest.raises(IntegrityError, match="team/k1 failed integrity check"):
        await asyncio.wait_for(fresh.current_keys(), 10)  # refused again, not stuck
