"""The leader lease fences leader-only writes: an old leader that wakes up changes nothing.

Two controllers (replicas) on one SQLite file, opened but not run, so the test decides when
each one's lease rounds happen (its clock moves, no sleeping). Replica A leads, is "paused"
past its lease, B takes over; A then does what a leader does with the lease it still
believes it holds (mark outbox rows published, rotate a key that is due, sign a checkpoint):
every one is refused inside its own transaction and leaves the store as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from ckms.controller.models import Policy
from ckms.controller.service import Controller
from ckms.errors import AuditAnchorError, NotLeaderError, StoreError
from ckms.store import audit as audit_log
from ckms.store import lease as leases
from ckms.store import outbox
from tests.support.replicas import open_replica, take_lease, target_settings
from tests.support.stores import StoreTarget
from tests.support.waiting import wait_until
from tests.unit.controller.conftest import FakeClock

DAY = timedelta(days=1)
TTL = 10.0


@pytest.fixture
async def replicas(
    tmp_path: Path, clock: FakeClock, store_target: StoreTarget
) -> AsyncIterator[tuple[Controller, ...]]:
    """Two replicas on one store: a SQLite file, or a PostgreSQL database."""
    where = target_settings(store_target)
    a = await open_replica(tmp_path / "a", clock=clock, name="ctl-a", lease_s=TTL, **where)
    b = await open_replica(tmp_path / "b", clock=clock, name="ctl-b", lease_s=TTL, **where)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


@pytest.mark.requirement("ISO27002-8.14")
async def test_a_paused_leader_cannot_publish_rotate_or_sign_after_a_takeover(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    a, b = replicas
    assert a.store is not None and b.store is not None
    await a.lifecycle.create(
        "app/data",
        "aes-256",
        policy=Policy(cryptoperiod=30 * DAY, grace=DAY, activation_delay=timedelta(0)),
        actor="alice",
    )
    fence_a = await take_lease(a)
    assert fence_a.epoch == 1
    # B is a follower while A's lease runs.
    state = await b.leader._round()
    assert state is not None and not state.mine and state.holder_name == "ctl-a"

    # A freezes; its lease expires; B takes over with a higher epoch (the fencing token).
    clock.advance(seconds=TTL + 1)
    fence_b = await take_lease(b)
    assert fence_b.epoch == 2

    # A wakes up, still believing it leads, with a rotation due and an event to mark sent.
    clock.advance(31 * DAY)
    unsent = [e.seq for e in await outbox.pending_events(a.store)]
    assert unsent
    checkpoints = await a.store.fetchval("SELECT count(*) FROM audit_checkpoints")
    audit_size = await a.store.fetchval("SELECT count(*) FROM audit")
    a.vault.anchor.loaded = True  # as after its own term's read-back
    with leases.fenced(fence_a):
        with pytest.raises(NotLeaderError, match="epoch 1"):
            await outbox.mark_sent(a.store, unsent, now=clock())
        report = await a.scheduler.tick()
    assert report.rotated == [] and any("leader lease" in e for e in report.errors)
    assert fence_a.lost.is_set()  # the lease task wakes and steps down at once
    with pytest.raises(NotLeaderError):
        await a.vault.anchor.checkpoint()

    assert [e.seq for e in await outbox.pending_events(a.store)] == unsent  # none marked
    assert (await a.lifecycle.get("app/data")).latest_version == 1  # not rotated
    assert await a.store.fetchval("SELECT count(*) FROM audit_checkpoints") == checkpoints
    assert await a.store.fetchval("SELECT count(*) FROM audit") == audit_size  # nothing audited

    # The leader of epoch 2 does the same work.
    b.vault.anchor.loaded = True
    with leases.fenced(fence_b):
        assert await outbox.mark_sent(b.store, unsent, now=clock()) == len(unsent)
        assert (await b.scheduler.tick()).rotated == ["app/data"]
    assert (await b.vault.anchor.checkpoint()).size > audit_size
    verdict = await audit_log.verify_store(b.store, await b.vault.public_key())
    assert verdict.ok


async def test_the_lease_is_renewed_by_its_holder_and_taken_only_after_expiry(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    a, b = replicas
    assert a.store is not None
    first = await a.leader._round()
    assert first is not None and first.mine and first.epoch == 1
    for _ in range(3):
        clock.advance(seconds=TTL / 2)  # renewed before it ends: the epoch stays
        renewed = await a.leader._round()
        assert renewed is not None and renewed.mine and renewed.epoch == 1
        other = await b.leader._round()
        assert other is not None and not other.mine
    clock.advance(seconds=TTL)
    taken = await b.leader._round()
    assert taken is not None and taken.mine and taken.epoch == 2
    back = await a.leader._round()
    assert back is not None and not back.mine and back.holder_name == "ctl-b"
    names = {r.name: r for r in await leases.read_replicas(a.store)}
    assert set(names) == {"ctl-a", "ctl-b"} and not names["ctl-a"].sealed


async def test_a_sealed_replica_never_takes_the_lease(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    a, b = replicas
    assert a.store is not None
    await a.vault.seal()
    assert await a.leader._round() is None  # nobody held it; a sealed replica does not take it
    state = await b.leader._round()
    assert state is not None and state.mine
    clock.advance(seconds=TTL + 1)
    after = await a.leader._round()
    assert after is not None and not after.mine  # expired, still not taken while sealed
    rows = {r.name: r for r in await leases.read_replicas(a.store)}
    assert rows["ctl-a"].sealed and not rows["ctl-b"].sealed


async def test_a_lease_row_edited_to_last_for_ever_is_taken_over(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    """Whoever can write the database file must not stop leadership for good (no outbox
    published, so no revocation delivered; no rotation; no checkpoint), with ``ckms status``
    naming a leader, by one edit of the lease row: an expiry beyond what any holder writes
    (now + ttl) is taken over as an expired one."""
    a, b = replicas
    assert a.store is not None
    assert (await take_lease(a)).epoch == 1
    async with a.store.write() as tx:
        await tx.execute(
            "UPDATE leader_lease SET holder = 'forged', expires_at = '2999-01-01T00:00:00Z'"
        )
    clock.advance(seconds=TTL + 1)
    state = await b.leader._round()
    assert state is not None and state.mine and state.epoch == 2, state
    clock.advance(seconds=TTL / 2)  # then renewed by its holder, not taken by the other
    renewed = await b.leader._round()
    assert renewed is not None and renewed.mine and renewed.epoch == 2
    other = await a.leader._round()
    assert other is not None and not other.mine


async def test_a_lease_row_edited_to_the_last_epoch_is_refused_without_crashing_the_round(
    replicas: tuple[Controller, Controller], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An epoch no takeover can add one to: the round fails with an error naming the row (the
    replica keeps serving), not an overflow that ends the lease task and the controller."""
    a, b = replicas
    assert a.store is not None
    await take_lease(a)
    async with a.store.write() as tx:
        await tx.execute("UPDATE leader_lease SET epoch = 9223372036854775807")
    clock.advance(seconds=TTL + 1)
    assert await b.leader._round() is None
    assert "no replica wrote" in caplog.text


