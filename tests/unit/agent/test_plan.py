"""The reconcile plan as a pure function: desired state against held state → actions."""

from __future__ import annotations

from pathlib import Path

from ckms.protocol import DesiredKey, DesiredVersion, InstallSpec, RemoveItem, SyncReply
from ckms_agent.plan import Action, files_signature, is_stale, needed_versions, plan_changes
from ckms_agent.state import KeyRecord, VersionRecord

RAW = InstallSpec(path="/keys/{name}.key")
RING = InstallSpec(path="/keys/{name}.json", format="keyring-json")
PER_VERSION = InstallSpec(path="/keys/{name}/{version}.key")


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def dv(version: int, *, primary: bool = False, state: str = "Active") -> DesiredVersion:
    return DesiredVersion(version=version, state=state, primary=primary, digest=digest(version))


def desired(name: str, spec: InstallSpec, *versions: DesiredVersion, **kw: object) -> DesiredKey:
    return DesiredKey(key=name, key_type="aes-256", install=spec, versions=versions, **kw)


def reply(*keys: DesiredKey, remove: tuple[RemoveItem, ...] = ()) -> SyncReply:
    return SyncReply(host="web-1", keys=keys, remove=remove, controller_time="t")


def held(
    name: str, spec: InstallSpec, *versions: tuple[int, bool], state: str = "Active"
) -> KeyRecord:
    return KeyRecord(
        name=name,
        key_type="aes-256",
        spec=spec,
        versions={v: VersionRecord(v, state, p, digest(v)) for v, p in versions},
        files={Path(f"/keys/{name}"): "00"},
    )


def test_new_key_is_installed_with_every_version_fetched() -> None:
    [plan] = plan_changes(reply(desired("a/b", RING, dv(1), dv(2, primary=True))), {})
    assert (plan.action, plan.fetch, plan.changed, plan.dropped) == (
        Action.INSTALL,
        (1, 2),
        (1, 2),
        (),
    )
    assert plan.reason == "new key"


def test_nothing_to_do_when_the_host_matches() -> None:
    state = {"a/b": held("a/b", RAW, (1, True))}
    assert plan_changes(reply(desired("a/b", RAW, dv(1, primary=True))), state) == []


def test_rotation_fetches_only_the_new_version_and_rewrites_files() -> None:
    state = {"a/b": held("a/b", RING, (1, True))}
    [plan] = plan_changes(reply(desired("a/b", RING, dv(1), dv(2, primary=True))), state)
    assert plan.action is Action.INSTALL
    assert plan.fetch == (2,)
    assert plan.changed == (1, 2)  # v1 lost its primary mark
    assert plan.dropped == ()


def test_versions_past_grace_are_dropped() -> None:
    state = {"a/b": held("a/b", PER_VERSION, (1, False), (2, True))}
    [plan] = plan_changes(reply(desired("a/b", PER_VERSION, dv(2, primary=True))), state)
    assert (plan.action, plan.fetch, plan.dropped) == (Action.INSTALL, (), (1,))


def test_single_file_key_only_rewrites_when_the_primary_changes() -> None:
    state = {"a/b": held("a/b", RAW, (1, True))}
    # A new non-primary (pre-active) version: fetched and checked, but the file stays.
    [plan] = plan_changes(
        reply(desired("a/b", RAW, dv(1, primary=True), dv(2, state="PreActive"))), state
    )
    assert (plan.action, plan.fetch, plan.changed) == (Action.UPDATE, (2,), (2,))
    # Activation makes it primary: now the file changes.
    state = {"a/b": held("a/b", RAW, (1, True), (2, False))}
    [plan] = plan_changes(reply(desired("a/b", RAW, dv(1), dv(2, primary=True))), state)
    assert (plan.action, plan.fetch, plan.changed) == (Action.INSTALL, (), (1, 2))


def test_a_changed_digest_is_fetched_again() -> None:
    state = {"a/b": held("a/b", RAW, (1, True))}
    other = DesiredVersion(version=1, state="Active", primary=True, digest=digest(99))
    [plan] = plan_changes(reply(desired("a/b", RAW, other)), state)
    assert (plan.action, plan.fetch) == (Action.INSTALL, (1,))


