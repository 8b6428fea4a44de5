"""Key files that cannot be redirected: every operation relative to a directory descriptor.

The agent runs as root and writes into directories a service may be given access to, so no
path is trusted by name. A key's directory is opened one component at a time from its allowed
root with ``O_NOFOLLOW|O_DIRECTORY`` (a symlink anywhere is refused), each directory must be
owned by root and writable by nobody else (whoever can write a directory can swap a file for a
link between two system calls), and every create, rename, unlink, chown and chmod is done
relative to the directory's descriptor. A file is read (backup, hash), zeroed or swept only if
``lstat`` and ``fstat`` of the opened file agree it is a regular file with one link, opened
without blocking: a FIFO, socket, device, symlink or hard link is never read or overwritten.

Writes are crash-safe: a temp file in the same directory (``O_EXCL|O_NOFOLLOW``, mode 0600),
filled, given its owner, group and mode, fsync'd, renamed over the target, and the directory is
fsync'd. A crash leaves the old file or the new one, plus at most a temp file that a sweep
removes on the next start. Removal overwrites the bytes with zeros before unlinking (best
effort on copy-on-write filesystems and SSDs).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import logging
import os
import pwd
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from ckms.errors import CKMSError, ConfigError

log = logging.getLogger(__name__)

TEMP_MARK = ".ckms-tmp-"
_FAULT_ENV = "CKMS_AGENT_FAULT"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class InstallError(CKMSError):
    """Raised when a key file cannot be written or removed; the previous file is intact."""


class UnsafePathError(InstallError):
    """Raised when a path could be redirected: a link, a non-regular file, a foreign directory."""


def resolve_ids(owner: str | None, group: str | None) -> tuple[int, int]:
    """The uid and gid of an install spec's owner and group (-1: leave as is)."""
    try:
        uid = _uid(owner) if owner else -1
        gid = _gid(group) if group else -1
    except KeyError as exc:
        raise ConfigError(f"unknown user or group {exc.args[0]!r} in install spec") from None
    return uid, gid


def _uid(name: str) -> int:
    return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


def _check_directory(fd: int, shown: str) -> None:
    """Refuse a directory that someone other than root (or this agent's user) could write."""
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafePathError(
            f"{shown} is owned by uid {st.st_uid}: refusing a directory another user controls"
        )
    # Group write is refused even for group root: a POSIX ACL entry (u:svc:rwx) shows as g+w.
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"{shown} is writable by others (mode {st.st_mode & 0o7777:#o}, gid {st.st_gid}): "
            "refusing a directory another user could redirect"
        )


@contextlib.contextmanager
def open_directory(
    base: Path, parts: Sequence[str] = (), *, create_mode: int | None = None, gid: int = -1
) -> Iterator[int]:
    """Open ``base``/``parts`` without following any link and yield its descriptor.

    ``base`` is a directory the host's admin chose (an allowed root, the state directory); it
    is created (with ``create_mode``, its parents 0755) when missing and ``create_mode`` is
    given. Each component below it is
    opened relative to its parent with ``O_NOFOLLOW|O_DIRECTORY``; missing ones are created
    with ``create_mode`` (and group ``gid``) when given. Every directory on the way, ``base``
    included, must pass the ownership check.
    """
    if create_mode is not None and not os.path.lexists(base):
        try:
            os.makedirs(base.parent, 0o755, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o700)
                os.chmod(base, create_mode, follow_symlinks=False)
        except OSError as exc:
            raise InstallError(f"cannot create directory {base}: {exc.strerror}") from exc
    fd = _open_dir(str(base), None, str(base))
    try:
        _check_directory(fd, str(base))
        shown = base
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise UnsafePathError(f"{base}: {part!r} is not a directory name")
            shown = shown / part
            try:
                child = _open_dir(part, fd, str(shown))
            except FileNotFoundError:
                if create_mode is None:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", str(shown)) from None
                child = _make_dir(fd, part, str(shown), create_mode, gid)
            os.close(fd)
            fd = child
            _check_directory(fd, str(shown))
        yield fd
    finally:
        os.close(fd)


