"""Crash-safe key files: atomic replace, owner and mode before rename, overwrite before unlink.

A key file is written as a temp file in the same directory (``O_EXCL|O_NOFOLLOW``, mode 0600),
filled, given its owner, group and mode, fsync'd, renamed over the target, and the directory is
fsync'd. A crash at any point leaves either the old file or the new one, plus at most a temp
file that :func:`sweep_temp_files` removes on the next start. Removal overwrites the bytes with
zeros before unlinking (best effort on copy-on-write filesystems and SSDs).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from ckms.errors import CKMSError, ConfigError

log = logging.getLogger(__name__)

TEMP_MARK = ".ckms-tmp-"
_FAULT_ENV = "CKMS_AGENT_FAULT"


class InstallError(CKMSError):
    """Raised when a key file cannot be written or removed; the previous file is intact."""


def _resolve_ids(owner: str | None, group: str | None) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else -1
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError as exc:
        raise ConfigError(f"unknown user or group {exc.args[0]!r} in install spec") from None
    return uid, gid


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_directory(directory: Path, mode: int) -> None:
    """Create the key directory (and parents) with ``mode`` if it is missing."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        os.chmod(directory, mode)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise InstallError(f"cannot create key directory {directory}: {exc.strerror}") from exc


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    owner: str | None = None,
    group: str | None = None,
    dir_mode: int = 0o700,
) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new, never a part."""
    uid, gid = _resolve_ids(owner, group)
    ensure_directory(path.parent, dir_mode)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{secrets.token_hex(6)}"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise InstallError(f"cannot create a temp file in {path.parent}: {exc.strerror}") from exc
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.environ.get(_FAULT_ENV) == "crash-before-rename":
            # Fault injection for the crash-safety tests: die like a power cut would.
            os._exit(137)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            _overwrite_and_unlink(tmp)
        raise InstallError(f"cannot install {path}: {exc.strerror}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            _overwrite_and_unlink(tmp)
        raise


def _overwrite_and_unlink(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        zeros = b"\0" * min(size, 1 << 16)
        done = 0
        while done < size:
            done += os.write(fd, zeros[: size - done])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def secure_remove(path: Path) -> bool:
    """Overwrite ``path`` with zeros, unlink it and fsync the directory; False if it was absent."""
    try:
        _overwrite_and_unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise InstallError(f"cannot remove {path}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        _fsync_dir(path.parent)
    return True


def sweep_temp_files(directory: Path) -> list[Path]:
    """Remove temp files a crash left in ``directory``; return what was removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for candidate in directory.iterdir():
        if TEMP_MARK in candidate.name and candidate.name.startswith("."):
            with contextlib.suppress(OSError):
                _overwrite_and_unlink(candidate)
                removed.append(candidate)
                log.warning("removed leftover temp file %s", candidate)
    return removed


def read_if_exists(path: Path) -> bytes | None:
    """The current bytes of ``path`` (for rollback), or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from exc


def hash_files(paths: Iterable[Path]) -> dict[Path, str]:
    """SHA-256 (hex) of each file the agent wrote, kept to notice drift later (a digest only)."""
    try:
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    except OSError as exc:
        raise InstallError(f"cannot read back {exc.filename}: {exc.strerror}") from exc


def files_match(files: Mapping[Path, str]) -> bool:
    """True when every file still exists with the hash recorded when it was written."""
    for path, expected in files.items():
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
                return False
        except OSError:
            return False
    return True
