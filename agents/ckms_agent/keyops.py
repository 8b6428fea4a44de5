"""Changing this host's keys: apply a reconcile plan, revoke locally, remove; record and ack.

:class:`KeyOps` is what the daemon's loops call to touch key files. Every change holds its
key's lock (one key's files are never written concurrently; a sweep only touches temp files of
the key being changed, so other keys may change meanwhile, and a reload that hangs on one key
holds up no revocation of another), runs as a critical section (a stop lands after the state DB
and the acks match the files), and ends in acks queued in the state DB:

- **execute** a :class:`~ckms_agent.plan.KeyPlan`: fetch what is needed through the daemon's
  connection, unwrap it with the wrapping key, keep it only if it matches every digest the
  controller named (sync reply, fetch reply, triggering event), install, record, ack;
- **revoke** versions from a signed event alone, without the controller
  (:class:`~ckms_agent.revocation.OfflineRevoker`);
- **remove** a key (no longer desired, stale, or the host revoked;
  :class:`~ckms_agent.removal.Remover`).

Material lives in memory (:class:`~ckms_agent.materials.Materials`, never in reprs or logs) so
keyrings can be rewritten offline; it is dropped as soon as its version is revoked or removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ckms.errors import CKMSError, NotDistributableError, StoreError, TransportError
from ckms.protocol import (
    MAX_PREFETCH,
    AckStatus,
    DesiredKey,
    DesiredVersion,
    FetchRequest,
    HookResult,
    InstalledVersion,
    InstallSpec,
)
from ckms_agent.acks import AckWriter
from ckms_agent.installer import ApplyOutcome, HeldVersion, Installer
from ckms_agent.installer import read_keyring as read_keyring  # importable here as before
from ckms_agent.materials import Fetcher, Materials
from ckms_agent.plan import Action, KeyPlan, is_stale, needed_versions, staleness_limit
from ckms_agent.removal import KeyLocks, Remover
from ckms_agent.removal import critical as critical  # the daemon's stops use it too
from ckms_agent.revocation import OfflineRevoker
from ckms_agent.state import AgentState, KeyRecord, VersionRecord

__all__ = ["Fetcher", "HeldReport", "KeyOps", "ReconcileRequest", "Trigger", "critical"]

STALE_REFUSAL_EVERY_S = 60.0
"""How often per key a fetch refused as no longer distributable is taken as a stale plan (a
sync again) rather than reported as a failure: a controller that keeps listing versions it then
refuses gets failures, not a storm of syncs."""

log = logging.getLogger(__name__)


@dataclass
class Trigger:
    """Why a key is reconciled: the event that asked (acks answer its id; digests are checked)."""

    key: str
    event_id: str
    digests: dict[int, str] = field(default_factory=dict)
    versions: tuple[int, ...] = ()
    retry: bool = False
    """The event asked anew for the key's rollout version (:attr:`Decision.retry`)."""

    def merge(self, older: Trigger) -> None:
        """Fold an older pending trigger of the same key into this one."""
        self.digests = {**older.digests, **self.digests}
        self.versions = tuple(sorted({*older.versions, *self.versions}))
        self.retry = self.retry or older.retry


@dataclass(frozen=True)
class HeldReport:
    """What the host reports as installed (files intact) and which keys drifted on disk."""

    installed: tuple[InstalledVersion, ...]
    drifted: frozenset[str]


