"""KeyOps driven directly: a fake installer (files in memory) and a fake fetcher (real HPKE wraps
from a stand-in controller), over a real state DB and real signed acks.

These are the guards where they live: digests checked before anything is written, a revocation
that lands while a first install of that very version is in flight, keyrings rewritten offline,
and fail-closed removal when a keyring cannot be rebuilt.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from ckms.crypto import (
    KeyringEntry,
    KeyType,
    WrapSuite,
    encode_keyring,
    generate,
    generate_signing_key,
    generate_wrapping_keypair,
    material_digest,
    wrap_for_agent,
)
from ckms.errors import NotDistributableError, PermissionDeniedError
from ckms.protocol import (
    AckStatus,
    DesiredKey,
    DesiredVersion,
    FetchReply,
    FetchRequest,
    InstallSpec,
    SyncReply,
    parse_canonical_json,
)
from ckms_agent.acks import AckWriter
from ckms_agent.installer import ApplyOutcome, HeldVersion
from ckms_agent.keyops import KeyOps, Trigger
from ckms_agent.plan import plan_changes
from ckms_agent.state import AgentState

HOST = "web-1"
NAME = "app/db"
DIGEST_KEY = bytes(range(32))


class FakeInstaller:
    """Files in a dict; records every apply and removal. Same methods KeyOps calls."""

    def __init__(self) -> None:
        self.files: dict[Path, bytes] = {}
        self.applied: list[list[int]] = []
        self.removed: list[list[Path]] = []
        self.failing = False
        """Refuse every apply, as a failing health check does (the old files stay)."""

    def host_path(self, path: str) -> Path:
        return Path(path)

    def check(self, spec: InstallSpec, paths: Iterable[Path]) -> list[object]:
        return []

    def read(self, path: Path) -> bytes | None:
        return self.files.get(path)

    def sweep(self, directory: Path, names: Iterable[str] | None = None) -> list[str]:
        return []

    def hash_files(self, paths: Iterable[Path]) -> dict[Path, str]:
        return {p: hashlib.sha256(self.files[p]).hexdigest() for p in paths}

    def files_match(self, files: Mapping[Path, str]) -> bool:
        return all(
            p in self.files and hashlib.sha256(self.files[p]).hexdigest() == h
            for p, h in files.items()
        )

    async def apply(
        self,
        key_name: str,
        key_type: str,
        spec: InstallSpec,
        versions: Sequence[HeldVersion],
        previous: Mapping[Path, str] | None = None,
    ) -> ApplyOutcome:
        self.applied.append([v.version for v in versions])
        if self.failing:
            return ApplyOutcome(AckStatus.FAILED, [], error="health check failed")
        if "{version}" in spec.path:
            out = {Path(spec.render_path(key_name, v.version, HOST)): v.material for v in versions}
        else:
            primary = next(v for v in versions if v.primary)
            entries = [KeyringEntry(v.version, v.material, v.primary, v.state) for v in versions]
            out = {
                Path(spec.render_path(key_name, primary.version, HOST)): encode_keyring(
                    KeyType(key_type), entries, key_name=key_name
                )
            }
        for path in previous or {}:
            if path not in out:
                self.files.pop(path, None)
        self.files.update(out)
        return ApplyOutcome(AckStatus.INSTALLED, sorted(out))

    async def remove(self, spec: InstallSpec | None, paths: Iterable[Path]) -> ApplyOutcome:
        gone = list(paths)
        self.removed.append(gone)
        for path in gone:
            self.files.pop(path, None)
        return ApplyOutcome(AckStatus.REMOVED, [])


class FakeController:
    """Holds material per version and answers fetches wrapped for the host; can hold a fetch."""

    def __init__(self, wrapping_public: bytes) -> None:
        self._public = wrapping_public
        self.material: dict[int, bytes] = {}
        self.digest_sent: dict[int, str] = {}
        self.fetched: list[int] = []
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()
        self.refused: set[int] = set()
        self.retired: set[int] = set()

    def add(self, version: int) -> DesiredVersion:
        self.material[version] = generate(KeyType.AES_256)
        return DesiredVersion(
            version=version, state="Active", primary=False, digest=self.digest(version)
        )

    def digest(self, version: int) -> str:
        return material_digest(DIGEST_KEY, self.material[version])

    async def fetch(self, request: FetchRequest) -> FetchReply:
        self.fetched.append(request.version)
        if request.version in self.refused:
            raise PermissionDeniedError(f"{request.key} v{request.version} is Compromised")
        if request.version in self.retired:
            raise NotDistributableError(f"{request.key} v{request.version} is Deactivated")
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        material = self.material[request.version]
        wrapped = wrap_for_agent(
            self._public,
            material,
            key_name=request.key,
            version=request.version,
            agent_id=HOST,
            suite=WrapSuite.X25519,
        )
        return FetchReply(
            key=request.key,
            version=request.version,
            digest=self.digest_sent.get(request.version, self.digest(request.version)),
            suite=str(WrapSuite.X25519),
            wrapped=base64.b64encode(wrapped).decode(),
        )


class Rig:
    def __init__(self, state: AgentState) -> None:
        private, public = generate_wrapping_keypair()
        self.state = state
        self.installer = FakeInstaller()
        self.controller = FakeController(public)
        self.reconciles = 0
        self.reconcile_triggers: list[Trigger | None] = []
        self.ops = KeyOps(
            state=state,
            installer=self.installer,  # type: ignore[arg-type]
            acks=AckWriter(state, identity_key=generate_signing_key(), host_id=HOST),
            wrapping_key=private,
            host_id=HOST,
            request_reconcile=self._reconcile,
            digest_key=DIGEST_KEY,
        )

    def _reconcile(self, trigger: Trigger | None = None) -> None:
        self.reconciles += 1
        self.reconcile_triggers.append(trigger)

    def desired(self, spec: InstallSpec, *versions: DesiredVersion, primary: int) -> DesiredKey:
        return DesiredKey(
            key=NAME,
            key_type="aes-256",
            install=spec,
            versions=tuple(
                v.model_copy(update={"primary": v.version == primary}) for v in versions
            ),
        )

    async def sync(self, desired: DesiredKey, trigger: Trigger | None = None) -> set[int]:
        """Plan against what the state DB holds and execute the plan, as reconcile does."""
        reply = SyncReply(host=HOST, keys=(desired,), controller_time="2026-01-01T00:00:00.000000Z")
        held = await self.state.keys()
        plans = plan_changes(reply, held, tombstones=frozenset(self.ops.tombstones))
        if not plans:
            return set()  # nothing to change
        [plan] = plans
        return await self.ops.execute(plan, held.get(NAME), trigger, self.controller.fetch)

    async def acks(self) -> list[tuple[int, str]]:
        return [(a.version, a.status) for a in await self.state.pending_acks(100)]


PER_VERSION = InstallSpec(path="/keys/{team}/{purpose}/v{version}.key", format="raw")
KEYRING = InstallSpec(path="/keys/{team}/{purpose}.json", format="keyring-json")


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with AgentState(tmp_path / "state.db") as state:
        yield Rig(state)


@pytest.mark.requirement("PCI-3.7.5")
async def test_install_then_offline_revocation_of_a_per_version_file(rig: Rig) -> None:
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(PER_VERSION, v1, v2, primary=2)) == {1, 2}
    one, two = Path("/keys/app/db/v1.key"), Path("/keys/app/db/v2.key")
    assert rig.installer.files == {one: rig.controller.material[1], two: rig.controller.material[2]}
    fetched = list(rig.controller.fetched)
    # The controller is gone; the signed event alone removes the revoked version's file.
    assert await rig.ops.revoke(NAME, [1], 2, "ev-revoke") is True
    assert rig.controller.fetched == fetched
    assert set(rig.installer.files) == {two}
    record = await rig.state.key(NAME)
    assert record is not None and set(record.versions) == {2}
    assert sorted(await rig.acks()) == [(1, "installed"), (1, "removed"), (2, "installed")]
    assert not rig.ops.materials.has(NAME, 1)
    # The last version revoked: nothing can stay, every file of the key goes (fail closed).
    assert await rig.ops.revoke(NAME, [2], None, "ev-revoke-2") is False
    assert rig.installer.files == {}
    assert await rig.state.key(NAME) is None


async def test_material_that_does_not_match_the_named_digest_is_never_written(rig: Rig) -> None:
    v1 = rig.controller.add(1)
    rig.controller.digest_sent[1] = "hmac-sha256:" + "0" * 64  # the fetch reply names another
    assert await rig.sync(rig.desired(PER_VERSION, v1, primary=1)) == {1}
    assert rig.installer.applied == []
    assert rig.installer.files == {}
    assert await rig.acks() == [(1, "failed")]
    assert not rig.ops.materials.has(NAME, 1)


async def test_an_event_digest_that_disagrees_refuses_the_install(rig: Rig) -> None:
    v1 = rig.controller.add(1)
    trigger = Trigger(NAME, "ev-rotate", digests={1: "hmac-sha256:" + "f" * 64}, versions=(1,))
    await rig.sync(rig.desired(PER_VERSION, v1, primary=1), trigger)
    assert rig.installer.files == {}
    assert await rig.acks() == [(1, "failed")]


@pytest.mark.requirement("PCI-3.7.5")
async def test_revocation_landing_while_the_first_install_is_in_flight(rig: Rig) -> None:
    """The host holds nothing of the key yet; v1 is being fetched when its revocation arrives.

    The revocation finds no record (nothing on disk to remove) but notes v1 at once; when the
    fetch returns, the install sees the note under the key's lock and writes nothing.
    """
    v1 = rig.controller.add(1)
    rig.controller.gate = asyncio.Event()
    install = asyncio.create_task(rig.sync(rig.desired(PER_VERSION, v1, primary=1)))
    await asyncio.wait_for(rig.controller.waiting.wait(), 5)
    assert await rig.ops.revoke(NAME, [1], None, "ev-revoke") is True
    rig.controller.gate.set()
    assert await asyncio.wait_for(install, 5) == set()
    assert rig.installer.applied == []
    assert rig.installer.files == {}
    assert await rig.state.key(NAME) is None
    assert await rig.acks() == []
    assert not rig.ops.materials.has(NAME, 1)
    # A sync reply taken before the revocation still lists v1: it is never installed from it.
    assert rig.controller.fetched == [1]
    assert await rig.sync(rig.desired(PER_VERSION, v1, primary=1)) == set()
    assert rig.installer.files == {}


async def test_keyring_rewritten_offline_without_the_revoked_version(rig: Rig) -> None:
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, v2, primary=2)) == {1, 2}
    ring_path = Path("/keys/app/db.json")
    fetched = list(rig.controller.fetched)
    assert await rig.ops.revoke(NAME, [1], 2, "ev-revoke") is True
    assert rig.controller.fetched == fetched  # no controller needed
    ring = parse_canonical_json(rig.installer.files[ring_path])
    assert [v["version"] for v in ring["versions"]] == [2]
    assert ring["primary"] == 2
    record = await rig.state.key(NAME)
    assert record is not None and set(record.versions) == {2}


async def test_keyring_rebuilt_from_the_file_itself_when_memory_was_lost(rig: Rig) -> None:
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    await rig.sync(rig.desired(KEYRING, v1, v2, primary=2))
    rig.ops.materials.clear()  # as after a restart: nothing in memory
    assert await rig.ops.revoke(NAME, [1], 2, "ev-revoke") is True
    ring = parse_canonical_json(rig.installer.files[Path("/keys/app/db.json")])
    assert [v["version"] for v in ring["versions"]] == [2]


async def test_keyring_that_cannot_be_rebuilt_is_removed_whole(rig: Rig) -> None:
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    await rig.sync(rig.desired(KEYRING, v1, v2, primary=2))
    rig.ops.materials.clear()
    ring_path = Path("/keys/app/db.json")
    rig.installer.files[ring_path] = b"{not a keyring"  # and the file is no help either
    assert await rig.ops.revoke(NAME, [1], 2, "ev-revoke") is False
    assert ring_path not in rig.installer.files
    assert await rig.state.key(NAME) is None
    assert (2, "removed") in await rig.acks()


async def test_material_stays_out_of_reprs(rig: Rig) -> None:
    v1 = rig.controller.add(1)
    await rig.sync(rig.desired(PER_VERSION, v1, primary=1))
    material = rig.controller.material[1]
    for text in (repr(rig.ops.materials), repr(rig.ops), repr(vars(rig.ops.materials).keys())):
        assert material.hex() not in text and repr(material) not in text


async def test_a_failed_change_is_held_off_until_the_controller_stops_asking_for_it(
    rig: Rig,
) -> None:
    """A rollout stage is rolled back (the controller asks for v1 alone again) and resumed
    after a fix: the resumed change is tried at once, not after the hold-off."""
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, primary=1)) == {1}
    rig.installer.failing = True
    wanted = rig.desired(KEYRING, v1, v2, primary=1)
    reply = SyncReply(host=HOST, keys=(wanted,), controller_time="2026-01-01T00:00:00.000000Z")
    [plan] = plan_changes(reply, await rig.state.keys())
    await rig.ops.execute(plan, (await rig.state.keys()).get(NAME), None, rig.controller.fetch)
    assert (2, "failed") in await rig.acks()
    assert rig.ops.holding_off(plan, retry_after_s=300)
    rig.ops.forget_failures(except_keys={NAME})  # still asked for: still held off
    assert rig.ops.holding_off(plan, retry_after_s=300)
    rig.ops.forget_failures(except_keys=set())  # the stage withdrawn: nothing to change
    assert not rig.ops.holding_off(plan, retry_after_s=300)
    rig.installer.failing = False
    assert await rig.sync(wanted) == {2}  # the resumed stage installs at once


async def test_a_failed_version_the_controller_no_longer_asks_for_is_acked_removed(
    rig: Rig,
) -> None:
    """After an outage a late event asks for a version revoked meanwhile: the fetch is refused
    and acked ``failed``. Once a sync no longer lists that version the host says ``removed``
    (it holds none of it), so the fleet view does not keep a stale failure for it."""
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, primary=1)) == {1}
    rig.controller.refused.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, v2, primary=1)) == {2}
    assert (await rig.acks())[-1] == (2, "failed")
    # Still asked for: the failure stands.
    assert await rig.ops.settle_failures({NAME: {1, 2}}) == set()
    # The controller stopped asking for v2 (revoked): acked removed, once.
    assert await rig.ops.settle_failures({NAME: {1}}) == {(NAME, 2)}
    assert (await rig.acks())[-1] == (2, "removed")
    assert await rig.ops.settle_failures({NAME: {1}}) == set()


async def test_a_version_retired_between_sync_and_fetch_is_synced_again_not_failed(
    rig: Rig,
) -> None:
    """The sync listed v2, then a rotation deactivated it before the fetch: the plan is stale,
    and the host syncs again instead of telling the fleet view it failed (it used to)."""
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, primary=1)) == {1}
    rig.controller.retired.add(2)
    event = Trigger(NAME, "e-2", versions=(2,))
    assert await rig.sync(rig.desired(KEYRING, v1, v2, primary=1), event) == set()
    assert rig.reconcile_triggers == [event]  # the sync again answers the same event
    assert [status for _, status in await rig.acks()] == ["installed"]
    assert not rig.ops.failed_at
    # A controller that keeps listing it and refusing it gets a failure, not a sync storm.
    assert await rig.sync(rig.desired(KEYRING, v1, v2, primary=1)) == {2}
    assert (await rig.acks())[-1] == (2, "failed")
    assert rig.reconcile_triggers == [event]


async def test_a_revocation_event_settles_a_failure_of_a_version_never_held(rig: Rig) -> None:
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, primary=1)) == {1}
    rig.controller.refused.add(2)
    await rig.sync(rig.desired(KEYRING, v1, v2, primary=1))
    assert (await rig.acks())[-1] == (2, "failed")
    await rig.ops.revoke(NAME, [2], 1, "e-1")
    assert (await rig.acks())[-1] == (2, "removed")
    assert await rig.ops.settle_failures({NAME: {1}}) == set()  # settled once


async def test_a_stage_resumed_before_any_sync_saw_it_withdrawn_is_tried_at_once(
    rig: Rig,
) -> None:
    """The abort and the resume reach the host together (both events in one poll, or a resume
    straight from halted): no sync ever shows the stage withdrawn, and the resumed stage asks
    for exactly the change that failed. The signed ``key.rollout`` asked anew, so it is tried
    at once; the gate of the resumed stage waits for this host, not for its hold-off."""
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, primary=1)) == {1}
    rig.installer.failing = True
    wanted = rig.desired(KEYRING, v1, v2, primary=1)
    reply = SyncReply(host=HOST, keys=(wanted,), controller_time="2026-01-01T00:00:00.000000Z")
    [plan] = plan_changes(reply, await rig.state.keys())
    await rig.ops.execute(plan, (await rig.state.keys()).get(NAME), None, rig.controller.fetch)
    assert (await rig.acks())[-1] == (2, "failed")
    rig.installer.failing = False  # the fix
    # The next sync after the resume event: the same change is asked for (never withdrawn).
    [again] = plan_changes(reply, await rig.state.keys())
    assert again == plan
    rig.ops.forget_failures(except_keys={NAME})  # the sync alone cannot tell: held off
    assert rig.ops.holding_off(again, retry_after_s=300)
    rig.ops.forget_failures(except_keys={NAME}, asked_again={NAME})  # the resume event can
    assert not rig.ops.holding_off(again, retry_after_s=300)
    resumed = Trigger(NAME, "ev-resume", versions=(2,), retry=True)
    assert await rig.sync(wanted, resumed) == {2}
    assert (await rig.acks())[-1] == (2, "installed")
    # A failure after the resume is held off again until the next request (not retried forever).
    rig.installer.failing = True
    v3 = rig.controller.add(3)
    third = rig.desired(KEYRING, v1, v2, v3, primary=1)
    [plan3] = plan_changes(
        SyncReply(host=HOST, keys=(third,), controller_time="2026-01-01T00:00:00.000000Z"),
        await rig.state.keys(),
    )
    await rig.ops.execute(plan3, (await rig.state.keys()).get(NAME), None, rig.controller.fetch)
    rig.ops.forget_failures(except_keys={NAME})
    assert rig.ops.holding_off(plan3, retry_after_s=300)


async def test_a_held_version_is_acknowledged_again_when_its_stage_goes_out_again(
    rig: Rig,
) -> None:
    """A host that still holds the version when its stage is resumed (the abort's withdrawal
    never reached it) answers the resume with ``installed``: the controller forgot its
    pre-abort ack, and the resumed gate counts only acks sent since."""
    v1, v2 = rig.controller.add(1), rig.controller.add(2)
    assert await rig.sync(rig.desired(KEYRING, v1, v2, primary=1)) == {1, 2}
    before = len(await rig.acks())
    assert await rig.sync(rig.desired(KEYRING, v1, v2, primary=1)) == set()  # nothing to change
    resumed = Trigger(NAME, "ev-resume", versions=(2,), retry=True)
    await rig.ops.answer_triggers([resumed], {})
    assert (await rig.acks())[before:] == [(2, "installed")]
