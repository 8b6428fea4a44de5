"""Turn a key's usable versions into files on this host, run its hooks, roll back on failure.

Which files a key produces follows its install spec:

- a path with ``{version}``: one file per usable version (``keyring-json`` is refused there);
- ``keyring-json``: one file with every usable version, the primary marked;
- any other format: one file with the primary version.

Before anything is written, the host's policy (:mod:`ckms_agent.policy`) must allow the spec:
every path under an allowed root, owner and group allowed, every hook named defined here.
``apply`` then writes every file atomically (through directory descriptors from the allowed
root, :mod:`ckms_agent.files`; the files of one directory, like a ``tls-cert``'s key and
certificate, all staged before the first is renamed),
removes files the key no longer produces, and runs the reload
hook and the health check. If either fails, the previous files are put back (only bytes this
agent wrote, read back without following links), reload runs once more, and the outcome is
``failed`` with the hooks' names and exit statuses (their output stays in the local log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckms.crypto import (
    InstallFormat,
    KeyringEntry,
    KeyType,
    decode_keyring,
    encode_for_install,
    encode_keyring,
)
from ckms.errors import CKMSError
from ckms.protocol import AckStatus, HookResult, InstallSpec
from ckms_agent.files import (
    InstallError,
    digest_of,
    open_directory,
    read_at,
    remove_at,
    resolve_ids,
    sweep_at,
    write_at,
    write_many_at,
)
from ckms_agent.hooks import Hook, hook_ok, run_hook
from ckms_agent.policy import HostPolicy, PolicyRefusal

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
    """Writes keys where this host allows, under an optional root (``/`` in tests and demos)."""

    def __init__(
        self, *, host_id: str, root: Path | None = None, policy: HostPolicy | None = None
    ) -> None:
        self.host_id = host_id
        self.root = root
        self.policy = policy if policy is not None else HostPolicy()

    def host_path(self, path: str) -> Path:
        """Map an install path onto this host (prefixing the root directory when set)."""
        if self.root is None:
            return Path(path)
        return self.root / path.lstrip("/")

    def _spec_path(self, host_path: Path) -> str:
        if self.root is None:
            return str(host_path)
        return "/" + str(host_path.relative_to(self.root))

    def locate(self, path: Path) -> tuple[Path, tuple[str, ...], str]:
        """The allowed root (on this host) holding ``path``, the directories below it, the name.

        Raises PolicyRefusal when ``path`` is outside every allowed root.
        """
        try:
            spec_path = self._spec_path(path)
        except ValueError:
            raise PolicyRefusal(f"{path} is outside this agent's root {self.root}") from None
        allowed, rest = self.policy.allowed_root(spec_path)
        return self.host_path(str(allowed)), rest[:-1], rest[-1]

    def check(self, spec: InstallSpec, paths: Iterable[Path]) -> list[Hook]:
        """Refuse (PolicyRefusal) what this host does not allow; return the hooks to run."""
        hooks = self.policy.check_spec(spec)
        for path in paths:
            self.locate(path)
        return hooks

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

    # -- files, always through directory descriptors from the allowed root --------------------

    def read(self, path: Path) -> bytes | None:
        """The bytes of a key file (None when absent); links and special files are refused."""
        root, parts, name = self.locate(path)
        try:
            with open_directory(root, parts) as fd:
                return read_at(fd, name, str(path))
        except FileNotFoundError:
            return None

    def write(self, path: Path, data: bytes, spec: InstallSpec) -> None:
        """Write one key file atomically, creating its directories below the allowed root."""
        uid, gid = resolve_ids(spec.owner, spec.group)
        root, parts, name = self.locate(path)
        with open_directory(root, parts, create_mode=spec.dir_mode, gid=gid) as fd:
            write_at(fd, name, data, shown=str(path), mode=spec.mode, uid=uid, gid=gid)

    def write_all(self, files: Mapping[Path, bytes], spec: InstallSpec) -> None:
        """Write several key files, those of one directory together (:func:`write_many_at`:
        every one staged and fsync'd before the first is renamed), so a tls-cert's key and
        certificate change in one burst of renames instead of a write and fsync apart."""
        uid, gid = resolve_ids(spec.owner, spec.group)
        by_directory: dict[tuple[Path, tuple[str, ...]], dict[str, tuple[Path, bytes]]] = {}
        for path, data in files.items():
            root, parts, name = self.locate(path)
            by_directory.setdefault((root, parts), {})[name] = (path, data)
        for (root, parts), group in by_directory.items():
            with open_directory(root, parts, create_mode=spec.dir_mode, gid=gid) as fd:
                write_many_at(
                    fd,
                    {name: data for name, (_, data) in group.items()},
                    shown={name: str(path) for name, (path, _) in group.items()},
                    mode=spec.mode,
                    uid=uid,
                    gid=gid,
                )

    def unlink(self, path: Path) -> bool:
        """Overwrite and remove one key file; False when it was absent."""
        root, parts, name = self.locate(path)
        try:
            with open_directory(root, parts) as fd:
                return remove_at(fd, name, str(path))
        except FileNotFoundError:
            return False

    def sweep(self, directory: Path, names: Iterable[str] | None = None) -> list[str]:
        """Remove temp files a crash left in a key directory (only ``names``' when given)."""
        root, parts, last = self.locate(directory / "_")
        del last
        try:
            with open_directory(root, parts) as fd:
                return sweep_at(fd, str(directory), names)
        except FileNotFoundError:
            return []
        except CKMSError as exc:
            log.warning("temp files in %s not swept: %s", directory, exc)
            return []

    def hash_files(self, paths: Iterable[Path]) -> dict[Path, str]:
        """SHA-256 (hex) of each key file as it is now on disk."""
        out: dict[Path, str] = {}
        for path in paths:
            digest = digest_of(self.read(path))
            if digest is None:
                raise InstallError(f"cannot read back {path}: it is missing")
            out[path] = digest
        return out

    def files_match(self, files: Mapping[Path, str]) -> bool:
        """True when every file still exists with the hash recorded when it was written."""
        for path, expected in files.items():
            try:
                if digest_of(self.read(path)) != expected:
                    return False
            except (OSError, CKMSError):
                return False
        return True

    # -- install and remove --------------------------------------------------------------------

    async def apply(
        self,
        key_name: str,
        key_type: str,
        spec: InstallSpec,
        versions: Sequence[HeldVersion],
        previous: Mapping[Path, str] | Iterable[Path] = (),
    ) -> ApplyOutcome:
        """Install ``versions`` of one key; on any failure put the previous files back.

        ``previous`` maps the files the key had to the digests this agent wrote them with;
        only bytes matching those come back on a rollback (others are removed instead).
        """
        try:
            files = self.render(key_name, key_type, spec, versions)
        except CKMSError as exc:
            return ApplyOutcome(AckStatus.FAILED, [], error=str(exc))
        return await self.apply_files(
            key_name, spec, files, previous, secrets=[v.material for v in versions]
        )

    async def apply_files(
        self,
        key_name: str,
        spec: InstallSpec,
        files: Mapping[Path, bytes],
        previous: Mapping[Path, str] | Iterable[Path] = (),
        *,
        secrets: Sequence[bytes] = (),
    ) -> ApplyOutcome:
        """Write ``files`` of one key (each atomically, in order), remove what ``previous`` had
        that they do not, run the hooks; on any failure put the previous files back.

        ``secrets`` are scrubbed from hook output like the files' own bytes.
        """
        wrote = dict(previous) if isinstance(previous, Mapping) else None
        earlier = list(wrote) if wrote is not None else list(previous)
        stale = [p for p in earlier if p not in files]
        try:
            hooks = self.check(spec, files)
            backup = {p: self._backup(p, wrote) for p in [*files, *stale]}
        except CKMSError as exc:
            log.error("install of %s refused: %s", key_name, exc)
            return ApplyOutcome(AckStatus.FAILED, [], error=str(exc))
        try:
            self.write_all(files, spec)
            for path in stale:
                self.unlink(path)
        except CKMSError as exc:
            self._restore(backup, spec)
            log.error("install of %s failed: %s", key_name, exc)
            return ApplyOutcome(AckStatus.FAILED, sorted(backup_paths(backup)), error=str(exc))
        material = [*secrets] + [
            d for d in [*files.values(), *backup.values()] if d is not None
        ]
        results = await self._run_hooks(hooks, material)
        if all(hook_ok(h) for h in results):
            status = AckStatus.INSTALLED if files else AckStatus.REMOVED
            return ApplyOutcome(status, sorted(files), results)
        failed = next(h for h in results if not hook_ok(h))
        shown = f"{failed.command} hook {failed.name!r}" if failed.name else f"{failed.command}"
        log.error(
            "%s failed for %s (exit=%s timed_out=%s); restoring the previous files",
            shown,
            key_name,
            failed.exit_code,
            failed.timed_out,
        )
        self._restore(backup, spec)
        results.extend(
            [await run_hook(h, material=material) for h in hooks if h.kind == "reload"]
        )
        return ApplyOutcome(
            AckStatus.FAILED,
            sorted(backup_paths(backup)),
            results,
            error=f"{shown} failed; previous version restored",
        )

    def _backup(self, path: Path, wrote: Mapping[Path, str] | None) -> bytes | None:
        """What to put back at ``path`` on a rollback: only bytes this agent wrote there."""
        data = self.read(path)
        if data is not None and wrote is not None and digest_of(data) != wrote.get(path):
            log.warning("%s is not what this agent wrote there; a rollback removes it", path)
            return None
        return data

    async def remove(self, spec: InstallSpec | None, paths: Iterable[Path]) -> ApplyOutcome:
        """Remove a key's files from this host (overwrite, unlink) and run its reload hook.

        Removal never depends on the hooks: one the host does not allow is skipped (logged).
        """
        try:
            for path in paths:
                self.unlink(path)
        except CKMSError as exc:
            return ApplyOutcome(AckStatus.FAILED, [], error=str(exc))
        hooks: list[Hook] = []
        if spec is not None:
            try:
                hooks = [h for h in self.policy.hooks_for(spec) if h.kind == "reload"]
            except PolicyRefusal as exc:
                log.warning("key files removed; reload skipped: %s", exc)
        return ApplyOutcome(AckStatus.REMOVED, [], [await run_hook(h) for h in hooks])

    async def _run_hooks(
        self, hooks: Sequence[Hook], material: Sequence[bytes]
    ) -> list[HookResult]:
        results: list[HookResult] = []
        for hook in hooks:
            results.append(await run_hook(hook, material=material))
            if not hook_ok(results[-1]):
                break
        return results

    def _restore(self, backup: dict[Path, bytes | None], spec: InstallSpec) -> None:
        for path, data in backup.items():
            try:
                if data is None:
                    self.unlink(path)
                else:
                    self.write(path, data, spec)
            except CKMSError as exc:
                log.error("could not restore %s: %s", path, exc)


def backup_paths(backup: dict[Path, bytes | None]) -> list[Path]:
    """The paths that exist again after a restore."""
    return [p for p, data in backup.items() if data is not None]


def read_keyring(
    paths: Sequence[Path], read: Callable[[Path], bytes | None] | None = None
) -> dict[int, bytes]:
    """The versions of the first readable keyring file among ``paths``
    (:func:`~ckms.crypto.decode_keyring`); empty if every path is missing or malformed.

    ``read`` is how the file is read (the agent passes :meth:`Installer.read`, which follows no
    link); without it, the path is read as is (tests, tools).
    """
    for path in paths:
        try:
            data = read(path) if read is not None else path.read_bytes()
            if data is None:
                continue
            return decode_keyring(data)
        except (OSError, CKMSError):
            continue
    return {}
