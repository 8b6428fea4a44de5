"""Test support: a real controller (store in a temp dir, SSH on port 0, real Kafka)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings

PASSPHRASE = "correct horse battery staple for tests"


@contextlib.asynccontextmanager
async def running_controller(
    home: Path, bootstrap: str, events_topic: str, acks_topic: str, **settings: object
) -> AsyncIterator[Controller]:
    """Open, initialise (passphrase), unseal and run a controller; stop it cleanly on exit."""
    controller = Controller(
        ControllerSettings(
            home=home,
            listen_port=0,
            kafka_bootstrap=bootstrap,
            events_topic=events_topic,
            acks_topic=acks_topic,
            partitions=3,
            **settings,  # type: ignore[arg-type]
        )
    )
    await controller.open()
    assert controller.store is not None
    if not (await controller.vault.status()).initialized:
        await init_controller(controller.store, passphrase=PASSPHRASE)
    await controller.vault.unseal_with_passphrase(PASSPHRASE)
    task = asyncio.create_task(controller.run())
    try:
        await asyncio.wait_for(controller.wait_started(), 10)
        yield controller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await controller.close()
