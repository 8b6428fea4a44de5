"""Rollouts on the real store: stages, gates, the deterministic sample, and the rollout row MAC.

The fleet's acknowledgements are written as the ack service writes them (``fleet_state``
rows); the driver judges them on an injected clock. The attacks are plain sqlite3 edits of the
database file while the controller is stopped, then a restart, as in the other row-MAC tests.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from ckms.controller.acks import put_fleet_row
from ckms.controller.desired import desired_versions
from ckms.controller.models import Host, Key, KeyState, KeyVersion, Policy, Rollout, Targets
from ckms.controller.rollout_plan import (
    AckRow,
    RolloutRequest,
    failure_budget,
    judge_stage,
    sample_order,
    seed_of,
    stage_release,
    stage_size,
)
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.controller.transitions import RolloutOp, next_rollout_state
from ckms.crypto import (
    KeyType,
)
from ckms.errors import ConfigError, IntegrityError, InvalidTransitionError, NotFoundError
from ckms.protocol import (
    ActivateWhen,
    Gate,
    InstallSpec,
    RolloutState,
    format_time,
    parse_gate,
    parse_stages,
)
from ckms.store import audit as audit_log
from tests.support.cli import enroll_host
from tests.unit.controller.conftest import T0, FakeClock

PASSPHRASE = "a passphrase long enough for tests"
NAME = "web/session"
HOSTS = [f"web-{i}" for i in range(1, 11)]


# -- the wire rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0%,150%", "0% is not a share of hosts"),
        ("5%,150%", "150% is not a share of hosts"),
        ("25%,5%,100%", "strictly increasing"),
        ("5%,5%,100%", "strictly increasing"),
        ("5%,25%", "the last stage must be 100%"),
        ("5%,,100%", "give percents like"),
        ("five%,100%", "each stage is a whole percent"),
        ("2.5%,100%", "each stage is a whole percent"),
        ("", "give percents like"),
    ],
)
def test_bad_stages_are_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_stages(text)


def test_stages_parse_as_cumulative_percents() -> None:
    assert parse_stages("5%,25%,100%") == (5, 25, 100)
    assert parse_stages(" 10 , 100% ") == (10, 100)
    assert parse_stages("100%") == (100,)


def test_an_unknown_gate_names_the_gates_there_are() -> None:
    assert parse_gate("healthy") is Gate.HEALTHY
    with pytest.raises(ConfigError, match="unknown gate 'green'; use one of installed, healthy"):
        parse_gate("green")


def test_the_rollout_table_refuses_what_it_does_not_list() -> None:
    assert next_rollout_state(RolloutState.HALTED, RolloutOp.ABORT) is RolloutState.ROLLED_BACK
    assert next_rollout_state(RolloutState.ROLLED_BACK, RolloutOp.RESUME) is RolloutState.RUNNING
    for state, op in [
        (RolloutState.HALTED, RolloutOp.ADVANCE),  # a halted rollout never moves on by itself
        (RolloutState.HALTED, RolloutOp.COMPLETE),
        (RolloutState.ROLLED_BACK, RolloutOp.COMPLETE),
        (RolloutState.COMPLETED, RolloutOp.RESUME),
        (RolloutState.RUNNING, RolloutOp.RESUME),
    ]:
        with pytest.raises(InvalidTransitionError, match=f"cannot {op} the rollout"):
            next_rollout_state(state, op)


# -- the sample ---------------------------------------------------------------------------


def _hosts(zones: int = 2) -> list[Host]:
    return [Host(id=h, name=h, labels={"zone": f"z{i % zones}"}) for i, h in enumerate(HOSTS)]


def test_the_sample_depends_only_on_key_version_and_hosts() -> None:
    hosts = _hosts()
    order = sample_order("k-1:2", hosts, "zone")
    assert sorted(order) == sorted(HOSTS)
    assert sample_order("k-1:2", list(reversed(hosts)), "zone") == order  # not on list order
    assert sample_order("k-1:3", hosts, "zone") != order  # another version, another sample
    # Spread: consecutive picks alternate zones, so a two-host stage covers both.
    zones = [next(h.labels["zone"] for h in hosts if h.id == i) for i in order]
    assert all(a != b for a, b in itertools.pairwise(zones))


def test_stage_sizes_round_up_and_reach_at_least_one_host() -> None:
    assert [stage_size(p, 10) for p in (5, 25, 100)] == [1, 3, 10]
    assert stage_size(1, 1000) == 10
    assert stage_size(50, 0) == 0


# -- on the store -------------------------------------------------------------------------


async def _open(home: Path, clock: FakeClock) -> Controller:
    c = Controller(ControllerSettings(home=home, listen_port=0), clock=clock)
    await c.open()
    assert c.store is not None
    if not (await c.vault.status()).initialized:
        await init_controller(c.store, passphrase=PASSPHRASE)
    await c.vault.unseal_with_passphrase(PASSPHRASE)
    return c


@pytest.fixture
async def ctl(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Controller]:
    c = await _open(tmp_path / "ctl", clock)
    for i, host in enumerate(HOSTS):
        await enroll_host(c, host, {"env": "prod", "zone": f"z{i % 2}"})
    await c.lifecycle.create(
        NAME,
        KeyType.AES_256,
        targets=Targets.parse(["env=prod"], env="prod"),
        install=InstallSpec(path="/etc/ckms/{team}/{purpose}.json", format="keyring-json"),
        actor="alice",
    )
    try:
        yield c
    finally:
        await c.close()


async def ack(c: Controller, host: str, version: int, status: str, clock: FakeClock) -> None:
    """What the ack service writes for one host's ack (the gate reads these rows)."""
    key = await c.lifecycle.get(NAME)
    assert c.store is not None
    digest = key.version(version).digest if status == "installed" else None
    async with c.store.write() as tx:
        await put_fleet_row(
            tx,
            host_id=host,
            key_id=key.id,
            version=version,
            status=status,
            digest=digest,
            updated_at=format_time(clock()),
            error="health check failed" if status == "failed" else None,
        )
        await c.hosts.record_seen(tx, host)