def _open_dir(name: str, dir_fd: int | None, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(
                f"{shown} is a symbolic link or not a directory: refusing to follow it"
            ) from None
        raise InstallError(f"cannot open directory {shown}: {exc.strerror}") from exc


def _make_dir(parent: int, name: str, shown: str, mode: int, gid: int) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise InstallError(f"cannot create key directory {shown}: {exc.strerror}") from exc
    fd = _open_dir(name, parent, shown)
    if created:
        try:
            if gid != -1:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            os.close(fd)
            raise InstallError(f"cannot set up key directory {shown}: {exc.strerror}") from exc
    return fd


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _unsafe_file(st: os.stat_result) -> str | None:
    """Why a file must not be read, zeroed or replaced (None: a plain file with one link)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links"
    return None


def _open_file(dir_fd: int, name: str, flags: int, shown: str) -> int | None:
    """Open a plain file without following links or blocking (None: it does not exist)."""
    before = _lstat(dir_fd, name)
    if before is None:
        return None
    why = _unsafe_file(before)
    if why is not None:
        raise UnsafePathError(f"{shown} {why}: refusing to use it")
    try:
        fd = os.open(name, flags | _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise UnsafePathError(f"{shown} changed into a link or special file") from None
        raise InstallError(f"cannot open {shown}: {exc.strerror}") from exc
    st = os.fstat(fd)
    why = _unsafe_file(st)
    if why is None and (st.st_ino, st.st_dev) != (before.st_ino, before.st_dev):
        why = "was replaced while being opened"
    if why is not None:
        os.close(fd)
        raise UnsafePathError(f"{shown} {why}: refusing to use it")
    return fd


def read_at(dir_fd: int, name: str, shown: str) -> bytes | None:
    """The bytes of a plain file in ``dir_fd`` (None when absent); links are refused."""
    fd = _open_file(dir_fd, name, os.O_RDONLY, shown)
    if fd is None:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise InstallError(f"cannot read {shown}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def write_at(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    shown: str,
    mode: int = 0o600,
    uid: int = -1,
    gid: int = -1,
) -> None:
    """Replace ``name`` in ``dir_fd`` atomically; an existing link or special file is refused."""
    write_many_at(dir_fd, {name: data}, shown={name: shown}, mode=mode, uid=uid, gid=gid)


def write_many_at(
    dir_fd: int,
    files: Mapping[str, bytes],
    *,
    shown: Mapping[str, str],
    mode: int = 0o600,
    uid: int = -1,
    gid: int = -1,
) -> None:
    """Replace several files of ``dir_fd``, each atomically, with every one written, owned and
    fsync'd under a temp name *before* the first is renamed into place.

    Files that belong together (a private key and its certificate) then change in one burst of
    renames with no I/O in between, instead of one file's write and fsync apart: a crash while
    writing leaves every old file in place (plus temp files a sweep removes), and the renames
    land in one filesystem journal commit as a rule. Not a single atomic step: a process killed
    between two renames leaves a mix, which the certificate keeper re-issues at its start.
    """
    staged: dict[str, str] = {}
    try:
        for name, data in files.items():
            staged[name] = _stage_at(
                dir_fd, name, data, shown=shown[name], mode=mode, uid=uid, gid=gid
            )
        for name, tmp in list(staged.items()):
            try:
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                raise InstallError(f"cannot install {shown[name]}: {exc.strerror}") from exc
            del staged[name]
            if os.environ.get(_FAULT_ENV) == "crash-after-rename":
                os._exit(137)  # a kill between two renames of one install
        try:
            os.fsync(dir_fd)
        except OSError as exc:
            what = ", ".join(shown.values())
            raise InstallError(f"cannot install {what}: {exc.strerror}") from exc
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                _zero_and_unlink(dir_fd, tmp, tmp)


_staged_count = 0


def _stage_at(
    dir_fd: int, name: str, data: bytes, *, shown: str, mode: int, uid: int, gid: int
) -> str:
    """Write ``data`` to a fresh temp file beside ``name`` (owner, group, mode set, fsync'd);
    return the temp name. An existing link or special file at ``name`` is refused."""
    global _staged_count
    current = _lstat(dir_fd, name)
    if current is not None:
        why = _unsafe_file(current)
        if why is not None:
            raise UnsafePathError(f"{shown} {why}: refusing to replace it")
    tmp = f".{name}{TEMP_MARK}{secrets.token_hex(6)}"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=dir_fd,
        )  # fmt: skip
    except OSError as exc:
        raise InstallError(f"cannot create a temp file beside {shown}: {exc.strerror}") from exc
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
        _staged_count += 1
        fault = os.environ.get(_FAULT_ENV, "")
        if fault == "crash-before-rename" or fault == f"crash-before-rename:{_staged_count}":
            # Fault injection for the crash-safety tests: die like a power cut would (at the
            # first file, or at the Nth staged in this process).
            os._exit(137)
    except OSError as exc:
        with contextlib.suppress(OSError):
            _zero_and_unlink(dir_fd, tmp, shown)
        raise InstallError(f"cannot install {shown}: {exc.strerror}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            _zero_and_unlink(dir_fd, tmp, shown)
        raise
    return tmp


def _zero_and_unlink(dir_fd: int, name: str, shown: str) -> bool:
    """Overwrite a plain file with zeros and unlink it (False when it was absent).

    Anything else under the name (a link, a FIFO, a file with other links) is unlinked without
    being opened: the name goes, whatever it pointed at is left untouched.
    """
    st = _lstat(dir_fd, name)
    if st is None:
        return False
    why = _unsafe_file(st)
    if why is None:
        try:
            fd = _open_file(dir_fd, name, os.O_WRONLY, shown)
        except UnsafePathError as exc:
            why, fd = str(exc), None
        if fd is not None:
            try:
                size = os.fstat(fd).st_size
                zeros = b"\0" * min(size, 1 << 16)
                done = 0
                while done < size:
                    done += os.write(fd, zeros[: size - done])
                os.fsync(fd)
            finally:
                os.close(fd)
    if why is not None:
        log.warning("%s %s: unlinking the name without overwriting anything", shown, why)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def remove_at(dir_fd: int, name: str, shown: str) -> bool:
    """Overwrite, unlink and fsync the directory; False if the file was absent."""
    try:
        removed = _zero_and_unlink(dir_fd, name, shown)
    except OSError as exc:
        raise InstallError(f"cannot remove {shown}: {exc.strerror}") from exc
    if removed:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    return removed


def sweep_at(dir_fd: int, shown: str, names: Iterable[str] | None = None) -> list[str]:
    """Remove temp files a crash left (only those of ``names`` when given); return them.

    Never blocks: a FIFO, socket, device or link under a temp name is skipped and logged.
    """
    prefixes = None if names is None else tuple(f".{n}{TEMP_MARK}" for n in names)
    removed: list[str] = []
    try:
        entries = os.listdir(dir_fd)
    except OSError as exc:
        log.warning("cannot list %s for leftover temp files: %s", shown, exc.strerror)
        return removed
    for entry in entries:
        if TEMP_MARK not in entry or not entry.startswith("."):
            continue
        if prefixes is not None and not entry.startswith(prefixes):
            continue
        st = _lstat(dir_fd, entry)
        why = None if st is None else _unsafe_file(st)
        if why is not None:
            log.warning("skipped %s/%s in the temp-file sweep: it %s", shown, entry, why)
            continue
        try:
            if _zero_and_unlink(dir_fd, entry, f"{shown}/{entry}"):
                removed.append(entry)
                log.warning("removed leftover temp file %s/%s", shown, entry)
        except OSError as exc:
            log.warning("cannot remove temp file %s/%s: %s", shown, entry, exc.strerror)
    return removed


def digest_of(data: bytes | None) -> str | None:
    """SHA-256 (hex) of a file's bytes, kept to notice drift later (a digest only)."""
    return None if data is None else hashlib.sha256(data).hexdigest()


# -- the agent's own files (config, identity): under directories the host's admin chose ---------


def ensure_directory(directory: Path, mode: int) -> None:
    """Create ``directory`` (and parents) with ``mode`` if missing; check it if it exists."""
    with open_directory(directory.parent, (directory.name,), create_mode=mode):
        pass


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
    uid, gid = resolve_ids(owner, group)
    with open_directory(path.parent.parent, (path.parent.name,), create_mode=dir_mode) as fd:
        write_at(fd, path.name, data, shown=str(path), mode=mode, uid=uid, gid=gid)


def secure_remove(path: Path) -> bool:
    """Overwrite ``path`` with zeros, unlink it and fsync the directory; False if it was absent."""
    try:
        with open_directory(path.parent) as fd:
            return remove_at(fd, path.name, str(path))
    except FileNotFoundError:
        return False


def sweep_temp_files(directory: Path) -> list[Path]:
    """Remove temp files a crash left in ``directory``; return what was removed."""
    try:
        with open_directory(directory) as fd:
            return [directory / name for name in sweep_at(fd, str(directory))]
    except FileNotFoundError:
        return []
