"""The host decides what the controller may do to it: attacks on a real ``ckms-agent`` process.

Each test is an attack by a compromised controller (the FakeController plays one: it sends
whatever install spec it likes) or by a host's service user (``nobody``, acting through
``setpriv``), against a real agent process as root on real files. The host's own config says
where keys may go and what its hook names run; nothing else is accepted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import World, wait_until

from ckms.protocol import Envelope, InstallSpec

pytestmark = pytest.mark.kafka

AGENT_BIN = str(Path(sys.executable).parent / "ckms-agent")
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@contextlib.asynccontextmanager
async def agent_process(world: World, **env: str) -> AsyncIterator[Path]:
    """Run ``ckms-agent run`` as its own process (as root) until the block ends; yield its log."""
    log = world.tmp / "agent.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            AGENT_BIN, "run", env=world.env(**env), stdout=out, stderr=out
        )
    try:
        yield log
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the unprivileged service user."""
    return subprocess.run([*AS_NOBODY, *argv], capture_output=True, text=True, check=False)


async def ack_for(world: World, key: str, status: str, timeout_s: float = 30.0) -> Envelope:
    return await world.ack_reader.wait_for(
        world.agent_public(),
        lambda a: a.data.key == key and a.data.status == status,
        timeout_s,
    )


def as_root(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def traversable_root() -> Path:
    """A root directory the service user can walk down (pytest's own tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="ckms-host-"))
    root.chmod(0o711)
    for sub in ("etc", "etc/ckms"):
        (root / sub).mkdir(mode=0o711)
        (root / sub).chmod(0o711)
    return root


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as src:
            return src.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


# -- a compromised controller ------------------------------------------------------------------


async def test_a_path_outside_the_allowed_roots_is_refused_and_nothing_is_written(
    world: World,
) -> None:
    ctl = world.controller
    ctl.add_key("evil/cron", install=InstallSpec(path="/etc/cron.d/{purpose}"))
    ctl.add_key("payments/db", install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key"))
    async with agent_process(world):
        ack = await ack_for(world, "evil/cron", "failed")
        await ack_for(world, "payments/db", "installed")  # the host still takes what it allows
    assert "outside this host's allowed paths" in (ack.data.error or "")
    assert not world.host_path("/etc/cron.d").exists()


async def test_only_hooks_the_host_defines_run(world: World) -> None:
    ctl = world.controller
    pwned = world.tmp / "pwned"
    world.set_policy(hooks={"ok": {"reload": ["true"]}})
    argv = InstallSpec(path="/etc/ckms/a/argv.key", reload=("touch", str(pwned)))
    ctl.add_key("a/argv", install=argv)
    ctl.add_key("a/unknown", install=InstallSpec(path="/etc/ckms/a/unknown.key", reload="nope"))
    ctl.add_key("a/named", install=InstallSpec(path="/etc/ckms/a/named.key", reload="ok"))
    async with agent_process(world):
        refused_argv = await ack_for(world, "a/argv", "failed")
        refused_name = await ack_for(world, "a/unknown", "failed")
        named = await ack_for(world, "a/named", "installed")
    assert not pwned.exists(), "a controller-supplied command ran on the host"
    assert "allow_controller_commands is off" in (refused_argv.data.error or "")
    assert "hook 'nope' is not defined on this host" in (refused_name.data.error or "")
    assert not world.host_path("/etc/ckms/a/argv.key").exists()
    assert not world.host_path("/etc/ckms/a/unknown.key").exists()
    [hook] = named.data.hooks
    assert (hook.command, hook.name, hook.exit_code) == ("reload", "ok", 0)


async def test_a_health_check_that_prints_the_key_leaks_it_nowhere(world: World) -> None:
    ctl = world.controller
    path = world.host_path("/etc/ckms/payments/db.key")
    dump = f"cat {path}; base64 {path}; od -An -tx1 {path}; base64 -w0 {path} >&2"
    world.set_policy(hooks={"leaky": {"health": ["sh", "-c", dump], "log_output": True}})
    key = ctl.add_key(
        "payments/db", install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key", health="leaky")
    )
    material = key.versions[1].material
    shapes = [
        material,
        base64.b64encode(material),
        material.hex().encode(),
        " ".join(f"{b:02x}" for b in material[:8]).encode(),
    ]
    async with agent_process(world) as log:
        ack = await ack_for(world, "payments/db", "installed")
        assert world.ack_reader.raw, "no ack reached the controller"
        for value, headers in world.ack_reader.raw:
            blob = value + b"".join(v for _, v in headers)
            for shape in shapes:
                assert shape not in blob, "key material left the host in an ack"
        # The host asked for the output in its own log: it is there, with the key scrubbed.
        await wait_until(lambda: "output (local only" in log.read_text(), 10, "the local log")
        text = log.read_bytes()
        for shape in shapes:
            assert shape not in text, "key material reached the agent's own log"
    [hook] = ack.data.hooks
    assert (hook.command, hook.name, hook.exit_code) == ("health", "leaky", 0)


# -- a host's service user ---------------------------------------------------------------------


async def test_a_symlinked_key_file_and_a_failing_health_check_read_nothing_for_the_user(
    world: World,
) -> None:
    ctl = world.controller
    secret = world.tmp / "shadow"
    secret.write_text("root-only secret\n")
    secret.chmod(0o600)
    world.set_policy(allowed_owners=["nobody"], hooks={"broken": {"health": ["false"]}})
    spec = InstallSpec(path="/etc/ckms/svc/db.key", owner="nobody")
    ctl.add_key("svc/db", install=spec)
    root = traversable_root()
    path = root / "etc/ckms/svc/db.key"
    try:
        await plant_link_then_fail_the_health_check(world, root, path, secret, spec)
    finally:
        shutil.rmtree(root)


async def plant_link_then_fail_the_health_check(
    world: World, root: Path, path: Path, secret: Path, spec: InstallSpec
) -> None:
    ctl = world.controller
    async with agent_process(world, CKMS_AGENT_ROOT=str(root)):
        await ack_for(world, "svc/db", "installed")
        # The admin lets the service own its key directory; the service plants a link.
        os.chown(path.parent, NOBODY, NOBODY)
        planted = as_nobody("ln", "-sf", str(secret), str(path))
        assert planted.returncode == 0, planted.stderr
        ctl.keys["svc/db"].install = InstallSpec.model_validate(
            {**spec.model_dump(mode="json"), "health": "broken"}
        )
        v2 = ctl.rotate("svc/db")
        await ctl.publish(ctl.rotated_event("svc/db", v2))
        ack = await ack_for(world, "svc/db", "failed")
    assert as_root("cat", str(secret)) == "root-only secret\n"
    assert "root-only secret" not in as_nobody("cat", str(path)).stdout
    assert "owned by uid 65534" in (ack.data.error or "")


async def test_a_symlinked_parent_directory_is_refused(world: World) -> None:
    ctl = world.controller
    elsewhere = world.tmp / "elsewhere"
    elsewhere.mkdir()
    app = world.host_path("/etc/ckms/app")
    app.mkdir(parents=True)
    (app / "sub").symlink_to(elsewhere)
    ctl.add_key("app/db", install=InstallSpec(path="/etc/ckms/app/sub/db.key"))
    async with agent_process(world):
        ack = await ack_for(world, "app/db", "failed")
    assert list(elsewhere.iterdir()) == []
    assert "symbolic link" in (ack.data.error or "")


async def test_a_fifo_under_a_temp_name_does_not_block_the_agent(world: World) -> None:
    ctl = world.controller
    ctl.add_key("payments/db", install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key"))
    path = world.host_path("/etc/ckms/payments/db.key")
    path.parent.mkdir(parents=True, mode=0o700)
    fifo = path.parent / ".db.key.ckms-tmp-0123456789ab"
    os.mkfifo(fifo)
    async with agent_process(world) as log:
        await ack_for(world, "payments/db", "installed")
        await wait_until(lambda: "skipped" in log.read_text(), 10, "the sweep's log line")
    assert path.read_bytes() == ctl.keys["payments/db"].versions[1].material
    assert fifo.exists()  # skipped, never opened for writing


async def test_a_hard_linked_key_file_is_never_zeroed(world: World) -> None:
    ctl = world.controller
    ctl.add_key("payments/db", install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key"))
    path = world.host_path("/etc/ckms/payments/db.key")
    victim = world.tmp / "victim"
    victim.write_bytes(b"someone else's data")
    async with agent_process(world):
        await ack_for(world, "payments/db", "installed")
        path.unlink()
        os.link(victim, path)  # the key file's name now points at another file's inode
        await ctl.publish(ctl.revoked_event("payments/db", 1))
        await ack_for(world, "payments/db", "removed")
    assert victim.read_bytes() == b"someone else's data"
    assert not path.exists()


# -- hooks that do not end ---------------------------------------------------------------------


async def test_a_setsid_child_cannot_hold_the_agent_and_revocations_keep_flowing(
    world: World,
) -> None:
    ctl = world.controller
    hook_pid, child_pid = world.tmp / "hook.pid", world.tmp / "child.pid"
    hang = (
        f"echo $$ > {hook_pid}; setsid sh -c 'echo $$ > {child_pid}; exec sleep 300' & "
        "exec sleep 300"
    )
    world.set_policy(hooks={"hang": {"reload": ["sh", "-c", hang], "timeout_s": 6}})
    ctl.add_key("other/api", install=InstallSpec(path="/etc/ckms/{team}/{purpose}.key"))
    other = world.host_path("/etc/ckms/other/api.key")
    async with agent_process(world):
        await ack_for(world, "other/api", "installed")
        spec: dict[str, Any] = {"path": "/etc/ckms/{team}/{purpose}.key", "reload": "hang"}
        ctl.add_key("slow/db", install=InstallSpec(**spec))
        v2 = ctl.rotate("other/api")  # a rotation makes the agent sync and see slow/db
        await ctl.publish(ctl.rotated_event("other/api", v2))
        await wait_until(lambda: child_pid.exists() and hook_pid.exists(), 20, "the hang hook")
        hook, child = int(hook_pid.read_text()), int(child_pid.read_text())
        # While slow/db's reload hangs, a revocation of another key is applied at once.
        await ctl.publish(ctl.revoked_event("other/api", 1), ctl.revoked_event("other/api", 2))
        await wait_until(lambda: not other.exists(), 5, "other/api removed during the hang")
        assert alive(hook), "the revocation should land while the reload still hangs"
        failed = await ack_for(world, "slow/db", "failed", timeout_s=40)
        await wait_until(lambda: not alive(child), 5, "the setsid child killed")
    assert not alive(hook)
    first = failed.data.hooks[0]
    assert (first.name, first.timed_out, first.exit_code) == ("hang", True, None)
    assert 5000 <= first.duration_ms < 20000