def holders(key: Key, hosts: list[Host], version: int) -> set[str]:
    return {h.id for h in hosts if version in {v.version for v in desired_versions(key, h)}}


@pytest.mark.requirement("SP800-57-7.1-PREACTIVE")
async def test_a_staged_rotation_releases_its_sample_stage_by_stage(
    ctl: Controller, clock: FakeClock
) -> None:
    c = ctl
    await c.lifecycle.rotate(
        NAME, actor="alice", rollout=RolloutRequest(stages=(10, 50, 100), spread="zone")
    )
    key = await c.lifecycle.get(NAME)
    v2 = key.version(2)
    assert (v2.state, v2.activation_at, key.primary_version) == (KeyState.PRE_ACTIVE, None, 1)
    hosts = await c.hosts.list()
    order = sample_order(seed_of(key, 2), hosts, "zone")
    assert holders(key, hosts, 2) == {order[0]}
    assert holders(key, hosts, 1) == set(HOSTS)  # the old version stays everywhere

    assert await c.rollouts.step() == []  # nobody acked yet: nothing moves
    await ack(c, order[0], 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]
    key = await c.lifecycle.get(NAME)
    assert holders(key, hosts, 2) == set(order[:5])
    assert key.rollout is not None and key.rollout.stage == 2

    for host in order[:5]:
        await ack(c, host, 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]
    key = await c.lifecycle.get(NAME)
    assert holders(key, hosts, 2) == set(HOSTS)
    assert key.primary_version == 1  # the last stage is out, not yet converged

    for host in order[5:-1]:
        await ack(c, host, 2, "installed", clock)
    assert await c.rollouts.step() == []  # one host still holds it up
    view = await c.rollouts.view(key)
    assert view.verdict is not None and view.verdict.waiting == (order[-1],)
    await ack(c, order[-1], 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.COMPLETE)]
    key = await c.lifecycle.get(NAME)
    assert (key.primary_version, key.version(2).state) == (2, KeyState.ACTIVE)
    assert key.rollout is not None and key.rollout.state is RolloutState.COMPLETED

    assert c.store is not None
    records = await audit_log.load_records(c.store)
    assert [r.action for r in records if r.action.startswith("rollout.")] == [
        "rollout.start",
        "rollout.advance",
        "rollout.advance",
        "rollout.complete",
    ]
    assert (await audit_log.verify_store(c.store, await c.vault.public_key())).ok


