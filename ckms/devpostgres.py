"""A real, local PostgreSQL server for tests and manual use.

``LocalPostgres`` runs the machine's own PostgreSQL server binaries (Debian's ``postgresql``
package, which ``make tools`` installs) on a fresh cluster in a temporary directory::

    async with LocalPostgres() as pg:
        conn = await asyncpg.connect(pg.url, password=pg.password_file.read_text())
        await pg.stop_server(kill=True)      # a crash: every server process killed at once
        await pg.start_server()              # crash recovery from the WAL; commits survive

The server listens on a free TCP port of 127.0.0.1 and on a unix socket in its own directory.
Every connection, local or TCP, needs the password of the ``ckms`` role (scram-sha-256); the
password is drawn at random and only ever written to a 0600 file (``password_file``): never on a
command line, in the URL, a repr, or a log. ``url`` is ``postgresql://ckms@127.0.0.1:PORT/ckms``.

PostgreSQL refuses to run as root. When the caller is root (CI), initdb and the server run as
the dedicated system user ``ckms-postgres`` (created when missing), owner of the cluster's
directory. Not ``nobody``: other daemons and NFS-squashed files share that identity, so they
could read the cluster and it theirs. Not Debian's ``postgres``: it owns the machine's real
clusters under /var/lib/postgresql, which a test server has no business reaching.

The server's output goes to ``log_path`` inside the directory, which is kept when a start
fails; every error names it. From a shell::

    python -m ckms.devpostgres up      # prints the URL (and the password file on stderr)
    python -m ckms.devpostgres down
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from ckms._localproc import die_with_parent, free_port, pid_alive
from ckms.devkafka import kafka_cache_dir
from ckms.errors import CKMSError, ConfigError, DependencyMissingError, StoreError

__all__ = ["POSTGRES_ROOT", "SERVER_USER", "LocalPostgres", "find_postgres_bin"]

log = logging.getLogger(__name__)

#: Where Debian and Ubuntu install each major version's server binaries (<root>/<major>/bin).
POSTGRES_ROOT = Path("/usr/lib/postgresql")
#: The unprivileged user initdb and the server run as when the caller is root.
SERVER_USER = "ckms-postgres"
ROLE = "ckms"
DATABASE = "ckms"

_BINARIES = ("initdb", "postgres", "pg_isready")
_INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`, or `make tools` "
    "as root; elsewhere your system's package) or set CKMS_POSTGRES_BIN to the directory "
    "holding initdb and postgres"
)
_STOP_GRACE_S = 20.0  # a fast shutdown takes well under a second; past this the server is killed
_START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it

# Settings appended to the cluster's postgresql.conf. fsync off: a process crash (kill -9) keeps
# every commit, since the WAL is written to the kernel before a commit returns; only a machine
# crash would lose data, which no test makes. synchronous_commit stays on for that reason.
_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
fsync = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
log_line_prefix = '%m [%p] '
log_timezone = 'UTC'
timezone = 'UTC'
"""

# Every connection proves the password, the local socket included (no trust, no peer).
_HBA = """\
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
"""


def find_postgres_bin(root: Path = POSTGRES_ROOT, path: str | None = None) -> Path:
    """Return the directory of the newest PostgreSQL server binaries on this machine.

    Looks at ``$CKMS_POSTGRES_BIN``, then Debian's ``<root>/<major>/bin`` (newest major first:
    the server binaries are not on PATH there), then PATH (``path``, default ``$PATH``), as other
    systems put them. Raises :class:`DependencyMissingError` naming how to install them.
    """
    explicit = os.environ.get("CKMS_POSTGRES_BIN")
    if explicit:
        if not _has_binaries(Path(explicit)):  # a wrong setting is an error, not a fallback
            raise DependencyMissingError(
                f"CKMS_POSTGRES_BIN={explicit} does not hold initdb, postgres and pg_isready: "
                f"{_INSTALL_HINT}"
            )
        return Path(explicit)
    candidates: list[Path] = []
    if root.is_dir():
        majors = [d for d in root.iterdir() if re.fullmatch(r"\d+(\.\d+)?", d.name)]
        majors.sort(key=lambda d: tuple(int(p) for p in d.name.split(".")), reverse=True)
        candidates.extend(d / "bin" for d in majors)
    on_path = shutil.which("postgres", path=path if path is not None else os.environ.get("PATH"))
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if _has_binaries(directory):
            return directory
    looked = ", ".join(str(c) for c in candidates) or f"{root}/*/bin and PATH"
    raise DependencyMissingError(
        f"the PostgreSQL server binaries (initdb, postgres, pg_isready) were not found "
        f"(looked in {looked}): {_INSTALL_HINT}"
    )


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _BINARIES)


