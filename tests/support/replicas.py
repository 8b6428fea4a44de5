"""Test support: controller replicas on one store, opened but not run, so a test decides when
each one's lease round happens (its clock moves, nothing sleeps)."""

from __future__ import annotations

from pathlib import Path

from ckms._kafka_security import KafkaLink
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.store import Clock
from ckms.store import lease as leases
from tests.support.controller import PASSPHRASE
from tests.support.kafka import controller_kafka_settings
from tests.support.stores import StoreTarget


async def open_replica(
    home: Path,
    store: Path | str,
    clock: Clock,
    name: str,
    *,
    kafka: KafkaLink | str = "127.0.0.1:9",
    lease_s: float = 10.0,
    **settings: object,
) -> Controller:
    """Open (initialising the shared store on first use) and unseal one replica; ``store``
    is a SQLite file or a PostgreSQL URL (with ``store_password_file`` in ``settings``)."""
    c = Controller(
        ControllerSettings(
            home=home,
            store=str(store),
            replica_name=name,
            leader_lease_s=lease_s,
            **controller_kafka_settings(kafka),  # type: ignore[arg-type]
            **settings,  # type: ignore[arg-type]
        ),
        clock=clock,
    )
    await c.open()
    assert c.store is not None
    if not (await c.vault.status()).initialized:
        await init_controller(c.store, passphrase=PASSPHRASE)
    await c.vault.unseal_with_passphrase(PASSPHRASE)
    return c


async def take_lease(c: Controller) -> leases.Fence:
    """One lease round that must make ``c`` the leader; its fence, as the running lease keeps."""
    state = await c.leader._round()
    assert state is not None and state.mine, f"{c.leader.name} did not get the lease: {state}"
    fence = leases.Fence(c.leader.incarnation, state.epoch)
    c.leader.fence = fence  # what the running lease does when it starts the leader work
    return fence


def target_settings(target: StoreTarget) -> dict[str, object]:
    """``open_replica`` arguments for a store test target (tests/support/stores.py)."""
    if target.database is None:
        return {"store": target.location}
    return {"store": target.location, "store_password_file": target.database.password_file}