async def test_a_failure_halts_abort_rolls_the_stage_back_and_resume_releases_it_again(
    ctl: Controller, clock: FakeClock
) -> None:
    c = ctl
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(10, 50, 100)))
    key = await c.lifecycle.get(NAME)
    hosts = await c.hosts.list()
    order = sample_order(seed_of(key, 2), hosts, None)
    await ack(c, order[0], 2, "installed", clock)
    await c.rollouts.step()
    stage2 = (await c.lifecycle.get(NAME)).rollout
    assert stage2 is not None and stage2.released == frozenset(order[:5])

    clock.advance(seconds=1)
    await ack(c, order[1], 2, "installed", clock)
    await ack(c, order[2], 2, "failed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.HALT)]
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.state is RolloutState.HALTED
    assert key.rollout.reason == f"stage 2 of 3 failed on {order[2]}"
    assert c.store is not None
    (halt,) = [r for r in await audit_log.load_records(c.store) if r.action == "rollout.halt"]
    assert halt.details["errors"] == {order[2]: "health check failed"}  # audited, not evented
    assert holders(key, hosts, 2) == set(order[:5])  # halted: nothing more goes out
    assert key.primary_version == 1
    for host in order[1:5]:
        await ack(c, host, 2, "installed", clock)
    assert await c.rollouts.step() == []  # halted rollouts are not judged again

    await c.rollouts.abort(NAME, actor="alice", reason="bad build on web")
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.state is RolloutState.ROLLED_BACK
    assert holders(key, hosts, 2) == {order[0]}  # stage 2 withdrawn, stage 1 stays

    await ack(c, order[2], 2, "failed", clock)  # an old failure, before the resume
    judged = (await c.lifecycle.get(NAME)).rollout
    assert judged is not None
    clock.advance(seconds=1)
    await c.rollouts.resume(NAME, actor="alice", reason="fixed")
    # A judgment of the stage as it was before the resume cannot halt the resumed one.
    with pytest.raises(InvalidTransitionError, match="moved meanwhile"):
        await c.lifecycle.move_rollout(
            NAME,
            RolloutOp.HALT,
            actor="rollout",
            expect=(judged.version, judged.stage, judged.stage_started_at),
        )
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.released == frozenset(order[:5])  # same hosts
    assert await c.rollouts.step() == []  # the old failure no longer counts; waits for acks
    # (and for the withdrawn hosts' new ones: what they acked before the abort is dropped)
    for host in order[1:5]:
        await ack(c, host, 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]


async def test_the_deadline_expires_a_rollout_that_stays_preactive(
    ctl: Controller, clock: FakeClock
) -> None:
    c = ctl
    await c.lifecycle.rotate(NAME, actor="alice", activate_when="converged")  # every host at once
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.stages == (100,)
    assert key.rollout.deadline_at == clock() + key.policy.activation_deadline
    await c.lifecycle.destroy(NAME, 2, actor="alice")
    # Within max staleness (1 day), so the silent host is counted and holds the gate up.
    await c.lifecycle.rotate(
        NAME, actor="alice", rollout=RolloutRequest(deadline=timedelta(hours=1))
    )
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.deadline_at == clock() + timedelta(hours=1)
    clock.advance(timedelta(hours=1, seconds=1))
    for host in HOSTS[:-1]:
        await ack(c, host, 3, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.EXPIRE)]
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.state is RolloutState.EXPIRED
    assert key.rollout.reason is not None and HOSTS[-1] in key.rollout.reason
    assert (key.primary_version, key.version(3).state) == (1, KeyState.PRE_ACTIVE)
    await ack(c, HOSTS[-1], 3, "installed", clock)
    assert await c.rollouts.step() == []  # expired: no activation by itself
    await c.rollouts.resume(NAME, actor="alice", deadline=timedelta(hours=1))
    assert await c.rollouts.step() == [(NAME, RolloutOp.COMPLETE)]


