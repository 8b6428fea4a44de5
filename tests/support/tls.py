"""Test support: real OpenSSL against what ckms issues (verify, s_server, s_client)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


def openssl(
    *args: str, cwd: Path | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl`` with ``args`` (bounded), returning its exit status and output."""
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def verify(
    ca: Path, cert: Path, *, untrusted: Path | None = None, purpose: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -CAfile ca [-untrusted chain] cert``."""
    args = ["verify", "-CAfile", str(ca)]
    if untrusted is not None:
        args += ["-untrusted", str(untrusted)]
    if purpose is not None:
        args += ["-purpose", purpose]
    return openssl(*args, str(cert))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def tls_server(cert: Path, key: Path, chain: Path) -> AsyncIterator[int]:
    """An ``openssl s_server`` on a free loopback port serving ``cert`` + ``chain`` with ``key``."""
    assert OPENSSL is not None
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        OPENSSL,
        "s_server",
        "-accept",
        f"127.0.0.1:{port}",
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-cert_chain",
        str(chain),
        "-www",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(15):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    if proc.returncode is not None:
                        err = await proc.stderr.read() if proc.stderr else b""
                        raise AssertionError(f"s_server exited: {err.decode()}") from None
                    await asyncio.sleep(0.1)
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)


async def s_client(port: int, ca: Path, hostname: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` to ``port`` verifying the server against ``ca`` and ``hostname``."""
    return await asyncio.to_thread(
        openssl,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(ca),
        "-verify_return_error",
        "-verify_hostname",
        hostname,
        "-servername",
        hostname,
        "-brief",
        stdin="Q\n",
    )
