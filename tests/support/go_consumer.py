"""Test support: build examples/go-consumer with the real Go toolchain and run it as a process.

The build goes to a temp dir; modules and build cache live under the ckms cache
(``~/.cache/ckms/go`` or ``$CKMS_CACHE_DIR/go``), outside the repository. Without ``go`` on PATH
the tests that need the binary are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckms.devkafka import kafka_cache_dir

MODULE = Path(__file__).resolve().parents[2] / "examples" / "go-consumer"


def go_env() -> dict[str, str]:
    """The environment of every go command: caches outside the repo, go.sum enforced."""
    cache = kafka_cache_dir() / "go"
    return {
        **os.environ,
        "GOMODCACHE": str(cache / "mod"),
        "GOCACHE": str(cache / "build"),
        "GOFLAGS": "-modcacherw -mod=readonly",
        "GOTOOLCHAIN": "local",
    }


@pytest.fixture(scope="session")
def go_consumer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Path of a freshly built ckms-go-consumer binary."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("`go` is not installed: the Go consumer (examples/go-consumer) is not built")
    out = tmp_path_factory.mktemp("go") / "ckms-go-consumer"
    result = subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=MODULE,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"go build failed:\n{result.stdout}\n{result.stderr}"
    yield out


@dataclass
class GoProcess:
    """A running consumer: its stdout lines (parsed when -json) and stderr lines so far."""

    proc: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _pump(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode().rstrip("\n"))
            self._changed.set()

    async def wait_lines(self, n: int, wait_s: float = 30.0) -> list[str]:
        """Wait (bounded) until stdout holds at least ``n`` lines."""

        async def until() -> None:
            while len(self.stdout) < n:
                if self.proc.returncode is not None:
                    raise AssertionError(f"consumer exited: {self.stderr[-20:]}")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)

        try:
            await asyncio.wait_for(until(), wait_s)
        except TimeoutError:
            raise AssertionError(
                f"only {len(self.stdout)} of {n} lines in {wait_s} s; stderr: {self.stderr[-20:]}"
            ) from None
        return self.stdout[:n]

    def records(self) -> list[dict[str, Any]]:
        """The stdout lines of a -json run, parsed."""
        return [json.loads(line) for line in self.stdout]


@contextlib.asynccontextmanager
async def run_go_consumer(binary: Path, *args: str) -> AsyncIterator[GoProcess]:
    """Run the consumer; on exit stop it with SIGTERM (it saves its state) and wait for it."""
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 22,  # a -json line holds a whole event (up to 64 KiB)
    )
    go = GoProcess(proc)
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        asyncio.create_task(go._pump(proc.stdout, go.stdout)),
        asyncio.create_task(go._pump(proc.stderr, go.stderr)),
    ]
    try:
        yield go
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.gather(*pumps, return_exceptions=True)
    assert proc.returncode == 0, f"consumer exited {proc.returncode}: {go.stderr[-20:]}"