async def test_a_host_stale_past_max_staleness_does_not_hold_the_rollout_up(
    ctl: Controller, clock: FakeClock
) -> None:
    """Its agent drops the key itself once out of contact that long (fail closed)."""
    c = ctl
    await c.lifecycle.rotate(NAME, actor="alice", activate_when="converged")
    key = await c.lifecycle.get(NAME)
    clock.advance(key.policy.max_staleness + timedelta(minutes=1))
    for host in HOSTS[:-1]:
        await ack(c, host, 2, "installed", clock)
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None
    verdict = await c.rollouts.verdict(key, key.rollout)
    assert (verdict.uncounted, verdict.waiting, verdict.holds) == ((HOSTS[-1],), (), True)
    assert await c.rollouts.step() == [(NAME, RolloutOp.COMPLETE)]


def test_a_threshold_below_100_percent_lets_the_gate_hold_without_every_host() -> None:
    """The gate is pure: it judges the hosts and acknowledgements it is given."""
    hosts = _hosts()
    rollout = Rollout(
        key_id="k",
        version=2,
        stages=(100,),
        gate=Gate.INSTALLED,
        stage=1,
        state=RolloutState.RUNNING,
        threshold_pct=90,
        started_at=T0,
        started_by="alice",
        stage_started_at=T0,
        deadline_at=T0 + timedelta(days=1),
        updated_at=T0,
    )
    version = KeyVersion(
        key=NAME,
        version=2,
        state=KeyState.PRE_ACTIVE,
        digest="hmac-sha256:" + "0" * 64,
        has_material=True,
        created_at=T0,
        created_by="alice",
        state_changed_at=T0,
    )
    key = Key(
        id="k",
        name=NAME,
        type=KeyType.AES_256,
        usage=frozenset(),
        policy=Policy(cryptoperiod=timedelta(days=90), grace=timedelta(days=7)),
        targets=Targets(),
        install=InstallSpec(path="/etc/ckms/x.json", format="keyring-json"),
        created_at=T0,
        created_by="alice",
        updated_at=T0,
        versions=(version,),
    )
    acks = {h.id: AckRow("installed", version.digest, T0) for h in hosts[:9]}
    seen = {h.id: T0 for h in hosts}
    verdict = judge_stage(key, version, rollout, hosts, acks, seen, T0)
    assert verdict.holds and verdict.waiting == (hosts[9].id,)
    acks = {h.id: AckRow("installed", version.digest, T0) for h in hosts[:8]}
    assert not judge_stage(key, version, rollout, hosts, acks, seen, T0).holds


async def test_gate_healthy_needs_a_health_check_and_one_rollout_at_a_time(
    ctl: Controller,
) -> None:
    c = ctl
    with pytest.raises(ConfigError, match="gate healthy needs a health check"):
        await c.lifecycle.rotate(
            NAME, actor="alice", rollout=RolloutRequest(stages=(50, 100), gate=Gate.HEALTHY)
        )
    assert (await c.lifecycle.get(NAME)).latest_version == 1  # nothing was added
    await c.lifecycle.rotate(NAME, actor="alice", activate_when="converged")
    with pytest.raises(InvalidTransitionError, match="is still rolling out"):
        await c.lifecycle.rotate(NAME, actor="alice", activate_when="converged")
    with pytest.raises(InvalidTransitionError, match=r"cannot resume the rollout .* running"):
        await c.lifecycle.move_rollout(NAME, RolloutOp.RESUME, actor="alice")
    with pytest.raises(InvalidTransitionError, match="moved meanwhile"):
        await c.lifecycle.move_rollout(NAME, RolloutOp.HALT, actor="rollout", expect=(2, 7, T0))
    with pytest.raises(InvalidTransitionError, match="its last stage is out"):
        await c.lifecycle.move_rollout(NAME, RolloutOp.ADVANCE, actor="rollout")
    assert c.store is not None
    refused = [r for r in await audit_log.load_records(c.store) if r.outcome == "refused"]
    assert [r.action for r in refused][-3:] == ["rollout.resume", "rollout.halt", "rollout.advance"]


