"""The scheduler applies due work through the lifecycle, driven by a fake clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import KeyState, Policy
from ckms.controller.scheduler import Scheduler
from ckms.controller.sealing import Vault
from ckms.store import Store
from ckms.store import audit as audit_log
from tests.support.stores import refuse_inserts

DAY = timedelta(days=1)


@pytest.mark.requirement("SP800-57-5.3", "PCI-3.7.4")
async def test_rotation_activation_and_deactivation_follow_the_clock(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock
) -> None:
    policy = Policy(cryptoperiod=30 * DAY, grace=5 * DAY, activation_delay=2 * DAY)
    await lifecycle.create("app/data", "aes-256", policy=policy, actor="alice")
    scheduler = Scheduler(store, vault, lifecycle, clock=clock)
    # The first version also waits out the activation delay in PreActive.
    assert (await lifecycle.get("app/data")).version(1).state is KeyState.PRE_ACTIVE

    quiet = await scheduler.tick()
    assert not quiet.changed and quiet.next_at is not None

    clock.advance(2 * DAY)
    assert (await scheduler.tick()).activated == [("app/data", 1)]

    clock.advance(28 * DAY)  # 2 days before the end of the cryptoperiod: pre-distribute v2
    report = await scheduler.tick()
    assert report.rotated == ["app/data"]
    key = await lifecycle.get("app/data")
    assert key.version(2).state is KeyState.PRE_ACTIVE and key.primary_version == 1

    clock.advance(2 * DAY)  # activation time: v2 becomes primary, v1 is superseded
    report = await scheduler.tick()
    assert report.activated == [("app/data", 2)]
    key = await lifecycle.get("app/data")
    assert key.primary_version == 2 and key.version(1).state is KeyState.ACTIVE

    clock.advance(5 * DAY)  # grace over: v1 leaves the hosts
    report = await scheduler.tick()
    assert report.deactivated == [("app/data", 1)]
    assert (await lifecycle.get("app/data")).version(1).state is KeyState.DEACTIVATED

    # Every change was audited by the scheduler and the log verifies with its checkpoints.
    records = await audit_log.load_records(store)
    assert {r.action for r in records if r.actor == "scheduler"} >= {
        "key.rotate",
        "key.activate",
        "key.deactivate",
    }
    verdict = await audit_log.verify_store(store, await vault.public_key())
    assert verdict.ok and verdict.checkpoints_verified >= 3


async def test_a_sealed_controller_does_nothing(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock
) -> None:
    await lifecycle.create(
        "app/data", "aes-256", policy=Policy(cryptoperiod=DAY, grace=DAY), actor="alice"
    )
    await vault.seal()
    clock.advance(3 * DAY)
    report = await Scheduler(store, vault, lifecycle, clock=clock).tick()
    assert not report.changed and not report.checkpointed
    assert (await lifecycle.get("app/data")).latest_version == 1


async def test_one_failing_item_does_not_stop_the_others(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock
) -> None:
    policy = Policy(cryptoperiod=DAY, grace=DAY)
    for name in ("a/one", "b/two"):
        await lifecycle.create(name, "aes-256", policy=policy, actor="alice")
    # Make every new version of a/one fail to store; b/two must still rotate.
    await refuse_inserts(
        store,
        "key_versions",
        "no space left for a/one",
        when="(SELECT name FROM keys WHERE id = NEW.key_id) = 'a/one'",
    )
    clock.advance(2 * DAY)
    report = await Scheduler(store, vault, lifecycle, clock=clock).tick()
    assert report.rotated == ["b/two"]
    assert report.errors and "a/one" in report.errors[0]
