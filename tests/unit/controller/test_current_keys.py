"""The in-memory key view of the agent requests follows every committed key change."""

from __future__ import annotations

from ckms.controller.lifecycle import Lifecycle
from ckms.protocol import KeyState, RevocationReason
from ckms.store import Store

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
    await lifecycle.create(NAME, "aes-256", actor="alice")
    await lifecycle.current_keys()
    async with store.write() as tx:
        await tx.execute("UPDATE key_versions SET state = 'Suspended' WHERE version = 1")
    assert (await lifecycle.current_keys())[NAME].version(1).state is KeyState.SUSPENDED
