"""Turn a key's usable versions into files on this host, run its hooks, roll back on failure.

Which files a key produces follows its install spec:

- a path with ``{version}``: one file per usable version (``keyring-json`` is refused there);
- ``keyring-json``: one file with every usable version, the primary marked;
- any other format: one file with the primary version.

``apply`` writes every file atomically, removes files the key no longer produces, then runs the
reload command and the health check. If either fails, the previous files are put back, reload
runs once more, and the outcome is ``failed`` with the hooks' output.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckms.crypto import InstallFormat, KeyringEntry, KeyType, encode_for_install, encode_keyring
from ckms.errors import CKMSError
from ckms.protocol import AckStatus, HookResult, InstallSpec
from ckms_agent.files import InstallError, read_if_exists, secure_remove, write_atomic
from ckms_agent.hooks import hook_ok, run_hook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldVersion:
    """One version this host should hold, with its material (never shown in reprs)."""

    version: int
    state: str
    primary: bool
    digest: str
    material: bytes = field(repr=False)


@dataclass
class ApplyOutcome:
    """What applying one key did: the status to ack, files now present, hook results."""

    status: AckStatus
    paths: list[Path]
    hooks: list[HookResult] = field(default_factory=list)
    error: str | None = None


class Installer:
    """Writes keys under an optional root directory (a stand-in for ``/`` in tests and demos)."""

    def __init__(self, *, host_id: str, root: Path | None = None) -> None:
        self.host_id = host_id
        self.root = root

    def host_path(self, path: str) -> Path:
        """Map an install path onto this host (prefixing the root directory when set)."""
        if self.root is None:
            return Path(path)
        return self.root / path.lstrip("/")

    def render(
        self, key_name: str, key_type: str, spec: InstallSpec, versions: Sequence[HeldVersion]
    ) -> dict[Path, bytes]:
        """The files (path → bytes) this key should produce on this host."""
        kt = KeyType(key_type)
        if not versions:
            return {}
        if "{version}" in spec.path:
            return {
                self.host_path(spec.render_path(key_name, v.version, self.host_id)): (
                    encode_for_install(
                        kt, v.material, spec.format, key_name=key_name, version=v.version
                    )
                )
                for v in versions
            }
        primary = next((v for v in versions if v.primary), None)
        if primary is None:
            raise InstallError(f"{key_name}: no primary version among the usable ones")
        path = self.host_path(spec.render_path(key_name, primary.version, self.host_id))
        if spec.format is InstallFormat.KEYRING_JSON:
            entries = [KeyringEntry(v.version, v.material, v.primary, v.state) for v in versions]
            return {path: encode_keyring(kt, entries, key_name=key_name)}
        return {
            path: encode_for_install(
                kt, primary.material, spec.format, key_name=key_name, version=primary.version
            )
        }

    async def apply(
        self,
        key_name: str,
        key_type: str,
        spec: InstallSpec,
        versions: Sequence[HeldVersion],
        previous_paths: Iterable[Path] = (),
    ) -> ApplyOutcome:
        """Install ``versions`` of one key; on any failure put the previous files back."""
        try:
            files = self.render(key_name, key_type, spec, versions)
        except CKMSError as exc:
            return ApplyOutcome(AckStatus.FAILED, [], error=str(exc))
        stale = [p for p in previous_paths if p not in files]
        backup = {p: read_if_exists(p) for p in [*files, *stale]}
        try:
            for path, data in files.items():
                self._write(path, data, spec)
            for path in stale:
                secure_remove(path)
        except CKMSError as exc:
            self._restore(backup, spec)
            log.error("install of %s failed: %s", key_name, exc)
            return ApplyOutcome(AckStatus.FAILED, sorted(backup_paths(backup)), error=str(exc))
        hooks = await self._run_hooks(spec)
        if all(hook_ok(h) for h in hooks):
            status = AckStatus.INSTALLED if files else AckStatus.REMOVED
            return ApplyOutcome(status, sorted(files), hooks)
        failed = next(h for h in hooks if not hook_ok(h))
        log.error(
            "%s hook failed for %s (exit=%s timed_out=%s); restoring the previous files",
            failed.command,
            key_name,
            failed.exit_code,
            failed.timed_out,
        )
        self._restore(backup, spec)
        if spec.reload:
            hooks.append(
                await run_hook("reload", spec.reload.argv, timeout_s=spec.reload.timeout_s)
            )
        return ApplyOutcome(
            AckStatus.FAILED,
            sorted(backup_paths(backup)),
            hooks,
            error=f"{failed.command} hook failed; previous version restored",
        )

    async def remove(self, spec: InstallSpec | None, paths: Iterable[Path]) -> ApplyOutcome:
        """Remove a key's files from this host (overwrite, unlink) and run its reload command."""
        try:
            for path in paths:
                secure_remove(path)
        except CKMSError as exc:
            return ApplyOutcome(AckStatus.FAILED, [], error=str(exc))
        hooks: list[HookResult] = []
        if spec is not None and spec.reload:
            hooks.append(
                await run_hook("reload", spec.reload.argv, timeout_s=spec.reload.timeout_s)
            )
        return ApplyOutcome(AckStatus.REMOVED, [], hooks)

    async def _run_hooks(self, spec: InstallSpec) -> list[HookResult]:
        hooks: list[HookResult] = []
        if spec.reload:
            hooks.append(
                await run_hook("reload", spec.reload.argv, timeout_s=spec.reload.timeout_s)
            )
            if not hook_ok(hooks[-1]):
                return hooks
        if spec.health:
            hooks.append(
                await run_hook("health", spec.health.argv, timeout_s=spec.health.timeout_s)
            )
        return hooks

    def _write(self, path: Path, data: bytes, spec: InstallSpec) -> None:
        write_atomic(
            path, data, mode=spec.mode, owner=spec.owner, group=spec.group, dir_mode=spec.dir_mode
        )

    def _restore(self, backup: dict[Path, bytes | None], spec: InstallSpec) -> None:
        for path, data in backup.items():
            try:
                if data is None:
                    secure_remove(path)
                else:
                    self._write(path, data, spec)
            except CKMSError as exc:
                log.error("could not restore %s: %s", path, exc)


def backup_paths(backup: dict[Path, bytes | None]) -> list[Path]:
    """The paths that exist again after a restore."""
    return [p for p, data in backup.items() if data is not None]


def read_keyring(paths: Sequence[Path]) -> dict[int, bytes]:
    """The versions of a keyring file that :meth:`Installer.render` wrote (the reverse of
    :func:`~ckms.crypto.encode_keyring`); empty if every path is missing or malformed."""
    for path in paths:
        try:
            ring = json.loads(path.read_bytes())
            return {
                int(entry["version"]): base64.b64decode(entry["material"], validate=True)
                for entry in ring["versions"]
            }
        except (OSError, ValueError, KeyError, TypeError, binascii.Error):
            continue
    return {}
