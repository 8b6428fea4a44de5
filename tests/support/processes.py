"""Test support: ckms processes as a user runs them, every log captured to a file.

``run`` runs one CLI process with its stderr (its log) appended to a file; ``controller_process``
runs ``ckms controller run`` at DEBUG with SSH debugging and yields its port; ``base_env`` is
the environment with every logger at DEBUG (asyncssh's included) on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

BIN = Path(sys.executable).parent
DEBUG_ENV = {
    "CKMS_LOG_LEVEL": "DEBUG",
    "CKMS_SSH_DEBUG": "1",
    "CKMS_AGENT_LOG_LEVEL": "DEBUG",
    "CKMS_AGENT_SSH_DEBUG": "1",
}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    env["COLUMNS"] = "200"
    return {**env, **DEBUG_ENV, **extra}


async def run(*argv: str, env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run one process; stderr (its log) is appended to ``log``; return (rc, stdout)."""
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@contextlib.asynccontextmanager
async def controller_process(config: Path, log: Path, **env: str) -> AsyncIterator[int]:
    """``ckms controller run`` at DEBUG with SSH debugging; yields its port once it listens.

    ``env`` adds settings (``CKMS_<FIELD>``), e.g. plaintext Kafka for a test without a broker.
    """
    err = log.open("ab")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "ckms"),
        "controller",
        "run",
        "--config",
        str(config),
        "--log-level",
        "DEBUG",
        "--ssh-debug",
        env=base_env(**env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=err,
    )
    err.close()
    try:
        port = None
        for _ in range(600):  # bounded: up to 60 s for the "listening" line
            found = re.search(r"controller listening on 127\.0\.0\.1:(\d+)", read(log))
            if found:
                port = int(found.group(1))
                break
            assert proc.returncode is None, tail(log)
            await asyncio.sleep(0.1)
        assert port is not None, "controller did not start"
        yield port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def read(log: Path) -> str:
    return log.read_text(errors="replace")


def tail(log: Path) -> str:
    return read(log)[-4000:]
