"""The benchmark's controller child: a real ``Controller`` (store, SSH, Kafka) in its own process.

Set up as the tests do (passphrase init, unseal, ``run()`` in a task), driven by the orchestrator
through the lifecycle API the admin RPC also calls (rotate, revoke), so what is measured is the
controller's own work and not the CLI's. Several of these on one store are replicas (``store``,
``replica_name``, the first one's SSH host key): the first initialises the store, every one
unseals with the passphrase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
from pathlib import Path
from typing import Any

from ckms.controller.fleet import key_fleet_status
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.protocol import InstallSpec, RevocationReason, Targets

PASSPHRASE = "benchmark passphrase, not a secret"


class ControllerService:
    """Methods the orchestrator calls in the controller process."""

    def __init__(self) -> None:
        self.controller: Controller | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def c(self) -> Controller:
        assert self.controller is not None
        return self.controller

    async def start(
        self,
        home: str,
        bootstrap: str,
        events_topic: str,
        fleet_topic: str,
        partitions: int,
        events_partitions: int,
        kafka: dict[str, str] | None = None,
        ssh_workers: int = 1,
        store: dict[str, str] | None = None,
        replica_name: str | None = None,
        leader_lease_s: float | None = None,
        host_key_from: str | None = None,
    ) -> dict[str, Any]:
        """Open, initialise (a fresh store), unseal and run the controller; return where agents
        reach it. ``store``: the store settings (default: SQLite in ``home``); ``host_key_from``:
        another replica's home, whose SSH host key this one serves too."""
        if host_key_from is not None:
            await asyncio.to_thread(_share_host_key, Path(host_key_from), Path(home))
        replica: dict[str, Any] = dict(store or {})
        if replica_name is not None:
            replica["replica_name"] = replica_name
        if leader_lease_s is not None:
            replica["leader_lease_s"] = leader_lease_s
        controller = Controller(
            ControllerSettings(
                home=Path(home),
                listen_port=0,
                kafka_bootstrap=bootstrap,
                **(kafka or {}),  # type: ignore[arg-type]  # the TLS settings (file paths)
                events_topic=events_topic,
                fleet_topic=fleet_topic,
                fleet_partitions=partitions,
                events_partitions=events_partitions,
                ssh_workers=ssh_workers,
                # Every simulated host enrolls from 127.0.0.1: one source, unlike a real fleet.
                ssh_max_unauthenticated_per_source=4096,
                ssh_refusal_burst=4096,
                **replica,
            )
        )
        await controller.open()
        assert controller.store is not None
        if not (await controller.vault.status()).initialized:
            await init_controller(controller.store, passphrase=PASSPHRASE)
        await controller.vault.unseal_with_passphrase(PASSPHRASE)
        self.controller = controller
        self._task = asyncio.create_task(controller.run())
        await asyncio.wait_for(controller.wait_started(), 30)
        return {
            "port": controller.port,
            "fingerprint": controller.host_key_fingerprint,
            "pid": os.getpid(),
            "replica": controller.leader.name,
        }

    async def leader(self) -> dict[str, Any]:
        """This replica's view of the lease: whether it leads, the epoch, its terms so far."""
        status = self.c.leader.status()
        return {
            "name": status.name,
            "leading": status.leading,
            "epoch": status.epoch,
            "terms": self.c.leader.terms,
        }

    async def signing_key(self) -> bytes:
        """The controller's public event-signing key (what subscribers trust)."""
        return await self.c.vault.public_key()

    async def tokens(self, names: list[str], labels: dict[str, str]) -> list[str]:
        """One enrollment token per host name."""
        out = []
        for name in names:
            token = await self.c.hosts.create_token(name, labels, actor="bench")
            out.append(token.token)
        return out

    async def _last_event(self) -> dict[str, Any]:
        assert self.c.store is not None
        row = await self.c.store.fetchone(
            "SELECT seq, event_id, type, created_at FROM outbox ORDER BY seq DESC LIMIT 1"
        )
        assert row is not None
        return dict(row)

    async def create_key(self, name: str, labels: dict[str, str], path: str) -> dict[str, Any]:
        """Create a keyring-json AES key for every host with ``labels``; return its event."""
        await self.c.lifecycle.create(
            name,
            "aes-256",
            targets=Targets(selectors=(labels,)),
            install=InstallSpec(path=path, format="keyring-json"),
            actor="bench",
        )
        return await self._last_event()

    async def rotate(self, name: str) -> dict[str, Any]:
        """Rotate; return the version and the event (its ``created_at`` is the commit time)."""
        version = await self.c.lifecycle.rotate(name, actor="bench")
        return {"version": version.version, **await self._last_event()}

    async def revoke(self, name: str, version: int) -> dict[str, Any]:
        """Revoke one version as compromised; return the event."""
        await self.c.lifecycle.revoke(
            name, RevocationReason.KEY_COMPROMISE, version=version, actor="bench"
        )
        return await self._last_event()

    async def acked(self, name: str, version: int, status: str) -> list[dict[str, Any]]:
        """The fleet view's rows for one version in one status (host, latency, time)."""
        assert self.c.store is not None
        rows = await self.c.store.fetchall(
            "SELECT f.host_id, f.latency_ms, f.updated_at, f.event_id FROM fleet_state f "
            "JOIN keys k ON k.id = f.key_id WHERE k.name = ? AND f.version = ? AND f.status = ?",
            (name, version, status),
        )
        return [dict(r) for r in rows]

    async def breakdown(self, event_id: str) -> dict[str, Any]:
        """Where one event's time went: commit → sent to Kafka, and each ack's agent-side work."""
        assert self.c.store is not None
        row = await self.c.store.fetchone(
            "SELECT created_at, sent_at FROM outbox WHERE event_id = ?", (event_id,)
        )
        audit = await self.c.store.fetchall(
            "SELECT at, details FROM audit WHERE action = 'fleet.ack' AND details LIKE ?",
            (f'%"event_id":"{event_id}"%',),
        )
        acks = [(r["at"], json.loads(r["details"])) for r in audit]
        return {
            "created_at": row["created_at"] if row else None,
            "sent_at": row["sent_at"] if row else None,
            "agent_elapsed_ms": [d["elapsed_ms"] for _, d in acks if d.get("elapsed_ms")],
            # (agent's ack time, controller's apply time) per ack: same machine, same clock
            "ack_times": [(d["acked_at"], at) for at, d in acks if d.get("acked_at")],
        }

    async def fleet(self, name: str) -> dict[str, int]:
        """``key_fleet_status`` summed up: targeted, converged and failed hosts."""
        assert self.c.store is not None
        status = await key_fleet_status(self.c.store, self.c.lifecycle, self.c.hosts, name)
        return {
            "targeted": len(status),
            "converged": sum(1 for s in status if s.converged),
            "failed": sum(1 for s in status if s.failed),
        }

    async def stats(self) -> dict[str, Any]:
        """Ack service and publisher counters, and this process's own CPU and peak RSS."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "acks_applied": self.c.acks.stats.applied,
            "acks_dropped": self.c.acks.stats.dropped or {},
            "published": self.c.publisher.stats.published,
            "leader_terms": self.c.leader.terms,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_mb": usage.ru_maxrss / 1024,
            "ssh_connections": len(self.c.rpc._connections),
        }

    async def close(self) -> None:
        """Stop the controller cleanly."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.controller is not None:
            await self.controller.close()


def _share_host_key(source_home: Path, home: Path) -> None:
    """Serve the first replica's SSH host key (what agents pin) from ``home`` too."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = "ssh_host_ed25519_key"
    if not (home / key).exists():
        shutil.copy2(source_home / key, home / key)