def _server_account() -> pwd.struct_passwd:
    """The account to run PostgreSQL as when we are root, created when missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_USER)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise DependencyMissingError(
            f"PostgreSQL refuses to run as root, and the unprivileged user {SERVER_USER} does not "
            f"exist and cannot be created (no `useradd`): create a system user {SERVER_USER}"
        )
    proc = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "ckms test PostgreSQL servers",
            SERVER_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another process may have created it at the same moment: that is fine
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise DependencyMissingError(
            f"could not create the user {SERVER_USER} to run PostgreSQL as "
            f"(useradd exit {proc.returncode}: {proc.stderr.strip()})"
        ) from None


def _check_reachable(directory: Path, uid: int) -> None:
    """Refuse a directory the server's user could not reach (a 0700 parent owned by root)."""
    for parent in directory.parents:
        st = parent.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise ConfigError(
                f"{parent} is not searchable by the user {SERVER_USER} PostgreSQL runs as; "
                f"put the data directory elsewhere (TMPDIR or data_dir)"
            )


def _child_env() -> dict[str, str]:
    """The environment for initdb and postgres: ours without libpq's PG* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class LocalPostgres:
    """One real PostgreSQL server on loopback with a ``ckms`` role and database, for tests.

    The ``ckms`` role is the cluster's bootstrap superuser (initdb sets its password from the
    file, so the password never passes through SQL): fault tests may terminate backends. A
    production deployment gives ckms an ordinary role that owns its database.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        keep_data: bool = False,
        bin_dir: Path | None = None,
        startup_timeout: float = 60.0,
        detach: bool = False,
    ) -> None:
        self.keep_data = keep_data or data_dir is not None
        self._data_dir_arg = Path(os.path.abspath(data_dir)) if data_dir is not None else None
        self._bin_dir_arg = bin_dir
        self.startup_timeout = startup_timeout
        self._detach = detach
        self.bin_dir: Path | None = None
        self.directory: Path | None = None
        self.port: int | None = None
        self._process: asyncio.subprocess.Process | subprocess.Popen[bytes] | None = None
        self._account: pwd.struct_passwd | None = None
        #: Seconds from launching the server to it accepting connections, for the last start.
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:
        return f"LocalPostgres(directory={self.directory}, port={self.port}, pid={self.pid})"

    # -- public surface ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://ckms@127.0.0.1:PORT/ckms``: no password (read it from the file)."""
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        """The URL of another database on this server, for the same role."""
        self._require_started()
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    @property
    def user(self) -> str:
        """The role clients log in as."""
        return ROLE

    @property
    def database(self) -> str:
        """The database made for ckms."""
        return DATABASE

    @property
    def password_file(self) -> Path:
        """The 0600 file holding the role's password (owned by the caller, not the server)."""
        return self._require_started() / "password"

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's unix socket (``host`` for a local-socket client)."""
        return self._require_started() / "socket"

    @property
    def data_path(self) -> Path:
        """The cluster's data directory (PGDATA)."""
        return self._require_started() / "data"

    @property
    def log_path(self) -> Path:
        """The server's log (its stderr and stdout, and initdb's)."""
        return self._require_started() / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or None while the server is stopped."""
        proc = self._process
        return proc.pid if proc is not None and self._running() else None

    @property
    def server_uid(self) -> int:
        """The uid the server runs as: ours, or the unprivileged user's when we are root."""
        return self._account.pw_uid if self._account is not None else os.geteuid()

    async def __aenter__(self) -> LocalPostgres:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Find the binaries, create the cluster, the role and the database, start the server."""
        if self.directory is not None:
            raise ConfigError("LocalPostgres is already started")
        if self._bin_dir_arg is None:
            self.bin_dir = find_postgres_bin()
        elif _has_binaries(self._bin_dir_arg):
            self.bin_dir = self._bin_dir_arg
        else:
            raise DependencyMissingError(
                f"the PostgreSQL server binaries (initdb, postgres, pg_isready) are not in "
                f"{self._bin_dir_arg}: {_INSTALL_HINT}"
            )
        if os.geteuid() == 0:
            self._account = await asyncio.to_thread(_server_account)
        if self._data_dir_arg is not None:
            self.directory = self._data_dir_arg
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            self.directory = Path(tempfile.mkdtemp(prefix="ckms-pg-"))
        try:
            if not (self.data_path / "PG_VERSION").exists():
                await self._init_cluster()
            await self.start_server()
        except BaseException:
            await self._terminate(kill=True)
            raise  # the directory and its log stay for the error's reader

    async def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory unless kept; safe twice."""
        await self._terminate(kill=False)
        if not self.keep_data and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def stop_server(self, *, kill: bool = False) -> None:
        """Stop the server, keeping its data.

        ``kill=True`` is a crash: SIGKILL to every process of the server at once (the postmaster
        and its backends, as when its machine or container dies: no backend finishes a write);
        the next start recovers from the WAL. Otherwise a fast shutdown: clients are
        disconnected, a checkpoint is written.
        """
        await self._terminate(kill=kill)

    async def start_server(self) -> None:
        """Start the (stopped) server on its data and wait until it accepts connections.

        It keeps its port unless another process took it meanwhile (then ``url`` changes).
        """
        if self._running():
            return
        self._require_started()
        for attempt in range(_START_ATTEMPTS):
            if self.port is None or attempt:
                self.port = free_port()
                self._write_port()
            started = time.monotonic()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            await self._launch()
            try:
                await self._wait_ready()
            except StoreError:
                await self._terminate(kill=True)
                if attempt + 1 < _START_ATTEMPTS and self._port_was_taken(offset):
                    log.info("postgres port %s was taken; trying another", self.port)
                    continue
                raise
            self.startup_seconds = time.monotonic() - started
            log.info(
                "postgres ready at 127.0.0.1:%s (pid %s) in %.1fs",
                self.port,
                self.pid,
                self.startup_seconds,
            )
            return

    async def restart(self, *, kill: bool = False) -> None:
        """Stop (``kill=True``: crash) and start the server again on the same data and port."""
        await self._terminate(kill=kill)
        await self.start_server()

    # -- internals -----------------------------------------------------------------------------

    def _require_started(self) -> Path:
        if self.directory is None:
            raise StoreError("LocalPostgres is not started")
        return self.directory

    def _running(self) -> bool:
        proc = self._process
        if proc is None:
            return False
        code = proc.poll() if isinstance(proc, subprocess.Popen) else proc.returncode
        return code is None

    def _as_server_user(self) -> dict[str, object]:
        """Popen arguments that run the child as the server's user (when we are root)."""
        if self._account is None:
            return {}
        return {
            "user": self._account.pw_uid,
            "group": self._account.pw_gid,
            "extra_groups": [],
        }

    @contextlib.contextmanager
    def _runnable(self, program: str) -> Iterator[None]:
        """Translate a program the server's user cannot run (a 0700 parent) into a clear error."""
        try:
            yield
        except OSError as exc:
            who = self._account.pw_name if self._account is not None else "this user"
            raise StoreError(f"{program} cannot be run as {who}: {exc.strerror}") from None

    def _chown(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    async def _run(self, argv: list[str], *, what: str, stdin: bytes | None = None) -> None:
        """Run one short-lived PostgreSQL program to completion as the server's user."""
        with self.log_path.open("ab") as out, self._runnable(argv[0]):
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=_child_env(),
                preexec_fn=die_with_parent,
                **self._as_server_user(),  # type: ignore[arg-type]
            )
            try:
                await asyncio.wait_for(proc.communicate(stdin), self.startup_timeout * 2)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise StoreError(f"{what} did not finish in time; see {self.log_path}") from None
        if proc.returncode != 0:
            raise StoreError(f"{what} failed (exit {proc.returncode}); see {self.log_path}")

    async def _init_cluster(self) -> None:
        """initdb with the role's password from a file, then create the ckms database."""
        assert self.directory is not None and self.bin_dir is not None
        if self._account is not None:
            _check_reachable(self.directory, self._account.pw_uid)
        self.directory.chmod(0o700)
        self._chown(self.directory)
        self.log_path.touch(mode=0o600)
        self._chown(self.log_path)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        password = secrets.token_urlsafe(32)
        pwfile = self.directory / "initdb.pw"
        for stale in (self.password_file, pwfile):  # left by an initdb that failed here before
            stale.unlink(missing_ok=True)
        _write_private(self.password_file, password)
        # initdb reads the password from a file of the server user's own, removed at once: the
        # caller's file stays the caller's (the server never needs to read it again).
        _write_private(pwfile, password)
        self._chown(pwfile)
        try:
            await self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "--pgdata",
                    str(self.data_path),
                    "--username",
                    ROLE,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        (self.data_path / "pg_hba.conf").write_text(_HBA)
        # Single-user mode creates the database before the server first listens anywhere.
        await self._run(
            [str(self.bin_dir / "postgres"), "--single", "-D", str(self.data_path), "postgres"],
            what="creating the ckms database",
            stdin=f"CREATE DATABASE {DATABASE} OWNER {ROLE};\n".encode(),
        )

    def _write_port(self) -> None:
        """Write the listening settings (the port may change between attempts)."""
        conf = self.data_path / "postgresql.ckms.conf"
        conf.write_text(_CONF.format(port=self.port, socket_dir=self.socket_dir))
        self._chown(conf)
        main = self.data_path / "postgresql.conf"
        include = "include = 'postgresql.ckms.conf'\n"
        if include not in main.read_text():
            with main.open("a") as out:
                out.write("\n" + include)

    async def _launch(self) -> None:
        assert self.bin_dir is not None
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_path)]
        with self.log_path.open("ab") as out, self._runnable(argv[0]):
            common: dict[str, object] = {
                "stdin": subprocess.DEVNULL,
                "stdout": out,
                "stderr": subprocess.STDOUT,
                "cwd": self.directory,
                "env": _child_env(),
                # Detached (`up`), it outlives the terminal; otherwise it dies with us.
                "start_new_session": self._detach,
                **self._as_server_user(),
            }
            if self._detach:
                self._process = await asyncio.to_thread(
                    subprocess.Popen,
                    argv,
                    **common,  # type: ignore[arg-type]
                )
            else:
                self._process = await asyncio.create_subprocess_exec(
                    *argv,
                    preexec_fn=die_with_parent,
                    **common,  # type: ignore[arg-type]
                )
        log.debug("postgres started pid=%s log=%s", self._process.pid, self.log_path)

    async def _wait_ready(self) -> None:
        """Wait until the server accepts connections on TCP (pg_isready, no password needed)."""
        assert self.bin_dir is not None
        deadline = time.monotonic() + self.startup_timeout
        argv = [
            str(self.bin_dir / "pg_isready"),
            "--quiet",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--dbname={DATABASE}",
            f"--username={ROLE}",
            "--timeout=2",
        ]
        while True:
            if not self._running():
                raise StoreError(f"PostgreSQL exited while starting; see {self.log_path}")
            probe = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=_child_env()
            )
            if await probe.wait() == 0:
                return
            if time.monotonic() > deadline:
                raise StoreError(
                    f"PostgreSQL did not accept connections within {self.startup_timeout:.0f} s; "
                    f"see {self.log_path}"
                )
            await asyncio.sleep(0.1)

    def _port_was_taken(self, offset: int) -> bool:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return b"Address already in use" in f.read()

    async def _terminate(self, *, kill: bool) -> None:
        proc = self._process
        if proc is None:
            return
        self._process = None
        if isinstance(proc, subprocess.Popen):
            await asyncio.to_thread(_stop_popen, proc, kill)
            return
        if proc.returncode is not None:
            return
        killed = _stop_signal(proc.pid, kill=kill)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            log.warning("postgres ignored a fast shutdown for %.0f s; killing it", _STOP_GRACE_S)
            killed = _stop_signal(proc.pid, kill=True)
            await proc.wait()
        # A restart needs the old server's shared memory released by every process of it.
        for _ in range(int(_STOP_GRACE_S / 0.05)):
            if not any(pid_alive(pid) for pid in killed):
                break
            await asyncio.sleep(0.05)


