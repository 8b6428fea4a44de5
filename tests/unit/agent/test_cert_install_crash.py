"""A ``tls-cert``'s files change together: an agent that dies while writing them (the part of
an install that takes time: writes and fsyncs) leaves key.pem, cert.pem and the files made of
both all the old ones, never a new key beside an old certificate (a service restarted then --
nginx at boot -- would refuse the pair). Every file is staged before the first is renamed.
Real files, a real agent process killed by fault injection."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from ckms.crypto import KeyType, generate
from ckms.protocol import AckStatus, InstallSpec
from ckms_agent.acks import AckWriter
from ckms_agent.certs import CertKeeper, CertRecord
from ckms_agent.config import HookCommand
from ckms_agent.files import TEMP_MARK, digest_of
from ckms_agent.installer import Installer
from ckms_agent.policy import HostPolicy
from ckms_agent.state import AgentState

NAMES = ("key.pem", "cert.pem", "combined.pem")
SPEC = InstallSpec(path="/etc/ckms/tls/server", format="tls-pem")


def installer(root: Path) -> Installer:
    policy = HostPolicy(
        allowed_paths=(Path("/etc/ckms/tls"),),
        hooks={"bad": HookCommand(health=("false",))},
    )
    return Installer(host_id="db-1", root=root, policy=policy)


def generation(root: Path, n: int) -> dict[Path, bytes]:
    d = root / "etc/ckms/tls/server"
    return {d / name: f"{name} of generation {n}\n".encode() for name in NAMES}


def install(root: Path, n: int, previous: int | None, spec: InstallSpec = SPEC) -> AckStatus:
    before = {} if previous is None else generation(root, previous)
    wrote = {p: digest_of(data) or "" for p, data in before.items()}
    outcome = asyncio.run(
        installer(root).apply_files("db/server", spec, generation(root, n), wrote)
    )
    return outcome.status


def generations_on_disk(root: Path) -> set[str]:
    d = root / "etc/ckms/tls/server"
    return {(d / name).read_text().split()[-1] for name in NAMES}


def _crash_installing(root: Path, fault: str) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cert_install_crash import install
        install(Path({str(root)!r}), 2, 1)
        """
    )
    env = {**os.environ, "CKMS_AGENT_FAULT": fault}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False, timeout=60)
    assert proc.returncode == 137


def test_a_crash_while_writing_the_second_file_leaves_the_old_pair(tmp_path: Path) -> None:
    """Killed once key.pem is written and cert.pem is being written: the old key.pem must
    still be there (one by one, the new key.pem was already in place beside the old cert)."""
    root = tmp_path / "host"
    assert install(root, 1, None) is AckStatus.INSTALLED
    _crash_installing(root, "crash-before-rename:2")
    assert generations_on_disk(root) == {"1"}, "key and certificate disagree after a crash"
    d = root / "etc/ckms/tls/server"
    assert [p for p in d.iterdir() if TEMP_MARK in p.name]  # the staged new key among them
    # The next install puts generation 3 in place and sweeps what the crash left.
    assert install(root, 3, 1) is AckStatus.INSTALLED
    assert generations_on_disk(root) == {"3"}
    installer(root).sweep(d)  # what an agent start does
    assert not [p for p in d.iterdir() if TEMP_MARK in p.name]
    assert sorted(p.name for p in d.iterdir() if TEMP_MARK not in p.name) == sorted(NAMES)


def test_a_failed_health_check_puts_the_whole_previous_pair_back(tmp_path: Path) -> None:
    root = tmp_path / "host"
    assert install(root, 1, None) is AckStatus.INSTALLED
    checked = SPEC.model_copy(update={"health": "bad"})
    assert install(root, 2, 1, checked) is AckStatus.FAILED
    assert generations_on_disk(root) == {"1"}
    d = root / "etc/ckms/tls/server"
    assert not [p for p in d.iterdir() if TEMP_MARK in p.name]
    assert (d / "key.pem").stat().st_mode & 0o777 == 0o600
    assert d.stat().st_mode & 0o777 == 0o700


def test_a_directory_holding_other_files_keeps_them(tmp_path: Path) -> None:
    """The directory is written into, never replaced: its other files stay (and a container
    that bind-mounts it sees the renewal)."""
    root = tmp_path / "host"
    assert install(root, 1, None) is AckStatus.INSTALLED
    other = root / "etc/ckms/tls/server/dhparam.pem"
    other.write_bytes(b"not ours")
    inode = other.parent.stat().st_ino
    assert install(root, 2, 1) is AckStatus.INSTALLED
    assert other.parent.stat().st_ino == inode
    assert generations_on_disk(root) == {"2"}
    assert other.read_bytes() == b"not ours"


def test_a_first_install_creates_the_directory_whole(tmp_path: Path) -> None:
    root = tmp_path / "host"
    assert install(root, 1, None) is AckStatus.INSTALLED
    assert generations_on_disk(root) == {"1"}
    assert (root / "etc/ckms/tls/server").stat().st_mode & 0o777 == 0o700


def test_the_keeper_sweeps_a_staged_install_a_crash_left_beside_its_directory(
    tmp_path: Path,
) -> None:
    """A crash while staging leaves the old files in place (they still match the record, so
    nothing re-installs until renewal) and temp files holding the new private key: the keeper
    removes them when it starts."""
    root = tmp_path / "host"
    assert install(root, 1, None) is AckStatus.INSTALLED
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cert_install_crash import install
        install(Path({str(root)!r}), 2, 1)
        """
    )
    env = {**os.environ, "CKMS_AGENT_FAULT": "crash-before-rename:3"}
    assert subprocess.run([sys.executable, "-c", script], env=env, timeout=60).returncode == 137
    directory = root / "etc/ckms/tls/server"
    assert [p for p in directory.iterdir() if TEMP_MARK in p.name]
    assert generations_on_disk(root) == {"1"}

    async def start() -> None:
        async with AgentState(tmp_path / "state.db") as state:
            record = CertRecord(
                key="db/server",
                version=1,
                digest="d",
                directory=str(directory),
                serial="1",
                not_after="2100-01-01T00:00:00Z",
                renew_at=0.0,
                files={str(p): digest_of(d) or "" for p, d in generation(root, 1).items()},
                spec=SPEC.model_dump_json(),
            )
            await state.set_tls_certs({"db/server": asdict(record)})
            keeper = CertKeeper(
                state=state,
                installer=installer(root),
                acks=AckWriter(state, identity_key=generate(KeyType.ED25519), host_id="db-1"),
                host_id="db-1",
                bundle_path=tmp_path / "ca-bundle.pem",
            )
            await keeper.load()
            assert keeper.holds("db/server")

    asyncio.run(start())
    assert sorted(p.name for p in directory.iterdir()) == sorted(NAMES)
    assert generations_on_disk(root) == {"1"}


def test_the_directory_keeps_the_mode_it_has(tmp_path: Path) -> None:
    """An install must not reset what the host's admin set on the directory (a service
    group's r-x, say)."""
    root = tmp_path / "host"
    assert install(root, 1, None) is AckStatus.INSTALLED
    d = root / "etc/ckms/tls/server"
    d.chmod(0o750)
    assert install(root, 2, 1) is AckStatus.INSTALLED
    assert generations_on_disk(root) == {"2"}
    assert d.stat().st_mode & 0o777 == 0o750
