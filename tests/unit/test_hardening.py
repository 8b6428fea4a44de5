"""An unsealed process's memory stays its own: no core file, nothing readable by another
process of the same user (the attack: a second service or a shell running as that user)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckms._hardening

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

_READER = (
    "import sys\n"
    "for name in ('environ', 'mem'):\n"
    "    try:\n"
    "        open(f'/proc/{sys.argv[1]}/' + name, 'rb').read(1)\n"
    "        print(name, 'read')\n"
    "    except PermissionError:\n"
    "        print(name, 'refused')\n"
    "    except OSError:\n"
    "        print(name, 'read')  # opened: an unmapped offset is EIO, the next read works\n"
)


def _run_protected(protect: bool) -> tuple[list[str], str]:
    """What a process of the same user reads of one that (or not) called protect_memory, and
    the protected one's core size limit line."""
    # As root (a container), both run as nobody: root itself may read anything
    # (CAP_SYS_PTRACE). The module's own source is run, so nobody needs no access to ckms.
    user = {"user": 65534, "group": 65534} if os.getuid() == 0 else {}
    python = "/usr/bin/python3" if user and Path("/usr/bin/python3").exists() else sys.executable
    source = Path(ckms._hardening.__file__).read_text()
    tail = "\nprotect_memory()\n" if protect else "\n"
    tail += "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
    child = subprocess.Popen(
        [python, "-c", source + tail],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "CKMS_TEST_SECRET": "s3cret-in-environ"},
        **user,  # type: ignore[arg-type]
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        reader = subprocess.run(
            [python, "-c", _READER, str(child.pid)],
            capture_output=True,
            timeout=60,
            check=True,
            cwd="/",
            **user,  # type: ignore[arg-type]
        )
        limits = Path(f"/proc/{child.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        return reader.stdout.decode().split("\n")[:2], core
    finally:
        child.kill()
        child.wait()


def test_another_process_of_the_same_user_cannot_read_a_protected_ones_memory() -> None:
    seen, core = _run_protected(protect=True)
    assert seen == ["environ refused", "mem refused"]
    assert core.split()[4:6] == ["0", "0"]
    # The same without protect_memory: the reader gets in (so the test can tell).
    seen, _ = _run_protected(protect=False)
    assert seen == ["environ read", "mem read"]