async def test_destroying_the_waiting_version_cancels_its_rollout(ctl: Controller) -> None:
    c = ctl
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(10, 100)))
    await c.lifecycle.destroy(NAME, 2, actor="alice", reason="never mind")
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.state is RolloutState.CANCELLED
    assert key.primary_version == 1
    await c.lifecycle.rotate(NAME, actor="alice", activate_when="converged")  # a new one may start
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.version == 3


async def test_a_key_without_rollout_has_none_to_move(ctl: Controller) -> None:
    with pytest.raises(NotFoundError, match="has no rollout"):
        await ctl.lifecycle.move_rollout(NAME, RolloutOp.RESUME, actor="alice")


# -- the rollout row is bound to the root KEK ----------------------------------------------


def _edit(path: Path, statement: str, params: tuple[object, ...] = ()) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute(statement, params)


@pytest.mark.requirement("PCI-3.7.2")
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE rollouts SET stage = 3, released = NULL",  # advance to every host
        'UPDATE rollouts SET released = \'["web-1","web-2","web-3","web-4","web-5"]\'',
        "UPDATE rollouts SET state = 'completed'",
        "UPDATE rollouts SET deadline_at = '2999-01-01T00:00:00.000000Z'",
        "UPDATE rollouts SET mac = NULL",
    ],
)
async def test_a_db_owner_cannot_advance_a_stage(
    tmp_path: Path, clock: FakeClock, statement: str
) -> None:
    c = await _open(tmp_path / "ctl", clock)
    for host in HOSTS[:5]:
        await enroll_host(c, host, {"env": "prod"})
    await c.lifecycle.create(
        NAME, KeyType.AES_256, targets=Targets.parse(["env=prod"], env="prod"), actor="alice"
    )
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(20, 60, 100)))
    assert c.store is not None
    path = c.store.path
    await c.close()
    _edit(path, statement)
    c = await _open(tmp_path / "ctl", clock)
    try:
        with pytest.raises(IntegrityError, match=f"the rollout of key {NAME} failed integrity"):
            await c.lifecycle.get(NAME)
        with pytest.raises(IntegrityError):
            await c.lifecycle.current_keys()  # sync answers no host from a forged row
        assert await c.rollouts.step() == []  # and the driver moves nothing
    finally:
        await c.close()


async def test_a_deleted_rollout_row_releases_the_version_to_nobody(
    tmp_path: Path, clock: FakeClock
) -> None:
    c = await _open(tmp_path / "ctl", clock)
    for host in HOSTS[:5]:
        await enroll_host(c, host, {"env": "prod"})
    await c.lifecycle.create(
        NAME, KeyType.AES_256, targets=Targets.parse(["env=prod"], env="prod"), actor="alice"
    )
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(20, 100)))
    assert c.store is not None
    path = c.store.path
    await c.close()
    _edit(path, "DELETE FROM rollouts")
    c = await _open(tmp_path / "ctl", clock)
    try:
        key = await c.lifecycle.get(NAME)
        hosts = await c.hosts.list()
        assert holders(key, hosts, 2) == set()  # fail closed: waits for a rollout it lacks
        assert holders(key, hosts, 1) == set(HOSTS[:5])
    finally:
        await c.close()


def test_stage_release_keeps_every_host_an_earlier_stage_released() -> None:
    hosts = _hosts()
    key_id = "k-9"
    key = Key.model_construct(id=key_id, name=NAME)
    first = stage_release(key, 2, (10, 50, 100), 1, hosts, spread="zone")
    assert first is not None and len(first) == 1
    grown = stage_release(key, 2, (10, 50, 100), 2, hosts[1:], spread="zone", before=first)
    assert grown is not None and first <= grown
    assert stage_release(key, 2, (10, 50, 100), 3, hosts, spread="zone") is None


