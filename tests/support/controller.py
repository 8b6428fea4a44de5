"""Test support: a real controller (store in a temp dir, SSH on port 0, real Kafka)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_asyncio

from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.store import Clock, utc_now

PASSPHRASE = "correct horse battery staple for tests"


@contextlib.asynccontextmanager
async def running_controller(
    home: Path,
    bootstrap: str,
    events_topic: str,
    acks_topic: str,
    *,
    clock: Clock = utc_now,
    listen_port: int = 0,
    **settings: object,
) -> AsyncIterator[Controller]:
    """Open, initialise (passphrase), unseal and run a controller; stop it cleanly on exit.

    ``listen_port`` 0 picks a free port; pass the old port to restart a controller in place.
    """
    controller = Controller(
        ControllerSettings(
            home=home,
            listen_port=listen_port,
            kafka_bootstrap=bootstrap,
            events_topic=events_topic,
            acks_topic=acks_topic,
            partitions=3,
            **settings,  # type: ignore[arg-type]
        ),
        clock=clock,
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
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await controller.close()  # even if run() failed: an open store keeps its thread


@pytest_asyncio.fixture
async def controller(
    tmp_path: Path, kafka_bootstrap: str, unique_topic: Callable[[str], str]
) -> AsyncIterator[Controller]:
    """A running, unsealed controller with its own topics on the session Kafka."""
    async with running_controller(
        tmp_path / "controller",
        kafka_bootstrap,
        unique_topic("events"),
        unique_topic("acks"),
        audit_topic=unique_topic("audit"),
    ) as c:
        yield c
