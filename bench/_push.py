"""The baseline pusher child: what an Ansible/paramiko push script does, as fast as asyncssh can.

For every host: open a **new** SSH connection (verifying that host's key), authenticate with the
operator's key, run ``cat > PATH`` with the key file on stdin, close. ``concurrency`` pushes are
in flight at once.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import asyncssh

from ckms.ssh._client import ENCRYPTION_ALGS


class PushService:
    """Methods the orchestrator calls in one pusher process."""

    async def push(
        self,
        targets: list[tuple[str, int, str]],
        client_key: str,
        path: str,
        data: bytes,
        concurrency: int,
    ) -> dict[str, Any]:
        """Push ``data`` to ``path`` on every target; per-host end times (epoch s) and errors."""
        key = asyncssh.import_private_key(client_key)
        gate = asyncio.Semaphore(concurrency)
        done: dict[str, float] = {}
        errors: dict[str, str] = {}
        usage0 = resource.getrusage(resource.RUSAGE_SELF)

        async def one(host: str, port: int, host_key: str) -> None:
            async with gate:
                try:
                    async with asyncssh.connect(
                        "127.0.0.1",
                        port,
                        username="deploy",
                        client_keys=[key],
                        known_hosts=([asyncssh.import_public_key(host_key)], [], []),
                        agent_path=None,
                        preferred_auth="publickey",
                        encryption_algs=list(ENCRYPTION_ALGS),  # as cheap as the agents'
                        config=[],
                    ) as conn:
                        await conn.run(f"cat > {path}", input=data, check=True, encoding=None)
                    done[host] = time.time()
                except (OSError, asyncssh.Error) as exc:
                    errors[host] = f"{type(exc).__name__}: {exc}"

        started = time.time()
        await asyncio.gather(*(one(*t) for t in targets))
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        return {"started": started, "done": done, "errors": errors, "cpu_s": cpu}
