"""Test support: a real controller (store in a temp dir, SSH on port 0, real Kafka)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_asyncio

from ckms._kafka_security import KafkaLink
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.store import Clock, utc_now
from tests.support.kafka import controller_kafka_settings

PASSPHRASE = "correct horse battery staple for tests"


@contextlib.asynccontextmanager
async def running_controller(
    home: Path,
    kafka: KafkaLink | str,
    events_topic: str,
    fleet_topic: str,
    *,
    clock: Clock = utc_now,
    listen_port: int = 0,
    **settings: object,
) -> AsyncIterator[Controller]:
    """Open, initialise (passphrase), unseal and run a controller; stop it cleanly on exit.

    ``listen_port`` 0 picks a free port; pass the old port to restart a controller in place.
    ``kafka`` is a link (mTLS as the controller) or, for tests without a broker, an address.
    """
    controller = Controller(
        ControllerSettings(
            home=home,
            listen_port=listen_port,
            **controller_kafka_settings(kafka),  # type: ignore[arg-type]
            events_topic=events_topic,
            fleet_topic=fleet_topic,
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
            await _stopped(task, controller)
        finally:
            await controller.close()  # even if run() failed: an open store keeps its thread


NO_KAFKA = "127.0.0.1:9"
"""A broker address nothing listens on: the controller serves SSH while its Kafka work waits."""


@contextlib.asynccontextmanager
async def running_replicas(
    base: Path, kafka: KafkaLink | str = NO_KAFKA, events_topic: str = "e", acks_topic: str = "a"
) -> AsyncIterator[tuple[Controller, Controller]]:
    """Two controllers (replicas) on one SQLite store, with one SSH host key."""
    store = base / "shared" / "controller.db"
    store.parent.mkdir()
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            running_controller(base / "a", kafka, events_topic, acks_topic, store=str(store))
        )
        (base / "b").mkdir(mode=0o700)
        shutil.copy2(a.settings.host_key_path, base / "b" / a.settings.host_key_path.name)
        b = await stack.enter_async_context(
            running_controller(base / "b", kafka, events_topic, acks_topic, store=str(store))
        )
        yield a, b


STOP_TIMEOUT_S = 30.0


async def _stopped(task: asyncio.Task[None], controller: Controller) -> None:
    """Wait (bounded) for a cancelled controller to stop; if it hangs, say where, then fail."""
    done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
    if done:
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
        return
    stacks = [
        _await_chain(other) for other in asyncio.all_tasks() if other is not asyncio.current_task()
    ]
    raise AssertionError(
        f"the controller did not stop within {STOP_TIMEOUT_S:.0f} s; tasks:\n" + "\n".join(stacks)
    )


def _await_chain(task: asyncio.Task[object]) -> str:
    """Where a task waits, every coroutine down its await chain (get_stack shows only one)."""
    lines = [repr(task)]
    coro: object = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines)


@pytest_asyncio.fixture
async def controller(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> AsyncIterator[Controller]:
    """A running, unsealed controller with its own topics on the session Kafka."""
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        audit_topic=unique_topic("audit"),
    ) as c:
        yield c
