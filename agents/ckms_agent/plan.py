"""The reconcile plan: desired state (a ``SyncReply``) against what the host holds → actions.

Pure functions, no I/O, so every rule is unit-tested on its own:

- a key listed by the controller and not held is **installed** (every version fetched);
- a held key whose files would change (new or different versions, primary or keyring states,
  install spec, key type) or whose files drifted on disk is **installed** again;
- a held key whose files stay the same but whose record changes (a new non-primary version of
  a single-file key, a state change that no file shows, max staleness) is **updated**: new
  versions are still fetched and their digests checked before the host says it holds them;
- a held key that is no longer listed, or whose every version is listed under ``remove``, is
  **removed**; versions listed under ``remove`` or revoked by a signed event this run
  (``tombstones``) are never (re)installed, even if a sync reply taken before the revocation
  still lists them; a key whose listed primary was revoked that way is left as it is until the
  controller names a new primary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from ckms.crypto import InstallFormat
from ckms.protocol import DesiredKey, DesiredVersion, InstallSpec, SyncReply
from ckms_agent.state import KeyRecord


class Action(StrEnum):
    """What reconciling one key does."""

    INSTALL = "install"
    UPDATE = "update"
    REMOVE = "remove"


class VersionLike(Protocol):
    """A desired or held version: both carry these fields."""

    @property
    def version(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def primary(self) -> bool: ...
    @property
    def digest(self) -> str: ...


V = TypeVar("V", bound=VersionLike)


@dataclass(frozen=True)
class KeyPlan:
    """The change for one key.

    ``desired`` is the controller's entry with removed and revoked versions filtered out (None
    for removals); ``fetch`` are versions to fetch; ``changed`` versions are acked ``installed``
    when the change succeeds; ``dropped`` are held versions that go (acked ``removed``).
    """

    key: str
    action: Action
    desired: DesiredKey | None
    fetch: tuple[int, ...] = ()
    changed: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    reason: str = ""


def per_version_files(spec: InstallSpec) -> bool:
    """True when the install path makes one file per version."""
    return "{version}" in spec.path


def files_signature(spec: InstallSpec, versions: Iterable[VersionLike]) -> tuple[object, ...]:
    """Everything the bytes of a key's files depend on, besides the material behind digests."""
    ordered = sorted(versions, key=lambda v: v.version)
    if per_version_files(spec):
        body: object = tuple((v.version, v.digest) for v in ordered)
    elif spec.format is InstallFormat.KEYRING_JSON:
        body = tuple((v.version, v.digest, str(v.state), v.primary) for v in ordered)
    else:
        primary = next((v for v in ordered if v.primary), None)
        body = None if primary is None else (primary.version, primary.digest)
    return (spec, body)


def needed_versions(spec: InstallSpec, versions: Iterable[V]) -> list[V]:
    """The versions whose material the files need (single-file formats hold only the primary)."""
    ordered = sorted(versions, key=lambda v: v.version)
    if per_version_files(spec) or spec.format is InstallFormat.KEYRING_JSON:
        return ordered
    primary = [v for v in ordered if v.primary]
    return primary or ordered


def plan_changes(
    desired: SyncReply,
    held: Mapping[str, KeyRecord],
    *,
    drifted: Set[str] = frozenset(),
    tombstones: Set[tuple[str, int]] = frozenset(),
) -> list[KeyPlan]:
    """Compare the desired state with what the host holds; return one plan per key to change."""
    removals: dict[str, set[int]] = {}
    for item in desired.remove:
        removals.setdefault(item.key, set()).update(item.versions)
    plans: list[KeyPlan] = []
    listed: set[str] = set()
    for entry in desired.keys:
        listed.add(entry.key)
        versions = tuple(
            v
            for v in entry.versions
            if v.version not in removals.get(entry.key, ())
            and (entry.key, v.version) not in tombstones
        )
        record = held.get(entry.key)
        if any(v.primary and (entry.key, v.version) in tombstones for v in entry.versions):
            # The reply predates a revocation this host applied from an event: its primary is
            # gone. Keep what the host has until the controller names the new primary.
            continue
        if not versions:
            if record is not None:
                plans.append(_removal(record, "no version left to hold"))
            continue
        plan = _plan_key(entry.model_copy(update={"versions": versions}), record, drifted)
        if plan is not None:
            plans.append(plan)
    for name, record in held.items():
        if name not in listed:
            plans.append(_removal(record, "no longer desired for this host"))
    return sorted(plans, key=lambda p: p.key)


def _removal(record: KeyRecord, reason: str) -> KeyPlan:
    return KeyPlan(
        key=record.name,
        action=Action.REMOVE,
        desired=None,
        dropped=tuple(sorted(record.versions)),
        reason=reason,
    )


def _plan_key(entry: DesiredKey, record: KeyRecord | None, drifted: Set[str]) -> KeyPlan | None:
    versions: tuple[DesiredVersion, ...] = entry.versions
    if record is None:
        every = tuple(sorted(v.version for v in versions))
        return KeyPlan(entry.key, Action.INSTALL, entry, every, every, (), "new key")
    fetch = tuple(
        sorted(
            v.version
            for v in versions
            if v.version not in record.versions or record.versions[v.version].digest != v.digest
        )
    )
    restated = {
        v.version
        for v in versions
        if v.version in record.versions
        and (record.versions[v.version].state, record.versions[v.version].primary)
        != (str(v.state), v.primary)
    }
    changed = tuple(sorted(set(fetch) | restated))
    wanted = {v.version for v in versions}
    dropped = tuple(sorted(v for v in record.versions if v not in wanted))
    reasons = []
    if entry.key in drifted:
        reasons.append("files drifted on disk")
    if record.key_type != entry.key_type:
        reasons.append("key type changed")
    if record.spec != entry.install:
        reasons.append("install spec changed")
    if files_signature(record.spec, record.versions.values()) != files_signature(
        entry.install, versions
    ):
        reasons.append("versions changed")
    if reasons:
        return KeyPlan(
            entry.key, Action.INSTALL, entry, fetch, changed, dropped, "; ".join(reasons)
        )
    if fetch or changed or dropped or record.max_staleness_s != entry.max_staleness_s:
        return KeyPlan(entry.key, Action.UPDATE, entry, fetch, changed, dropped, "record changed")
    return None


def staleness_limit(record: KeyRecord, default: int | None) -> int | None:
    """Seconds without controller contact after which the key must leave the host (None: never)."""
    return record.max_staleness_s if record.max_staleness_s is not None else default


def is_stale(
    record: KeyRecord, *, last_contact: float | None, now: float, default: int | None
) -> bool:
    """True when the host has not heard from the controller for longer than the key allows."""
    limit = staleness_limit(record, default)
    return limit is not None and last_contact is not None and now - last_contact > limit
