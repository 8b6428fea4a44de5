"""Installing keys on a host: exact bytes and modes, atomic replace, rollback, secure removal."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ckms.crypto import KeyType, generate, material_digest
from ckms.protocol import AckStatus, InstallSpec
from ckms_agent.config import HookCommand
from ckms_agent.files import (
    TEMP_MARK,
    UnsafePathError,
    ensure_directory,
    open_directory,
    secure_remove,
    sweep_temp_files,
    write_atomic,
)
from ckms_agent.hooks import Hook, run_hook
from ckms_agent.installer import HeldVersion, Installer
from ckms_agent.policy import HostPolicy, PolicyRefusal


def held(version: int, *, primary: bool, state: str = "Active") -> HeldVersion:
    material = generate(KeyType.AES_256)
    return HeldVersion(version, state, primary, material_digest(bytes(32), material), material)


HOOKS = {
    "ok": HookCommand(reload=("true",)),
    "bad": HookCommand(health=("false",)),
}


def host(tmp_path: Path, **hooks: HookCommand) -> Installer:
    policy = HostPolicy(
        allowed_paths=(Path("/etc/ckms/keys"), Path("/keys")), hooks={**HOOKS, **hooks}
    )
    return Installer(host_id="web-1", root=tmp_path / "host", policy=policy)


@pytest.fixture
def installer(tmp_path: Path) -> Installer:
    return host(tmp_path)


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o7777


async def test_raw_install_has_exact_bytes_and_modes(installer: Installer) -> None:
    v1 = held(1, primary=True)
    spec = InstallSpec(path="/etc/ckms/keys/{team}_{purpose}.key")
    outcome = await installer.apply("payments/db", "aes-256", spec, [v1])
    assert outcome.status is AckStatus.INSTALLED
    path = installer.host_path("/etc/ckms/keys/payments_db.key")
    assert outcome.paths == [path]
    assert path.read_bytes() == v1.material
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert not [p for p in path.parent.iterdir() if TEMP_MARK in p.name]


async def test_keyring_holds_every_usable_version_with_the_primary_marked(
    installer: Installer,
) -> None:
    old, new = held(1, primary=False), held(2, primary=True)
    spec = InstallSpec(path="/keys/{team}_{purpose}.json", format="keyring-json", mode=0o640)
    outcome = await installer.apply("payments/db", "aes-256", spec, [old, new])
    assert outcome.status is AckStatus.INSTALLED
    ring = json.loads(outcome.paths[0].read_bytes())
    assert ring["primary"] == 2
    assert [(e["version"], e["primary"]) for e in ring["versions"]] == [(1, False), (2, True)]
    assert base64.b64decode(ring["versions"][0]["material"]) == old.material
    assert mode_of(outcome.paths[0]) == 0o640


async def test_per_version_files_and_removal_of_versions_no_longer_held(
    installer: Installer,
) -> None:
    v1, v2 = held(1, primary=False), held(2, primary=True)
    spec = InstallSpec(path="/keys/{team}_{purpose}/{version}.b64", format="base64")
    first = await installer.apply("app/sig", "aes-256", spec, [v1, v2])
    assert len(first.paths) == 2
    second = await installer.apply("app/sig", "aes-256", spec, [v2], previous=first.paths)
    assert [p.name for p in second.paths] == ["2.b64"]
    assert not installer.host_path("/keys/app_sig/1.b64").exists()
    assert base64.b64decode(second.paths[0].read_bytes()) == v2.material


async def test_failed_health_check_restores_the_previous_version(tmp_path: Path) -> None:
    reloads = tmp_path / "reloads"
    db = HookCommand(
        reload=("sh", "-c", f"echo reload >> {reloads}"),
        health=("sh", "-c", "echo 'db refused the new key' ; exit 3"),
    )
    installer = host(tmp_path, db=db)
    v1, v2 = held(1, primary=True), held(2, primary=True)
    path = installer.host_path("/keys/db.key")
    ok = InstallSpec(path="/keys/db.key")
    first = await installer.apply("payments/db", "aes-256", ok, [v1])
    failing = InstallSpec(path="/keys/db.key", reload="db")
    wrote = installer.hash_files(first.paths)
    outcome = await installer.apply("payments/db", "aes-256", failing, [v2], previous=wrote)
    assert outcome.status is AckStatus.FAILED
    assert path.read_bytes() == v1.material  # previous version back in place
    health = next(h for h in outcome.hooks if h.command == "health")
    assert (health.name, health.exit_code) == ("db", 3)
    assert "db refused" not in repr(outcome)  # the output stays in the local log
    assert reloads.read_text().count("reload") == 2  # once for the new key, once after restore


async def test_a_rollback_puts_back_only_bytes_the_agent_wrote(installer: Installer) -> None:
    v1, v2 = held(1, primary=True), held(2, primary=True)
    first = await installer.apply("payments/db", "aes-256", InstallSpec(path="/keys/db.key"), [v1])
    wrote = installer.hash_files(first.paths)
    first.paths[0].write_bytes(b"changed behind the agent's back")
    failing = InstallSpec(path="/keys/db.key", health="bad")
    outcome = await installer.apply("payments/db", "aes-256", failing, [v2], previous=wrote)
    assert outcome.status is AckStatus.FAILED
    assert not first.paths[0].exists()


async def test_failed_first_install_leaves_no_file(installer: Installer) -> None:
    spec = InstallSpec(path="/keys/db.key", health="bad")
    outcome = await installer.apply("payments/db", "aes-256", spec, [held(1, primary=True)])
    assert outcome.status is AckStatus.FAILED
    assert not installer.host_path("/keys/db.key").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as src:
            return src.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


async def test_hook_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    child, orphan = tmp_path / "child.pid", tmp_path / "orphan.pid"
    script = (
        f"setsid sh -c 'echo $$ > {child}; exec sleep 30' & "  # a new session, holds the pipe
        f"( setsid sh -c 'echo $$ > {orphan}; exec sleep 30' & ) ; "  # double fork: init's child
        "sleep 30"
    )
    result = await run_hook(Hook("health", "slow", ("sh", "-c", script), 0.5))
    assert result.timed_out and result.exit_code is None and result.name == "slow"
    assert result.duration_ms < 5000
    assert not _alive(int(child.read_text()))
    assert not _alive(int(orphan.read_text()))
    missing = await run_hook(Hook("reload", "gone", ("/nonexistent/reload",), 1))
    assert missing.exit_code is None and not missing.timed_out


async def test_remove_overwrites_and_reloads(installer: Installer, tmp_path: Path) -> None:
    v1 = held(1, primary=True)
    spec = InstallSpec(path="/keys/db.key", reload="ok")
    first = await installer.apply("payments/db", "aes-256", spec, [v1])
    outcome = await installer.remove(spec, first.paths)
    assert outcome.status is AckStatus.REMOVED
    assert not first.paths[0].exists()
    assert [h.exit_code for h in outcome.hooks] == [0]
    assert secure_remove(first.paths[0]) is False


def test_crash_before_rename_leaves_old_file_and_a_temp_that_sweep_removes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys" / "db.key"
    write_atomic(path, b"old-key-bytes")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from ckms_agent.files import write_atomic
        write_atomic(Path({str(path)!r}), b"new-key-bytes")
        """
    )
    env = {**os.environ, "CKMS_AGENT_FAULT": "crash-before-rename"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert proc.returncode == 137
    leftovers = [p for p in path.parent.iterdir() if TEMP_MARK in p.name]
    assert len(leftovers) == 1
    assert path.read_bytes() == b"old-key-bytes"
    assert sweep_temp_files(path.parent) == leftovers
    assert sorted(p.name for p in path.parent.iterdir()) == ["db.key"]


def test_rewrite_applies_the_new_mode(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_atomic(path, b"a", mode=0o600)
    write_atomic(path, b"b", mode=0o640)
    assert path.read_bytes() == b"b"
    assert mode_of(path) == 0o640


async def test_an_owner_or_group_the_host_does_not_allow_is_refused(tmp_path: Path) -> None:
    installer = host(tmp_path)
    for spec in (
        InstallSpec(path="/keys/db.key", owner="nobody"),
        InstallSpec(path="/keys/db.key", group="nogroup"),
    ):
        outcome = await installer.apply("payments/db", "aes-256", spec, [held(1, primary=True)])
        assert outcome.status is AckStatus.FAILED and "not allowed on this host" in outcome.error
    assert not installer.host_path("/keys/db.key").exists()
    allowed = Installer(
        host_id="web-1",
        root=tmp_path / "host",
        policy=HostPolicy(allowed_paths=(Path("/keys"),), allowed_owners=("nobody",)),
    )
    spec = InstallSpec(path="/keys/db.key", owner="nobody")
    outcome = await allowed.apply("payments/db", "aes-256", spec, [held(1, primary=True)])
    assert outcome.status is AckStatus.INSTALLED
    assert outcome.paths[0].stat().st_uid == 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_an_existing_directory_is_checked_before_it_is_used(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    ensure_directory(directory, 0o700)  # root's own, not writable by others: fine
    directory.chmod(0o770)
    os.chown(directory, 0, 65534)
    with pytest.raises(UnsafePathError, match="writable by others"):
        write_atomic(directory / "k", b"x")
    os.chown(directory, 0, 0)  # group root can still mean someone else (an ACL shows as g+w)
    with pytest.raises(UnsafePathError, match="writable by others"):
        write_atomic(directory / "k", b"x")
    directory.chmod(0o700)
    os.chown(directory, 65534, 0)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        ensure_directory(directory, 0o700)


def _drop_box() -> Path:
    """A directory anyone may write (the hook runs as nobody), outside pytest's 0700 tree."""
    box = Path(tempfile.mkdtemp(prefix="ckms-hook-"))
    box.chmod(0o1777)
    return box


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a hook as another user")
async def test_a_hook_runs_as_the_user_the_host_names() -> None:
    out = _drop_box()
    try:
        script = f"id -u > {out}/uid; id -G > {out}/groups"
        result = await run_hook(Hook("reload", "as-nobody", ("sh", "-c", script), 5, "nobody"))
        assert result.exit_code == 0
        assert _read(out / "uid").split() == ["65534"]
        assert _read(out / "groups").split() == ["65534"]
    finally:
        shutil.rmtree(out)


def _read(path: Path) -> str:
    return path.read_text()


async def test_controller_commands_run_only_where_the_host_opts_in(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    spec = InstallSpec(path="/keys/db.key", reload=("touch", str(ran)))
    refused = await host(tmp_path).apply("payments/db", "aes-256", spec, [held(1, primary=True)])
    assert refused.status is AckStatus.FAILED and not ran.exists()
    opted_in = Installer(
        host_id="web-1",
        root=tmp_path / "host",
        policy=HostPolicy(allowed_paths=(Path("/keys"),), allow_controller_commands=True),
    )
    outcome = await opted_in.apply("payments/db", "aes-256", spec, [held(1, primary=True)])
    assert outcome.status is AckStatus.INSTALLED and ran.exists()
    assert [(h.command, h.name, h.exit_code) for h in outcome.hooks] == [("reload", None, 0)]


def test_a_path_cannot_climb_out_of_its_allowed_root(tmp_path: Path) -> None:
    installer = host(tmp_path)
    for path in ("/keys/../etc/shadow", "/keys/x/../../y", "/elsewhere/k"):
        with pytest.raises(PolicyRefusal):
            installer.locate(installer.host_path(path))
    with (
        pytest.raises(UnsafePathError, match="not a directory name"),
        open_directory(tmp_path, ("..",)),
    ):
        pass


async def test_hook_output_is_logged_only_when_the_host_asks_and_then_without_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook may print what it reads; the agent's log keeps the key out either way."""
    material = generate(KeyType.AES_256)
    key_file = tmp_path / "db.key"
    key_file.write_bytes(material)
    ring = json.dumps({"versions": [{"material": base64.b64encode(material).decode()}]})
    (tmp_path / "ring.json").write_text(ring)
    dump = (
        f"echo marker-line; cat {key_file}; base64 {key_file}; base64 -w0 {key_file}; echo; "
        f"od -An -tx1 {key_file}; od -x {key_file}; od -tx4 {key_file}; "
        f"for tool in 'xxd' 'xxd -p' 'hexdump' 'hexdump -C'; do "
        f"command -v ${{tool%% *}} >/dev/null && $tool {key_file}; done; "
        f"cat {tmp_path / 'ring.json'}"
    )
    shapes = [
        material,
        material.hex().encode(),
        base64.b64encode(material),
        base64.b64encode(material)[:16],
        " ".join(f"{b:02x}" for b in material[:8]).encode(),
        material[8:16].hex().encode(),
        material[2:4][::-1].hex().encode() + b" " + material[4:6][::-1].hex().encode(),
    ]
    argv = ("sh", "-c", dump)
    with caplog.at_level("DEBUG", logger="ckms_agent.hooks"):
        quiet = await run_hook(Hook("health", "dump", argv, 5), material=[material])
    assert quiet.exit_code == 0
    assert "not logged" in caplog.text and "marker-line" not in caplog.text
    caplog.clear()
    with caplog.at_level("DEBUG", logger="ckms_agent.hooks"):
        await run_hook(Hook("health", "dump", argv, 5, log_output=True), material=[material])
    logged = caplog.text.encode("utf-8", "surrogateescape")
    assert b"marker-line" in logged and b"[redacted]" in logged
    for shape in shapes:
        assert shape not in logged, shape
    # Every line a dump tool prints of the key file (the file holds only the key).
    for tool in (["od", "-x"], ["od", "-An", "-tx1"], ["xxd"], ["hexdump"], ["hexdump", "-C"]):
        if shutil.which(tool[0]) is None:
            continue
        proc = await asyncio.create_subprocess_exec(
            *tool, str(key_file), stdout=asyncio.subprocess.PIPE
        )
        dumped, _ = await proc.communicate()
        for line in dumped.splitlines():
            data = line.split(b" ", 1)[-1].strip()  # without the offset column
            if len(data) >= 16:
                assert data not in logged, (tool, line)