def _write_private(path: Path, text: str) -> None:
    """Write a new file readable by its owner only (created 0600, never wider for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat_line = f.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            if int(stat_line.rsplit(b")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _stop_signal(pid: int, *, kill: bool) -> list[int]:
    """Ask the postmaster for a fast shutdown (SIGINT), or crash the server: return the pids
    that were SIGKILLed.

    A crash kills every process of the server at once, as when its machine dies: the postmaster
    is frozen (so it forks no more), then it and its children get SIGKILL. A process-group
    signal would not do: each child of the postmaster runs in a session of its own.
    """
    with contextlib.suppress(ProcessLookupError):
        if not kill:
            os.kill(pid, signal.SIGINT)
            return []
        os.kill(pid, signal.SIGSTOP)
        pids = [*_children(pid), pid]
        for target in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        return pids
    return []


def _stop_popen(proc: subprocess.Popen[bytes], kill: bool) -> None:
    """The blocking stop of a detached server this process started."""
    _stop_signal(proc.pid, kill=kill)
    try:
        proc.wait(_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _stop_signal(proc.pid, kill=True)
        proc.wait()


def _stop_pid(pid: int) -> None:
    """Stop a detached server another process started (``python -m ckms.devpostgres down``)."""
    _stop_signal(pid, kill=False)
    deadline = time.monotonic() + _STOP_GRACE_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        _stop_signal(pid, kill=True)


# -- shell entry: python -m ckms.devpostgres up|down -------------------------------------------


def _state_file() -> Path:
    return kafka_cache_dir() / "devpostgres.json"


async def _up(data_dir: Path | None) -> int:
    state = _state_file()
    if state.exists():
        info = json.loads(state.read_text())
        if pid_alive(info.get("pid", 0)):
            print(info["url"])
            print(
                "ckms: PostgreSQL is already up (stop it with `python -m ckms.devpostgres down`)",
                file=sys.stderr,
            )
            return 0
    pg = LocalPostgres(data_dir=data_dir, keep_data=True, detach=True)
    await pg.start()
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(
        json.dumps(
            {
                "url": pg.url,
                "pid": pg.pid,
                "directory": str(pg.directory),
                "remove_data": data_dir is None,
            }
        )
    )
    print(pg.url)
    print(
        f"ckms: PostgreSQL up in {pg.startup_seconds:.1f} s; password file {pg.password_file} "
        f"(log: {pg.log_path})",
        file=sys.stderr,
    )
    return 0


def _down() -> int:
    state = _state_file()
    if not state.exists():
        print("ckms: no local PostgreSQL is up", file=sys.stderr)
        return 0
    info = json.loads(state.read_text())
    if info.get("pid"):
        _stop_pid(int(info["pid"]))
    if info.get("remove_data"):
        shutil.rmtree(info["directory"], ignore_errors=True)
    state.unlink()
    print("ckms: local PostgreSQL stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Shell entry: ``up`` starts a detached local PostgreSQL and prints its URL; ``down``."""
    parser = argparse.ArgumentParser(
        prog="python -m ckms.devpostgres", description="A real local PostgreSQL on loopback."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local PostgreSQL in the background; print its URL")
    up.add_argument("--data-dir", type=Path, default=None, help="keep data here (default: temp)")
    sub.add_parser("down", help="stop the local PostgreSQL started by `up`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "up":
            return asyncio.run(_up(args.data_dir))
        return _down()
    except CKMSError as exc:
        print(f"ckms: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
