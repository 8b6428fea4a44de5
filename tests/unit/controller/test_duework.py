"""Due work (rotate, activate, deactivate) with a fake clock moving time."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from ckms.controller._repo import NEVER_DUE
from ckms.controller.duework import DueWork, due_keys, due_work, fill_next_due, next_due
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import KeyState, Policy, RevocationReason
from ckms.crypto import KeyType
from ckms.store import Store, format_time

if TYPE_CHECKING:
    from conftest import FakeClock

DAY = timedelta(days=1)


def _items(work: DueWork) -> dict[str, list[tuple[str, int]]]:
    return {
        "rotate": [(i.key, i.version) for i in work.rotate],
        "activate": [(i.key, i.version) for i in work.activate],
        "deactivate": [(i.key, i.version) for i in work.deactivate],
    }


async def test_rotation_then_deactivation_after_grace(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    t0 = clock.now
    await lifecycle.create("app/data", KeyType.AES_256, actor="alice")  # 365 d, grace 90 d
    work = await due_work(store, clock.now)
    assert work.empty
    assert work.next_at == t0 + 365 * DAY

    clock.advance(364 * DAY)
    assert (await due_work(store, clock.now)).empty
    clock.advance(DAY)
    work = await due_work(store, clock.now)
    assert _items(work)["rotate"] == [("app/data", 1)]
    assert work.rotate[0].due_at == t0 + 365 * DAY

    await lifecycle.rotate("app/data", actor="scheduler")
    t_rotated = clock.now
    work = await due_work(store, clock.now)
    assert work.empty
    assert work.next_at == t_rotated + 90 * DAY  # v1's grace ends before v2's cryptoperiod

    clock.advance(90 * DAY)
    work = await due_work(store, clock.now)
    assert _items(work) == {"rotate": [], "activate": [], "deactivate": [("app/data", 1)]}
    await lifecycle.deactivate("app/data", 1, actor="scheduler")
    work = await due_work(store, clock.now)
    assert work.empty
    assert work.next_at == t_rotated + 365 * DAY


async def test_activation_delay_schedules_rotation_early(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    t0 = clock.now
    policy = Policy(cryptoperiod=30 * DAY, grace=5 * DAY, activation_delay=2 * DAY)
    await lifecycle.create("app/mac", KeyType.HMAC_SHA256, actor="alice", policy=policy)
    work = await due_work(store, clock.now)
    assert work.empty and work.next_at == t0 + 2 * DAY

    clock.advance(2 * DAY)
    assert _items(await due_work(store, clock.now))["activate"] == [("app/mac", 1)]
    await lifecycle.activate("app/mac", 1, actor="scheduler")
    t_active = clock.now

    # Rotation is due 2 days before the cryptoperiod ends, so v2 activates exactly at its end.
    clock.advance(27 * DAY)
    assert (await due_work(store, clock.now)).empty
    clock.advance(DAY)
    work = await due_work(store, clock.now)
    assert _items(work)["rotate"] == [("app/mac", 1)]
    assert work.rotate[0].due_at == t_active + 28 * DAY

    v2 = await lifecycle.rotate("app/mac", actor="scheduler")
    assert v2.state is KeyState.PRE_ACTIVE
    work = await due_work(store, clock.now)
    assert work.empty  # no second rotation while v2 waits
    assert work.next_at == t_active + 30 * DAY

    clock.advance(2 * DAY)
    assert _items(await due_work(store, clock.now))["activate"] == [("app/mac", 2)]
    await lifecycle.activate("app/mac", 2, actor="scheduler")
    assert (await lifecycle.get("app/mac")).primary_version == 2
    clock.advance(5 * DAY)
    assert _items(await due_work(store, clock.now))["deactivate"] == [("app/mac", 1)]


async def test_suspended_superseded_version_is_deactivated_after_grace(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    await lifecycle.create("app/sig", KeyType.ED25519, actor="alice")  # grace 7 d
    await lifecycle.rotate("app/sig", actor="alice")
    await lifecycle.suspend("app/sig", 1, actor="alice")
    clock.advance(7 * DAY)
    assert _items(await due_work(store, clock.now))["deactivate"] == [("app/sig", 1)]


async def test_revoked_and_suspended_primaries_are_not_rotated(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    await lifecycle.create("app/gone", KeyType.AES_256, actor="alice")
    await lifecycle.revoke("app/gone", RevocationReason.CESSATION_OF_OPERATION, actor="alice")
    await lifecycle.create("app/paused", KeyType.AES_256, actor="alice")
    await lifecycle.suspend("app/paused", 1, actor="alice")
    clock.advance(3 * 365 * DAY)
    work = await due_work(store, clock.now)
    assert work.empty
    assert work.next_at is None


async def test_items_are_ordered_by_due_time(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    short = Policy(cryptoperiod=10 * DAY, grace=DAY)
    await lifecycle.create("b/late", KeyType.AES_256, actor="alice", policy=short)
    clock.advance(DAY)
    await lifecycle.create("a/later", KeyType.AES_256, actor="alice", policy=short)
    clock.advance(-DAY)
    await lifecycle.create("c/early", KeyType.AES_256, actor="alice", policy=short)
    clock.advance(20 * DAY)
    names = [i.key for i in (await due_work(store, clock.now)).rotate]
    assert names == ["b/late", "c/early", "a/later"]


async def test_a_simulated_scheduler_keeps_one_fresh_primary(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    """Drive two years day by day, applying whatever is due, and check the invariants."""
    policy = Policy(cryptoperiod=90 * DAY, grace=10 * DAY, activation_delay=3 * DAY)
    await lifecycle.create("sim/key", KeyType.AES_256, actor="alice", policy=policy)
    for _ in range(730):
        clock.advance(DAY)
        work = await due_work(store, clock.now)
        for item in work.activate:
            await lifecycle.activate(item.key, item.version, actor="scheduler")
        for item in work.rotate:
            await lifecycle.rotate(item.key, actor="scheduler")
        for item in work.deactivate:
            await lifecycle.deactivate(item.key, item.version, actor="scheduler")
        key = await lifecycle.get("sim/key")
        primary = key.primary
        if clock.now - key.created_at > 3 * DAY:
            assert primary is not None and primary.state is KeyState.ACTIVE
            assert primary.activated_at is not None
            assert clock.now - primary.activated_at <= policy.cryptoperiod
        active = [v for v in key.versions if v.state is KeyState.ACTIVE]
        assert len(active) <= 2
    assert 8 <= key.latest_version <= 10


async def _stored_next_due(store: Store) -> dict[str, str | None]:
    rows = await store.fetchall("SELECT name, next_due_at FROM keys")
    return {r["name"]: r["next_due_at"] for r in rows}


async def test_every_change_keeps_the_next_due_index_true(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    """The indexed next-due time is what the key's versions say after every kind of change."""
    policy = Policy(cryptoperiod=30 * DAY, grace=5 * DAY, activation_delay=2 * DAY)

    async def check() -> None:
        stored = await _stored_next_due(store)
        for key in await lifecycle.list_keys():
            due = next_due(key)
            assert stored[key.name] == (NEVER_DUE if due is None else format_time(due)), key.name

    await lifecycle.create("i/a", KeyType.HMAC_SHA256, actor="alice", policy=policy)
    await lifecycle.create("i/b", KeyType.AES_256, actor="alice")
    await check()
    clock.advance(2 * DAY)
    await lifecycle.activate("i/a", 1, actor="alice")
    await check()
    await lifecycle.rotate("i/a", actor="alice")
    await lifecycle.rotate("i/b", actor="alice")
    await check()
    await lifecycle.suspend("i/b", 1, actor="alice")
    await check()
    await lifecycle.set_policy("i/b", Policy(cryptoperiod=10 * DAY, grace=DAY), actor="alice")
    await check()
    await lifecycle.revoke("i/b", RevocationReason.CESSATION_OF_OPERATION, actor="alice")
    await check()
    assert (await _stored_next_due(store))["i/b"] == NEVER_DUE


async def test_a_pass_reads_only_the_keys_due(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    await lifecycle.create(
        "soon/key", KeyType.AES_256, actor="alice", policy=Policy(cryptoperiod=10 * DAY, grace=DAY)
    )
    await lifecycle.create("late/key", KeyType.AES_256, actor="alice")  # 365 d
    clock.advance(11 * DAY)
    keys, later = await due_keys(store, clock.now)
    assert [k.name for k in keys] == ["soon/key"]
    assert later is not None and later > clock.now


async def test_keys_from_before_the_index_are_still_scheduled_and_filled_in(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    """A key stored before the column existed (NULL) is never skipped; the scheduler fills it."""
    await lifecycle.create("old/key", KeyType.AES_256, actor="alice")
    async with store.write() as tx:
        await tx.execute("UPDATE keys SET next_due_at = NULL")
    clock.advance(366 * DAY)
    assert _items(await due_work(store, clock.now))["rotate"] == [("old/key", 1)]
    assert await fill_next_due(store, batch=1) == 1
    assert (await _stored_next_due(store))["old/key"] is not None
    assert _items(await due_work(store, clock.now))["rotate"] == [("old/key", 1)]
    assert await fill_next_due(store) == 0