async def test_a_leader_that_is_sealed_gives_the_lease_up_at_once(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    a, b = replicas
    assert (await take_lease(a)).epoch == 1
    await a.vault.seal()
    given_up = await a.leader._round()
    assert given_up is not None and not given_up.mine
    taken = await b.leader._round()  # no expiry to wait for
    assert taken is not None and taken.mine and taken.epoch == 2


@pytest.mark.parametrize(
    "failure",
    [
        # A write the fence refused: another replica took the lease.
        NotLeaderError("refused by the fence"),
        # A PostgreSQL restart failed a leader task's query (the scheduler's, say): a passing
        # trouble of the store, not the service's failure (a replica that crashed on it would
        # take its agents' and operators' connections with it).
        StoreError("cannot connect to the PostgreSQL store: the connection was lost"),
    ],
    ids=["fenced", "store-down"],
)
async def test_leader_work_that_only_ends_its_term_steps_down_and_the_service_goes_on(
    replicas: tuple[Controller, Controller], clock: FakeClock, failure: Exception
) -> None:
    a, _ = replicas
    terms: list[int] = []

    async def failing() -> None:
        raise failure

    async def lead() -> None:
        terms.append(a.leader.terms)
        async with asyncio.TaskGroup() as group:  # as Controller._lead runs its tasks
            group.create_task(failing())

    task = asyncio.create_task(a.leader.run(lead))
    try:
        # It steps down (the work ended), then leads again at its next round, since the lease
        # is still its own; the lease task itself never fails.
        await wait_until(lambda: len(terms) >= 2, 20, "a second term")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_leader_work_failing_otherwise_is_still_the_services_failure(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    a, _ = replicas

    async def broken() -> None:
        raise AuditAnchorError("the audit log does not extend its anchor")

    task = asyncio.create_task(a.leader.run(broken))
    with pytest.raises(AuditAnchorError):
        await asyncio.wait_for(task, 20)


async def test_leader_work_that_finds_the_lease_gone_while_being_stopped_is_part_of_the_stop(
    replicas: tuple[Controller, Controller], clock: FakeClock
) -> None:
    # The fence is cleared before the work is cancelled: a task that looks at it meanwhile
    # (the anchor's producer start) fails with NotLeaderError inside the work's TaskGroup.
    # That is the step-down's own doing, not the service's failure.
    a, _ = replicas
    started = asyncio.Event()

    async def looks_at_the_fence_when_stopped() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)
            assert a.leader.fence is None
            raise NotLeaderError("this replica does not hold the leader lease") from None

    async def lead() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(looks_at_the_fence_when_stopped())

    task = asyncio.create_task(a.leader.run(lead))
    await asyncio.wait_for(started.wait(), 20)
    task.cancel()  # the controller stopping: the lease task steps down and releases
    with pytest.raises(asyncio.CancelledError):
        await task
