"""The benchmark's worker child: many simulated hosts in one process.

Each simulated host is a directory (``<base>/<host>/``) with what a real host would have: the
real agent's config, identity keys and SQLite state DB (``state/``) and the files it installs
(``root/`` stands in for ``/``). The agent is the real ``ckms_agent.daemon.Agent`` with its own
SSH connection, Kafka consumer and producer; only the process is shared.

For the baseline, each host also gets a real asyncssh server of its own (own port, own host key)
that accepts the pusher's key and serves ``cat > PATH`` into the host's root, as sshd + cat would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import asyncssh

from ckms import _gc
from ckms.ssh import Endpoint
from ckms_agent.config import load_config
from ckms_agent.daemon import Agent
from ckms_agent.enroll import enroll


class HostsService:
    """Methods the orchestrator calls in one worker process."""

    def __init__(self, base: str) -> None:
        self.base = Path(base)
        self.hosts: list[str] = []
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.servers: list[asyncssh.SSHAcceptor] = []

    # -- enrollment and agents -----------------------------------------------------------------

    async def enroll(
        self,
        hosts: list[tuple[str, str]],
        ports: list[int],
        fingerprint: str,
        concurrency: int = 16,
    ) -> float:
        """Enroll each host with its token (the real enrollment code); return seconds taken.

        ``ports``: every replica's SSH port (one host key); each host's config names them
        all, as an operator's would, and the SSH client spreads the fleet over them.
        """
        started = time.monotonic()
        gate = asyncio.Semaphore(concurrency)
        endpoints = [Endpoint("127.0.0.1", p) for p in ports]

        async def one(name: str, token: str) -> None:
            async with gate:
                await enroll(
                    controllers=endpoints,
                    token=token,
                    host_key_fingerprint=fingerprint,
                    state_dir=self.base / name / "state",
                    config_path=self.base / name / "agent.toml",
                    root=self.base / name / "root",
                )

        await asyncio.gather(*(one(n, t) for n, t in hosts))
        self.hosts.extend(n for n, _ in hosts)
        return time.monotonic() - started

    def _ready(self, name: str) -> bool:
        agent = self.agents[name]
        return agent.connected and "delivered" in agent.event_stats and agent.reconciles >= 1

    async def start_agents(
        self, env: dict[str, str], batch: int = 250, timeout_s: float = 300.0
    ) -> float:
        """Start every agent, ``batch`` at a time (each batch ready before the next)."""
        started = time.monotonic()
        for i in range(0, len(self.hosts), batch):
            names = self.hosts[i : i + batch]
            for name in names:
                agent = Agent(load_config(self.base / name / "agent.toml", env))
                self.agents[name] = agent
                self.tasks[name] = asyncio.create_task(agent.run(), name=f"agent-{name}")
            deadline = time.monotonic() + timeout_s
            while not all(self._ready(n) for n in names):
                self._raise_failed()
                if time.monotonic() > deadline:
                    waiting = sum(1 for n in names if not self._ready(n))
                    raise TimeoutError(f"{waiting} agents of a batch not ready in {timeout_s} s")
                await asyncio.sleep(0.1)
        # A real agent's process settles its collector once started (ckms_agent.runner) and
        # its heap holds one agent; here it holds every agent of the worker, and a full
        # collection walked all of them (one pass was 0.55 s of a rotation's profile at 1,250
        # agents a worker, every agent of the worker stalled meanwhile).
        _gc.settle()
        return time.monotonic() - started

    def _raise_failed(self) -> None:
        for name, task in self.tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"agent {name} stopped: {task.exception()!r}")

    async def status(self) -> dict[str, Any]:
        """How many agents run, are connected and subscribed; agents that stopped."""
        failed = {
            n: repr(t.exception())
            for n, t in self.tasks.items()
            if t.done() and not t.cancelled() and t.exception() is not None
        }
        return {
            "agents": len(self.agents),
            "ready": sum(1 for n in self.agents if self._ready(n)),
            "failed": dict(list(failed.items())[:5]),
            "failed_count": len(failed),
        }

    async def stop_agents(self) -> None:
        """Stop every agent cleanly (what SIGTERM does)."""
        for agent in self.agents.values():
            agent.stop()
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=120)
        self.agents.clear()
        self.tasks.clear()

    async def read_file(self, host: str, path: str) -> bytes:
        """A file as installed on one host (``path`` as on the host, under its root)."""
        return (self.base / host / "root" / path.lstrip("/")).read_bytes()

    # -- baseline: one real SSH server per host ------------------------------------------------

    async def start_servers(self, authorized_key: str) -> list[tuple[str, int, str]]:
        """Start one asyncssh server per host; return (host, port, host public key) each."""
        authorized = asyncssh.import_authorized_keys(authorized_key)
        out = []
        for name in self.hosts:
            host_key = asyncssh.generate_private_key("ssh-ed25519")
            root = self.base / name / "root"
            acceptor = await asyncssh.create_server(
                asyncssh.SSHServer,
                "127.0.0.1",
                0,
                server_host_keys=[host_key],
                authorized_client_keys=authorized,
                process_factory=_cat_into(root),
                encoding=None,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
            )
            self.servers.append(acceptor)
            port = int(acceptor.sockets[0].getsockname()[1])
            out.append((name, port, host_key.export_public_key("openssh").decode()))
        return out

    async def count_files(self, path: str, sha256: str) -> int:
        """How many hosts hold ``path`` with exactly this content."""
        found = 0
        for name in self.hosts:
            with contextlib.suppress(OSError):
                data = (self.base / name / "root" / path.lstrip("/")).read_bytes()
                found += hashlib.sha256(data).hexdigest() == sha256
        return found

    async def stop_servers(self) -> None:
        """Stop the baseline SSH servers."""
        for acceptor in self.servers:
            acceptor.close()
        for acceptor in self.servers:
            await acceptor.wait_closed()
        self.servers.clear()

    async def close(self) -> None:
        """Stop agents and servers."""
        await self.stop_agents()
        await self.stop_servers()


def _cat_into(root: Path) -> Any:
    """An exec handler that does what ``cat > PATH`` does on the host (PATH under ``root``)."""

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command or ""
        if not command.startswith("cat > "):
            process.stderr.write(b"only `cat > PATH` is served\n")
            process.exit(2)
            return
        target = root / command[len("cat > ") :].strip().lstrip("/")
        data = await process.stdin.read()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            process.stderr.write(f"cat: {exc.strerror}\n".encode())
            process.exit(1)
            return
        process.exit(0)

    return handle