async def test_the_scheduler_rotates_a_converging_key_into_a_rollout(
    ctl: Controller, clock: FakeClock
) -> None:
    c = ctl
    key = await c.lifecycle.get(NAME)
    policy = key.policy.model_copy(update={"activate_when": ActivateWhen.CONVERGED})
    await c.lifecycle.set_policy(NAME, policy, actor="alice")
    clock.advance(policy.cryptoperiod + timedelta(seconds=1))
    report = await c.scheduler.tick()
    assert report.rotated == [NAME]
    key = await c.lifecycle.get(NAME)
    assert (key.primary_version, key.version(2).state) == (1, KeyState.PRE_ACTIVE)
    assert key.rollout is not None and key.rollout.started_by == "scheduler"
    assert (await c.scheduler.tick()).rotated == []  # a waiting version: no second rotation


@pytest.mark.requirement("PCI-3.7.2")
@pytest.mark.parametrize(
    "statement",
    [
        # 'installed' forged for every host that has not acknowledged (no MAC, or a made-up one)
        "INSERT INTO fleet_state(host_id, key_id, version, status, digest, updated_at) "
        "SELECT h.id, f.key_id, f.version, 'installed', f.digest, f.updated_at FROM hosts h, "
        "fleet_state f WHERE h.id != f.host_id",
        "INSERT INTO fleet_state(host_id, key_id, version, status, digest, updated_at, mac) "
        "SELECT h.id, f.key_id, f.version, 'installed', f.digest, f.updated_at, f.mac "
        "FROM hosts h, fleet_state f WHERE h.id != f.host_id",
        # the silent hosts backdated past max staleness, so that they are not counted
        "UPDATE hosts SET last_seen_at = '2001-01-01T00:00:00.000000Z' "
        "WHERE id NOT IN (SELECT host_id FROM fleet_state)",
    ],
)
async def test_a_db_owner_cannot_fake_the_gate(
    tmp_path: Path, clock: FakeClock, statement: str
) -> None:
    """The gate trusts the fleet view's rows and the hosts' last contact: whoever owns the DB
    file must not push a version to the fleet by forging 'installed' or by making the silent
    hosts look stale. Both are MAC'd; the driver refuses to move on a bad one and counts no
    ack it cannot check."""
    c = await _open(tmp_path / "ctl", clock)
    for host in HOSTS[:5]:
        await enroll_host(c, host, {"env": "prod"})
    await c.lifecycle.create(
        NAME, KeyType.AES_256, targets=Targets.parse(["env=prod"], env="prod"), actor="alice"
    )
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(100,)))
    clock.advance(seconds=1)
    await ack(c, HOSTS[0], 2, "installed", clock)
    assert await c.rollouts.step() == []  # four hosts still to go
    assert c.store is not None
    path = c.store.path
    await c.close()
    _edit(path, statement)
    c = await _open(tmp_path / "ctl", clock)
    try:
        assert await c.rollouts.step() == []
        key = await c.lifecycle.get(NAME)
        assert key.primary_version == 1 and key.version(2).state is KeyState.PRE_ACTIVE
    finally:
        await c.close()


async def test_an_installed_ack_from_before_an_abort_does_not_count_after_the_resume(
    ctl: Controller, clock: FakeClock
) -> None:
    """Aborting withdraws the stage's hosts: what they acknowledged before no longer speaks
    for them, so the resumed stage waits for their new acknowledgements."""
    c = ctl
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(10, 50, 100)))
    key = await c.lifecycle.get(NAME)
    order = sample_order(seed_of(key, 2), await c.hosts.list(), None)
    await ack(c, order[0], 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]
    clock.advance(seconds=1)
    for host in order[1:4]:
        await ack(c, host, 2, "installed", clock)
    await c.rollouts.abort(NAME, actor="alice", reason="bad build")
    clock.advance(seconds=1)
    await c.rollouts.resume(NAME, actor="alice", reason="fixed")
    await ack(c, order[4], 2, "installed", clock)
    assert await c.rollouts.step() == []
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None
    verdict = await c.rollouts.verdict(key, key.rollout)
    assert verdict.waiting == tuple(sorted(order[1:4]))
    for host in order[1:4]:
        await ack(c, host, 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]


