"""Offline revocation: take revoked versions off this host from the signed event alone.

The controller may be unreachable when a revocation arrives; the verified event is enough:

- the revoked versions are **noted** at once (:meth:`OfflineRevoker.note`), before anything
  waits for the key's lock, so an install already in flight (a first install of that very
  version included) finds them noted when it takes the lock and never puts them on disk, and
  no older sync reply brings them back;
- per-version files are removed; a keyring is rewritten from material at hand (memory, or the
  keyring file itself, digest-checked); a single file whose version stays is left alone;
- when none of that is possible, every file of the key goes (fail closed) and the next sync
  brings back the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from ckms.crypto import InstallFormat
from ckms.protocol import AckStatus
from ckms_agent.acks import AckWriter
from ckms_agent.installer import ApplyOutcome, HeldVersion, Installer
from ckms_agent.materials import Materials
from ckms_agent.plan import needed_versions, per_version_files
from ckms_agent.removal import KeyLocks, Remover
from ckms_agent.state import AgentState, KeyRecord, VersionRecord

__all__ = ["OfflineRevoker"]

log = logging.getLogger(__name__)


class OfflineRevoker:
    """Applies ``key.revoked`` / ``key.destroyed`` to this host's files without the controller."""

    def __init__(
        self,
        *,
        state: AgentState,
        installer: Installer,
        acks: AckWriter,
        materials: Materials,
        locks: KeyLocks,
        remover: Remover,
        host_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._installer = installer
        self._acks = acks
        self._materials = materials
        self._locks = locks
        self._remover = remover
        self._host = host_id
        self._clock = clock
        self.tombstones: set[tuple[str, int]] = set()
        """Versions revoked by events in this run; never (re)installed from an older reply."""

    def note(self, name: str, versions: Iterable[int]) -> None:
        """Remember revoked versions at once (never installed again, material dropped)."""
        for version in versions:
            self.tombstones.add((name, version))
            self._materials.drop(name, version)

    async def revoke(
        self, name: str, versions: Sequence[int], primary_version: int | None, event_id: str
    ) -> bool:
        """Remove revoked/destroyed versions now, from the signed event alone.

        Returns True when the host is left as the controller wants it without asking (nothing
        held was hit, or the files were rewritten without the revoked versions and the primary
        the event names is held); False when a sync must bring back what was removed.
        """
        started = time.monotonic()
        revoked = set(versions)
        self.note(name, revoked)
        async with self._locks(name):
            record = await self._state.key(name)
            if record is None:
                return True
            hit = sorted(revoked & set(record.versions))
            if not hit:
                held = record.versions.get(primary_version) if primary_version else None
                return primary_version is None or (held is not None and held.primary)
            spec = record.spec
            current = record.primary
            if (
                primary_version is not None
                and primary_version in record.versions
                and primary_version not in revoked
            ):
                new_primary: int | None = primary_version
            elif current is not None and current.version not in revoked:
                new_primary = current.version
            else:
                new_primary = None
            remaining = [
                replace(v, primary=v.version == new_primary)
                for v in record.versions.values()
                if v.version not in revoked
            ]
            single_file = (
                not per_version_files(spec) and spec.format is not InstallFormat.KEYRING_JSON
            )
            outcome: ApplyOutcome | None
            files = dict(record.files)
            if single_file and current is not None and current.version not in revoked:
                # The one file holds a version that stays: only the record changes.
                remaining = [replace(v, primary=v.version == current.version) for v in remaining]
                new_primary = current.version
                outcome = None
            else:
                outcome = await self._rewrite(record, remaining, new_primary, hit)
                if outcome is None or outcome.status is AckStatus.FAILED:
                    await self._remover.remove_all(record, started, event_id, "revoked")
                    return False
                files = self._installer.hash_files(outcome.paths)
            await self._state.put_key(
                replace(
                    record,
                    versions={v.version: v for v in remaining},
                    files=files,
                    updated_at=self._clock(),
                )
            )
            hooks = outcome.hooks if outcome is not None else []
            log.info("key=%s host=%s revoked versions %s removed locally", name, self._host, hit)
            await self._acks.ack_all(
                name, hit, AckStatus.REMOVED, started=started, hooks=hooks, event_id=event_id
            )
            return primary_version is None or primary_version == new_primary

    async def _rewrite(
        self,
        record: KeyRecord,
        remaining: Sequence[VersionRecord],
        new_primary: int | None,
        hit: Sequence[int],
    ) -> ApplyOutcome | None:
        """Rewrite a key's files without the revoked versions, with no help from the controller.

        Returns None when that is impossible (material of a remaining version not at hand, or no
        primary left); the caller then removes every file of the key (fail closed).
        """
        spec = record.spec
        if not remaining:
            return None
        if per_version_files(spec):
            paths = [
                self._installer.host_path(spec.render_path(record.name, v, self._host)) for v in hit
            ]
            outcome = await self._installer.remove(spec, paths)
            if outcome.status is AckStatus.FAILED:
                return outcome
            kept = [p for p in record.paths if p not in paths]
            return ApplyOutcome(AckStatus.INSTALLED, kept, outcome.hooks)
        if new_primary is None:
            return None
        needed = needed_versions(spec, remaining)
        materials = self._materials.local(record, needed, self._installer.read)
        if materials is None:
            return None
        held = [
            HeldVersion(v.version, v.state, v.primary, v.digest, materials[v.version])
            for v in needed
        ]
        try:
            return await self._installer.apply(
                record.name, record.key_type, spec, held, previous=record.files
            )
        except ValueError:
            return None
