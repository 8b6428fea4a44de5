"""A real controller in its own OS process, for the fault suite (so SIGSTOP and SIGKILL are real).

    python tests/faults/controller_proc.py HOME BOOTSTRAP EVENTS_TOPIC FLEET_TOPIC PORT

Built like ``tests.support.controller.running_controller`` (passphrase init on first start,
unseal, run) with replication 3. Prints one JSON line ``{"port", "fingerprint"}`` on stdout
once it listens; SIGTERM is a clean stop.

Fault hook, for "committed but not yet published": while the file named by
``CKMS_FAULT_HOLD_OUTBOX`` exists, the outbox publisher sends nothing; as soon as it reads at
least as many committed, unsent events as the file says (``fleet.acked`` not counted), the
process stops itself (SIGSTOP) right there, with those rows read from the store and not sent.
The test then SIGKILLs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from ckms._kafka_security import KafkaLink, KafkaSecurity
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.store import outbox

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.controller import PASSPHRASE
from tests.support.kafka import controller_kafka_settings

HOLD_ENV = "CKMS_FAULT_HOLD_OUTBOX"
FREEZE_ENV = "CKMS_FAULT_FREEZE_WITH_BATCH"
"""Split brain: while the file named here exists, the publisher that next reads a batch of
unsent events (signed, in hand, not sent) removes the file and stops itself (SIGSTOP) right
there, outside any write transaction; continued, it goes on to send that batch."""
REPLICA_ENV = "CKMS_FAULT_REPLICA"
"""Replicas: JSON of extra controller settings (``store``, ``replica_name``, ``leader_lease_s``,
``audit_topic``), so several of these processes share one store."""
KAFKA_SECURITY_ENV = "CKMS_FAULT_KAFKA_SECURITY"
"""The controller's Kafka TLS settings (file paths, as JSON): no secret, only where files are."""


def _held_until(hold_file: Path) -> int | None:
    """How many unsent events to wait for before freezing; None when not holding."""
    try:
        return int(hold_file.read_text() or "1")
    except FileNotFoundError:
        return None


def hold_outbox(controller: Controller, hold_file: Path) -> None:
    """Install the fault hook described in the module docstring."""
    publisher = controller.publisher
    publish_pending = publisher.publish_pending

    async def held() -> int:
        want = _held_until(hold_file)
        if want is not None:
            assert controller.store is not None
            pending = await outbox.pending_events(controller.store)
            # Counted: the changes the test commits (hosts' acks may add fleet.acked rows).
            changes = [e for e in pending if e.type != "fleet.acked"]
            if len(changes) < want:
                return 0  # hold: committed, not published
            print(json.dumps({"frozen": [e.seq for e in pending]}), file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen between the commit and the send
        return await publish_pending()

    publisher.publish_pending = held  # type: ignore[method-assign]


def _take(hold_file: Path) -> bool:
    """Remove the file if it is there; True if it was (a quick local call)."""
    try:
        hold_file.unlink()
    except FileNotFoundError:
        return False
    return True


def freeze_with_batch(controller: Controller, hold_file: Path) -> None:
    """Install the split-brain hook described at :data:`FREEZE_ENV`."""
    source = controller.publisher.source
    pending = source.pending

    async def held(limit: int):  # type: ignore[no-untyped-def]
        batch = await pending(limit)
        if batch and _take(hold_file):
            frozen = {"frozen_with": [m.ident for m in batch]}
            print(json.dumps(frozen), file=sys.stderr, flush=True)
            assert controller.store is not None
            # Holding the store's writer lock: no write transaction of this process is open
            # (frozen inside one, it would hold SQLite's file lock and stop every replica's
            # writes until it resumes: docs/architecture.md §8).
            async with controller.store._write_lock:
                os.kill(os.getpid(), signal.SIGSTOP)
        return batch

    source.pending = held  # type: ignore[method-assign]


async def main(home: Path, bootstrap: str, events: str, fleet: str, port: int) -> None:
    controller = Controller(
        ControllerSettings(
            home=home,
            listen_port=port,
            **controller_kafka_settings(  # type: ignore[arg-type]
                KafkaLink(
                    bootstrap, KafkaSecurity.model_validate_json(os.environ[KAFKA_SECURITY_ENV])
                )
            ),
            events_topic=events,
            fleet_topic=fleet,
            replication=3,
            **json.loads(os.environ.get(REPLICA_ENV, "{}")),
        )
    )
    await controller.open()
    try:
        assert controller.store is not None
        if not (await controller.vault.status()).initialized:
            await init_controller(controller.store, passphrase=PASSPHRASE)
        await controller.vault.unseal_with_passphrase(PASSPHRASE)
        if os.environ.get(HOLD_ENV):
            hold_outbox(controller, Path(os.environ[HOLD_ENV]))
        if os.environ.get(FREEZE_ENV):
            freeze_with_batch(controller, Path(os.environ[FREEZE_ENV]))
        task = asyncio.create_task(controller.run())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        await controller.wait_started()
        ready = {"port": controller.port, "fingerprint": controller.host_key_fingerprint}
        print(json.dumps(ready), flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await controller.close()


if __name__ == "__main__":
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    home_arg, bootstrap_arg, events_arg, acks_arg, port_arg = sys.argv[1:6]
    asyncio.run(main(Path(home_arg), bootstrap_arg, events_arg, acks_arg, int(port_arg)))