class KeyOps:
    """Installs, revokes and removes this host's keys (see the module docstring)."""

    def __init__(
        self,
        *,
        state: AgentState,
        installer: Installer,
        acks: AckWriter,
        wrapping_key: bytes,
        host_id: str,
        request_reconcile: ReconcileRequest,
        clock: Callable[[], float] = time.time,
        digest_key: bytes | None = None,
    ) -> None:
        self._state = state
        self._installer = installer
        self._acks = acks
        self._host = host_id
        self._request_reconcile = request_reconcile
        self._clock = clock
        self.materials = Materials(
            wrapping_key=wrapping_key, host_id=host_id, digest_key=digest_key
        )
        self.lock = KeyLocks()
        """``ops.lock(name)``: the lock held while one key's files change."""
        self._remover = Remover(
            state=state, installer=installer, acks=acks, materials=self.materials, host_id=host_id
        )
        self.revoker = OfflineRevoker(
            state=state,
            installer=installer,
            acks=acks,
            materials=self.materials,
            locks=self.lock,
            remover=self._remover,
            host_id=host_id,
            clock=clock,
        )
        self.tombstones = self.revoker.tombstones
        """Versions revoked by events in this run; never (re)installed from an older reply."""
        self.failed_at: dict[str, float] = {}
        self.install_failures = 0
        """Changes that failed to install since start (for metrics)."""
        """When a key last failed to install (drift reports do not retry it at once)."""
        self._failed_plans: dict[str, tuple[tuple[object, ...], float]] = {}
        self._stale_refused_at: dict[str, float] = {}
        """Per key, when a refusal as no longer distributable was last taken as a stale plan."""
        self._failed_unheld: dict[str, set[int]] = {}
        """Versions acked ``failed`` that this host does not hold (never installed): acked
        ``removed`` once the controller stops asking for them (:meth:`settle_failures`)."""
        self._swept: set[Path] = set()

    @property
    def digest_key(self) -> bytes | None:
        """The fleet's digest key (None until it is known: nothing can be installed then)."""
        return self.materials.digest_key

    @digest_key.setter
    def digest_key(self, key: bytes | None) -> None:
        self.materials.digest_key = key

    def note_revoked(self, name: str, versions: Iterable[int]) -> None:
        """Remember revoked versions at once (never installed again, material dropped)."""
        self.revoker.note(name, versions)

    async def revoke(
        self, name: str, versions: Sequence[int], primary_version: int | None, event_id: str
    ) -> bool:
        """Remove revoked/destroyed versions now, from the signed event alone (architecture §4).

        True when the host is left as the controller wants it without asking.
        """
        done = await self.revoker.revoke(name, versions, primary_version, event_id)
        failed = self._failed_unheld.get(name, set())
        settled = sorted(failed.intersection(versions))
        if settled:
            # Acked 'failed' and never held (the fetch was refused): the event settles it.
            await self._acks.ack_all(
                name, settled, AckStatus.REMOVED, started=time.monotonic(), event_id=event_id
            )
            failed.difference_update(settled)
        return done

    async def held_report(self) -> HeldReport:
        """What is intact on disk (file hashes match what was written) and which keys drifted."""
        records = await self._state.keys()
        installed: list[InstalledVersion] = []
        drifted: set[str] = set()
        for record in records.values():
            if not self._installer.files_match(record.files):  # small files: no thread hop
                drifted.add(record.name)
                continue
            installed.extend(
                InstalledVersion(key=record.name, version=v.version, digest=v.digest)
                for v in record.versions.values()
            )
        if drifted:
            log.warning("files drifted on disk for keys=%s host=%s", sorted(drifted), self._host)
        return HeldReport(tuple(installed), frozenset(drifted))

    def prefetch_requests(
        self, triggers: Iterable[Trigger], held: Mapping[str, KeyRecord]
    ) -> tuple[FetchRequest, ...]:
        """The versions events named that this host neither holds nor has in memory.

        A sync asks for them to come back with its reply (at most ``MAX_PREFETCH``); the plan
        still decides what is installed, and every one is checked like a fetch reply.
        """
        out: list[FetchRequest] = []
        for trigger in triggers:
            record = held.get(trigger.key)
            for version in trigger.versions:
                digest = trigger.digests.get(version)
                have = record.versions.get(version) if record is not None else None
                if have is not None and (digest is None or have.digest == digest):
                    continue
                if self.materials.has(trigger.key, version, digest):
                    continue
                if (trigger.key, version) in self.tombstones:
                    continue
                out.append(FetchRequest(key=trigger.key, version=version))
        return tuple(out[:MAX_PREFETCH])

    async def answer_triggers(
        self, triggers: Iterable[Trigger], acked: dict[str, set[int]]
    ) -> None:
        """Ack rotation events whose version this host already held, so every event is answered."""
        for trigger in triggers:
            if not trigger.versions:
                continue
            record = await self._state.key(trigger.key)
            for version in trigger.versions:
                if version in acked.get(trigger.key, set()) or record is None:
                    continue
                held = record.versions.get(version)
                if held is not None and trigger.digests.get(version, held.digest) == held.digest:
                    await self._acks.ack(
                        trigger.key,
                        version,
                        AckStatus.INSTALLED,
                        started=time.monotonic(),
                        digest=held.digest,
                        event_id=trigger.event_id,
                    )

    def holding_off(self, plan: KeyPlan, retry_after_s: float) -> bool:
        """True when this exact change failed to install less than ``retry_after_s`` ago.

        A version whose install failed (its reload or health check refused it) was acked
        ``failed`` and the previous one put back; trying it again on every later sync would
        flip the service to the bad key and back each time. It is retried
        after ``retry_after_s`` (the reconcile interval), or at once when the controller's
        desired state for the key changes (a new version, spec or state).
        """
        failed = self._failed_plans.get(plan.key)
        if failed is None or plan.desired is None:
            return False
        signature, at = failed
        return signature == _signature(plan.desired) and self._clock() - at < retry_after_s

    def forget_failures(
        self, *, except_keys: Set[str], asked_again: Set[str] = frozenset()
    ) -> None:
        """Forget the failed changes of every key but ``except_keys`` (the keys a sync still
        asks to change): the controller's desired state for the others is what the host
        holds, so the failed change is no longer wanted, and a later request for it is a new
        attempt. The keys in ``asked_again`` are forgotten too: a signed ``key.rollout``
        released the version anew (a stage resumed after a fix). The desired state alone
        cannot say so: a stage aborted and resumed between two syncs asks for exactly what
        failed before, and would wait out the hold-off while its gate waits for this host."""
        for name in [n for n in self._failed_plans if n not in except_keys or n in asked_again]:
            del self._failed_plans[name]

    def _note_unheld(self, name: str, versions: Iterable[int], record: KeyRecord | None) -> None:
        held = set(record.versions) if record is not None else set()
        unheld = {v for v in versions if v not in held}
        if unheld:
            self._failed_unheld.setdefault(name, set()).update(unheld)

    async def settle_failures(self, desired: Mapping[str, Set[int]]) -> set[tuple[str, int]]:
        """Ack ``removed`` for each version acked ``failed`` and never installed here that
        ``desired`` (a sync's versions by key) no longer lists; return them.

        After an outage a late event can ask for a version revoked meanwhile: the fetch is
        refused and acked ``failed``, and nothing else would ever replace that row in the
        fleet view. The host holds none of it, so ``removed`` is its true last word."""
        settled: set[tuple[str, int]] = set()
        for name, versions in list(self._failed_unheld.items()):
            gone = sorted(v for v in versions if v not in desired.get(name, ()))
            if not gone:
                continue
            await self._acks.ack_all(name, gone, AckStatus.REMOVED, started=time.monotonic())
            versions.difference_update(gone)
            if not versions:
                del self._failed_unheld[name]
            settled.update((name, v) for v in gone)
        return settled

    def _stale_plan(self, key: str) -> bool:
        """True (and noted) unless this key already had a refusal excused as a stale plan in
        the last :data:`STALE_REFUSAL_EVERY_S`."""
        now = self._clock()
        last = self._stale_refused_at.get(key)
        if last is not None and 0 <= now - last < STALE_REFUSAL_EVERY_S:
            return False
        self._stale_refused_at[key] = now
        return True

    def _note_failure(self, desired: DesiredKey) -> None:
        now = self._clock()
        self.install_failures += 1
        self.failed_at[desired.key] = now
        self._failed_plans[desired.key] = (_signature(desired), now)

    async def execute(
        self,
        plan: KeyPlan,
        record: KeyRecord | None,
        trigger: Trigger | None,
        fetch: Fetcher,
    ) -> set[int]:
        """Carry out one key's plan; returns the versions it acked."""
        started = time.monotonic()
        event_id = trigger.event_id if trigger else None
        if plan.action is Action.REMOVE:
            assert record is not None
            return await critical(self._remove_key(record, started, event_id, plan.reason))
        desired = plan.desired
        assert desired is not None
        needed = needed_versions(desired.install, desired.versions)
        refused = self._refused(plan.key, desired.install, needed)
        if refused is not None:
            # This host's own policy says no: nothing is fetched or written, the operator sees
            # why in the fleet view, and it is tried again only when the key changes.
            log.error(
                "key=%s host=%s refused by this host's policy: %s", plan.key, self._host, refused
            )
            self._note_failure(desired)
            self._note_unheld(plan.key, plan.changed or tuple(v.version for v in needed), record)
            return await self._acks.ack_all(
                plan.key,
                plan.changed or tuple(v.version for v in needed),
                AckStatus.FAILED,
                started=started,
                event_id=event_id,
                error=refused,
            )
        want = {
            *plan.fetch,
            *(v.version for v in needed if not self.materials.has(plan.key, v.version, v.digest)),
        }
        by_version = {v.version: v for v in desired.versions}
        fetching = 0
        try:
            for fetching in sorted(want):
                named = trigger.digests.get(fetching) if trigger is not None else None
                await self.materials.fetch(fetch, plan.key, by_version[fetching], named)
        except (TransportError, StoreError):
            raise
        except CKMSError as exc:
            if isinstance(exc, NotDistributableError) and self._stale_plan(plan.key):
                # The version's state changed after the sync this plan came from (rotated past,
                # deactivated): the plan is stale, not the install failed. Sync again (for the
                # same event) instead of reporting a failure.
                log.info(
                    "key=%s host=%s: v%d is no longer distributable (%s); syncing again",
                    plan.key,
                    self._host,
                    fetching,
                    exc,
                )
                self._request_reconcile(trigger)
                return set()
            log.error("key=%s host=%s not installed: %s", plan.key, self._host, exc)
            # Nothing was installed, so retrying on the next sync disturbs nothing (and the
            # controller may have fixed the material meanwhile): no hold-off for this one.
            self.failed_at[plan.key] = self._clock()
            self.install_failures += 1
            versions = plan.changed or tuple(v.version for v in needed)
            self._note_unheld(plan.key, versions, record)
            return await self._acks.ack_all(
                plan.key,
                versions,
                AckStatus.FAILED,
                started=started,
                event_id=event_id,
                error=str(exc),
            )
        return await critical(self._apply_plan(plan, record, started, event_id))

    async def _apply_plan(
        self, plan: KeyPlan, planned_from: KeyRecord | None, started: float, event_id: str | None
    ) -> set[int]:
        desired = plan.desired
        assert desired is not None
        name = plan.key
        async with self.lock(name):
            record = await self._state.key(name)
            if record != planned_from:
                # A revocation (or staleness) changed this key while fetching: plan again.
                log.info("key=%s changed while fetching; reconciling it again", name)
                self._request_reconcile()
                return set()
            versions = tuple(
                v for v in desired.versions if (name, v.version) not in self.tombstones
            )
            for v in desired.versions:
                if (name, v.version) in self.tombstones:
                    # Fetched before its revocation was noted: its material goes now too.
                    self.materials.drop(name, v.version)
            if len(versions) < len(desired.versions):
                # Planned from a reply older than a revocation applied meanwhile: install what
                # stays now, and sync again for the controller's view after the revocation.
                self._request_reconcile()
            if not versions:
                return set()
            wanted = {v.version for v in versions}
            changed = [v for v in plan.changed if v in wanted]
            dropped = [v for v in plan.dropped if v not in wanted]
            files = dict(record.files) if record is not None else {}
            hooks: list[HookResult] = []
            if plan.action is Action.INSTALL:
                outcome = await self._install(
                    name, desired.key_type, desired.install, versions, record
                )
                hooks = outcome.hooks
                if outcome.status is AckStatus.FAILED:
                    self._note_failure(desired)
                    self._note_unheld(
                        name, changed or [v.version for v in versions if v.primary], record
                    )
                    return await self._acks.ack_all(
                        name,
                        changed or [v.version for v in versions if v.primary],
                        AckStatus.FAILED,
                        started=started,
                        hooks=hooks,
                        event_id=event_id,
                        error=outcome.error,
                    )
                files = self._installer.hash_files(outcome.paths)
                if not changed:
                    changed = [v.version for v in versions if v.primary][:1]
            new_record = KeyRecord(
                name=name,
                key_type=desired.key_type,
                spec=desired.install,
                versions={
                    v.version: VersionRecord(v.version, str(v.state), v.primary, v.digest)
                    for v in versions
                },
                files=files,
                max_staleness_s=desired.max_staleness_s,
                updated_at=self._clock(),
            )
            await self._state.put_key(new_record)
            self.failed_at.pop(name, None)
            self._failed_plans.pop(name, None)
            self._failed_unheld.get(name, set()).difference_update(new_record.versions)
            for version in dropped:
                self.materials.drop(name, version)
            await self._acks.ack_all(
                name,
                changed,
                AckStatus.INSTALLED,
                started=started,
                digests={v.version: v.digest for v in versions},
                hooks=hooks,
                event_id=event_id,
            )
            await self._acks.ack_all(
                name, dropped, AckStatus.REMOVED, started=started, hooks=hooks, event_id=event_id
            )
            if changed or dropped:
                log.info(
                    "key=%s host=%s installed=%s removed=%s",
                    name,
                    self._host,
                    changed,
                    dropped,
                )
            return {*changed, *dropped}

    async def _install(
        self,
        name: str,
        key_type: str,
        spec: InstallSpec,
        versions: Sequence[DesiredVersion],
        record: KeyRecord | None,
    ) -> ApplyOutcome:
        """Write the key's files from cached (verified) material; the caller holds the lock."""
        needed = needed_versions(spec, versions)
        held = []
        for v in needed:
            material = self.materials.get(name, v.version, v.digest)
            if material is None:
                return ApplyOutcome(AckStatus.FAILED, [], error=f"material of v{v.version} missing")
            held.append(HeldVersion(v.version, str(v.state), v.primary, v.digest, material))
        self._sweep_targets(spec, name, [v.version for v in versions])
        previous = record.files if record is not None else {}
        try:
            return await self._installer.apply(name, key_type, spec, held, previous=previous)
        except ValueError as exc:  # an unknown key type or format reaches render()
            return ApplyOutcome(AckStatus.FAILED, [], error=f"cannot install {name}: {exc}")

    def _refused(
        self, name: str, spec: InstallSpec, needed: Sequence[DesiredVersion]
    ) -> str | None:
        """Why this host's policy refuses the key's install spec (None: it allows it)."""
        paths = [
            self._installer.host_path(spec.render_path(name, v.version, self._host)) for v in needed
        ]
        try:
            self._installer.check(spec, paths)
        except CKMSError as exc:
            return str(exc)
        return None

    async def _remove_key(
        self, record: KeyRecord, started: float, event_id: str | None, reason: str
    ) -> set[int]:
        async with self.lock(record.name):
            current = await self._state.key(record.name)
            if current is None:
                return set()
            return await self._remover.remove_all(current, started, event_id, reason)

    async def remove_stale_keys(
        self, *, last_contact: float | None, default_max_staleness_s: int | None
    ) -> list[str]:
        """Remove keys whose max staleness passed without controller contact; return them."""
        now = self._clock()
        removed = []
        for record in (await self._state.keys()).values():
            if not is_stale(
                record, last_contact=last_contact, now=now, default=default_max_staleness_s
            ):
                continue
            age = now - (last_contact or now)
            log.warning(
                "key=%s host=%s is stale: no controller contact for %.0f s (limit %s s); "
                "removing its files",
                record.name,
                self._host,
                age,
                staleness_limit(record, default_max_staleness_s),
            )
            await critical(self.remove_stale(record.name, age))
            removed.append(record.name)
        return removed

    async def drop_everything(self, event_id: str) -> None:
        """The host was revoked: remove every key (acked ``removed``) and forget all material."""
        started = time.monotonic()

        async def drop_all() -> None:
            for name in list(await self._state.keys()):
                async with self.lock(name):
                    record = await self._state.key(name)
                    if record is not None:
                        await self._remover.remove_all(record, started, event_id, "host revoked")
            self.materials.clear()
            await self._state.set_revoked(True)

        await critical(drop_all())

    async def remove_stale(self, name: str, age: float) -> None:
        """Remove one stale key (acked ``removed`` with the reason)."""
        started = time.monotonic()
        async with self.lock(name):
            record = await self._state.key(name)
            if record is not None:
                reason = f"stale: no controller contact for {age:.0f} s"
                await self._remover.remove_all(record, started, None, reason, note=reason)

    def sweep_held(self, records: dict[str, KeyRecord]) -> None:
        """At start (before any change runs): remove every temp file beside held keys."""
        for record in records.values():
            for path in record.paths:
                self._sweep(path, whole_directory=True)

    def _sweep_targets(self, spec: InstallSpec, name: str, versions: Iterable[int]) -> None:
        for version in versions:
            self._sweep(self._installer.host_path(spec.render_path(name, version, self._host)))

    def _sweep(self, path: Path, *, whole_directory: bool = False) -> None:
        """Remove temp files a crash left for ``path`` (once per run; the key's lock is held).

        While the agent runs, only temp files of this key's file names are swept: another
        key's change may be writing beside it.
        """
        if path in self._swept or path.parent in self._swept:
            return
        self._swept.add(path.parent if whole_directory else path)
        try:
            removed = self._installer.sweep(path.parent, None if whole_directory else [path.name])
        except CKMSError as exc:
            log.warning("temp files beside %s not swept: %s", path, exc)
            return
        if removed:
            log.warning("removed %d leftover temp file(s) in %s", len(removed), path.parent)


def _signature(desired: DesiredKey) -> tuple[object, ...]:
    """Everything about a desired key that a retry would install."""
    versions = sorted(desired.versions, key=lambda v: v.version)
    return (
        desired.key_type,
        desired.install,
        tuple((v.version, v.digest, str(v.state), v.primary) for v in versions),
    )


class ReconcileRequest(Protocol):
    """Asks the daemon for a sync soon, for the event that caused it when there is one."""

    def __call__(self, trigger: Trigger | None = None) -> None: ...