def test_spec_type_and_drift_force_a_reinstall() -> None:
    state = {"a/b": held("a/b", RAW, (1, True))}
    moved = InstallSpec(path="/other/{name}.key")
    [plan] = plan_changes(reply(desired("a/b", moved, dv(1, primary=True))), state)
    assert plan.action is Action.INSTALL and "install spec changed" in plan.reason
    [plan] = plan_changes(reply(desired("a/b", RAW, dv(1, primary=True))), state, drifted={"a/b"})
    assert plan.action is Action.INSTALL and plan.fetch == () and "drifted" in plan.reason


def test_staleness_change_only_updates_the_record() -> None:
    state = {"a/b": held("a/b", RAW, (1, True))}
    [plan] = plan_changes(
        reply(desired("a/b", RAW, dv(1, primary=True), max_staleness_s=60)), state
    )
    assert plan.action is Action.UPDATE and plan.fetch == () and plan.changed == ()


def test_keys_no_longer_listed_are_removed() -> None:
    state = {"a/b": held("a/b", RAW, (1, True)), "c/d": held("c/d", RAW, (3, True))}
    plans = plan_changes(reply(desired("a/b", RAW, dv(1, primary=True))), state)
    assert [(p.key, p.action, p.dropped) for p in plans] == [("c/d", Action.REMOVE, (3,))]


def test_remove_list_and_tombstones_win_over_a_stale_desired_list() -> None:
    state = {"a/b": held("a/b", RING, (1, False), (2, True))}
    listed = desired("a/b", RING, dv(1), dv(2, primary=True))
    [plan] = plan_changes(reply(listed, remove=(RemoveItem(key="a/b", versions=(1,)),)), state)
    assert plan.dropped == (1,) and [v.version for v in plan.desired.versions] == [2]
    [plan] = plan_changes(reply(listed), state, tombstones={("a/b", 1)})
    assert plan.dropped == (1,)
    # The listed primary was revoked by an event after this reply was made: wait for the
    # controller to name a new primary rather than install a key without one.
    assert plan_changes(reply(listed), state, tombstones={("a/b", 2)}) == []
    assert plan_changes(reply(listed), {}, tombstones={("a/b", 1), ("a/b", 2)}) == []
    # Every version gone by the controller's own word: the key goes.
    gone = (RemoveItem(key="a/b", versions=(1, 2)),)
    [plan] = plan_changes(reply(listed, remove=gone), state)
    assert plan.action is Action.REMOVE


def test_plans_are_sorted_by_key() -> None:
    plans = plan_changes(
        reply(desired("z/z", RAW, dv(1, primary=True)), desired("a/a", RAW, dv(1, primary=True))),
        {"m/m": held("m/m", RAW, (1, True))},
    )
    assert [p.key for p in plans] == ["a/a", "m/m", "z/z"]


def test_what_the_files_depend_on() -> None:
    one = [dv(1), dv(2, primary=True)]
    restated = [dv(1, state="Suspended"), dv(2, primary=True)]
    assert files_signature(RAW, one) == files_signature(RAW, restated)
    assert files_signature(RING, one) != files_signature(RING, restated)
    assert [v.version for v in needed_versions(RAW, one)] == [2]
    assert [v.version for v in needed_versions(RING, one)] == [1, 2]
    assert [v.version for v in needed_versions(PER_VERSION, one)] == [1, 2]
    assert [v.version for v in needed_versions(RAW, [dv(1)])] == [1]  # no primary: render fails


def test_staleness_uses_the_key_limit_then_the_default() -> None:
    key = held("a/b", RAW, (1, True))
    assert not is_stale(key, last_contact=0, now=10**9, default=None)
    assert is_stale(key, last_contact=0, now=61, default=60)
    assert not is_stale(key, last_contact=0, now=60, default=60)
    strict = KeyRecord(**{**key.__dict__, "max_staleness_s": 10})
    assert is_stale(strict, last_contact=100, now=111, default=None)
    assert not is_stale(strict, last_contact=None, now=111, default=None)