async def test_a_failure_applied_between_judgment_and_move_stops_the_move(
    ctl: Controller, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate is judged again inside the transaction that moves the stage: a `failed` ack
    that lands after the driver's first look and before its write halts instead."""
    c = ctl
    await c.lifecycle.rotate(NAME, actor="alice", rollout=RolloutRequest(stages=(10, 50, 100)))
    key = await c.lifecycle.get(NAME)
    order = sample_order(seed_of(key, 2), await c.hosts.list(), None)
    await ack(c, order[0], 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]
    clock.advance(seconds=1)
    for host in order[1:5]:
        await ack(c, host, 2, "installed", clock)
    move = c.lifecycle.move_rollout

    async def late_failure(*args: object, **kwargs: object) -> Rollout:
        await ack(c, order[1], 2, "failed", clock)  # applied while the driver decides
        monkeypatch.setattr(c.lifecycle, "move_rollout", move)
        return await move(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(c.lifecycle, "move_rollout", late_failure)
    assert await c.rollouts.step() == [(NAME, RolloutOp.HALT)]
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.stage == 2
    assert key.rollout.state is RolloutState.HALTED


async def test_a_failure_budget_lets_a_stage_go_on_past_its_holdouts_and_names_them(
    ctl: Controller, clock: FakeClock
) -> None:
    """By default one failure halts a stage (budget 0). With ``max_failures`` the stage goes
    on while at most that many (or that share of) its hosts failed; they are not counted and
    are named as holdouts. One more failure than the budget halts. A halted rollout resumes
    with a budget that covers the hosts it failed on (``rollout resume --max-failures``)."""
    c = ctl
    await c.lifecycle.rotate(
        NAME, actor="alice", rollout=RolloutRequest(stages=(50, 100), max_failures="20%")
    )
    key = await c.lifecycle.get(NAME)
    order = sample_order(seed_of(key, 2), await c.hosts.list(), None)
    clock.advance(seconds=1)
    await ack(c, order[0], 2, "failed", clock)  # 20% of 5 hosts: one may fail
    for host in order[1:5]:
        await ack(c, host, 2, "installed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.ADVANCE)]
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None and key.rollout.reason is not None
    assert f"failed, within the budget of 1: {order[0]}" in key.rollout.reason
    clock.advance(seconds=1)
    for host in order[5:8]:  # 20% of 10 hosts: two may fail, a third halts
        await ack(c, host, 2, "failed", clock)
    assert await c.rollouts.step() == [(NAME, RolloutOp.HALT)]
    await c.rollouts.resume(NAME, actor="alice", reason="known bad hosts", max_failures="3")
    clock.advance(seconds=1)
    for host in order[5:8]:
        await ack(c, host, 2, "failed", clock)
    for host in [*order[:5], *order[8:]]:  # order[0] failed only in stage 1: asked again
        await ack(c, host, 2, "installed", clock)
    key = await c.lifecycle.get(NAME)
    assert key.rollout is not None
    verdict = await c.rollouts.verdict(key, key.rollout)
    assert verdict.failed == tuple(sorted(order[5:8]))
    assert (verdict.halts, verdict.holds) == (False, True)
    assert await c.rollouts.step() == [(NAME, RolloutOp.COMPLETE)]


def test_a_failure_budget_is_a_count_or_a_percent() -> None:
    with pytest.raises(ConfigError, match="failure budget"):
        RolloutRequest(max_failures="lots")
    with pytest.raises(ConfigError, match="failure budget"):
        RolloutRequest(max_failures="150%")
    assert failure_budget("2", 10) == 2
    assert failure_budget("25%", 10) == 2  # rounded down: never more than the share
    assert failure_budget(None, 10) == 0
