"""Test support for the operator CLI: operator SSH keys in temp dirs, the real ``ckms`` command
as a subprocess against a running controller, and hosts enrolled through the registry."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ckms.controller.service import Controller
from ckms.crypto import (
    generate_signing_key,
    generate_wrapping_keypair,
    signing_public_key,
    signing_public_openssh,
)
from ckms.protocol import Ack, AckStatus, EnrollRequest
from ckms.ssh import generate_ssh_key, public_key_text
from ckms.ssh._keys import write_private_key
from ckms.store import audit as audit_log
from tests.support.acks import send_ack

CLI_TIMEOUT_S = 60.0


class MovableClock:
    """Real UTC time plus an offset that a test moves forward (no sleeping)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@dataclass(frozen=True)
class Person:
    """An operator with an SSH key on disk."""

    name: str
    role: str
    identity: Path
    public_key: str


@dataclass(frozen=True)
class Run:
    """One finished ``ckms`` process."""

    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def make_ssh_key(path: Path) -> tuple[Path, str]:
    """A new Ed25519 SSH key at ``path`` (0600, with ``.pub``); return (path, public line)."""
    key = generate_ssh_key()
    write_private_key(path, key)
    return path, public_key_text(key)


class Operators:
    """Makes operators (key in a temp dir, row in the controller) and runs ``ckms`` as them."""

    def __init__(self, controller: Controller, home: Path) -> None:
        self.controller = controller
        self.home = home
        self.people: dict[str, Person] = {}

    def make_key(self, name: str) -> tuple[Path, str]:
        return make_ssh_key(self.home / "keys" / name)

    async def add(self, name: str, role: str) -> Person:
        path, public = self.make_key(name)
        await self.controller.admin.operators.add(name, role, public, actor="test-setup")
        person = Person(name, role, path, public)
        self.people[name] = person
        return person

    def env(self, who: str | Person | None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CKMS_") or k in ("CKMS_CACHE_DIR",)
        }
        env["CKMS_CONTROLLER"] = f"127.0.0.1:{self.controller.port}"
        env["CKMS_CONTROLLER_FINGERPRINT"] = self.controller.host_key_fingerprint
        env["COLUMNS"] = "200"
        if who is not None:
            person = self.people[who] if isinstance(who, str) else who
            env["CKMS_USER"] = person.name
            env["CKMS_IDENTITY"] = str(person.identity)
        return env

    async def ckms(
        self, *args: str, who: str | Person | None, timeout_s: float = CLI_TIMEOUT_S
    ) -> Run:
        """Run ``python -m ckms.cli ARGS`` as ``who``; bounded by ``timeout_s``."""
        return await run_cli(*args, env=self.env(who), timeout_s=timeout_s)


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = CLI_TIMEOUT_S
) -> Run:
    """Run the real CLI in a subprocess without blocking the test's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ckms.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def audit_records(controller: Controller) -> list[audit_log.AuditRecord]:
    assert controller.store is not None
    return await audit_log.load_records(controller.store)


async def enroll_host(c: Controller, name: str, labels: dict[str, str]) -> bytes:
    """Enroll a host through the registry as the SSH handler would; return its signing key."""
    token = await c.hosts.create_token(name, labels, actor="test-setup")
    signing = generate_signing_key()
    _wrap_private, wrap_public = generate_wrapping_keypair()
    identity = signing_public_openssh(signing_public_key(signing))
    await c.hosts.enroll(
        EnrollRequest(
            token=token.token,
            identity_key=identity,
            signing_key=base64.b64encode(signing_public_key(signing)).decode(),
            wrapping_key=base64.b64encode(wrap_public).decode(),
        ),
        presented_key=identity,
    )
    return signing


async def send_installed_ack(
    c: Controller,
    signer: bytes,
    host: str,
    key: str,
    version: int,
    digest: str | None,
    seq: int,
    *,
    status: AckStatus = AckStatus.INSTALLED,
    error: str | None = None,
) -> None:
    """Send the signed ack an agent sends after installing ``key`` ``version`` (or not), over
    SSH as ``host`` logged in with ``signer``."""
    ack = Ack(
        agent=host,
        key=key,
        version=version,
        status=status,
        digest=digest,
        elapsed_ms=5,
        error=error,
    )
    await send_ack(c, signer, ack, seq)
