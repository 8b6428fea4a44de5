"""The agent's ack sender over a real state DB: batches in seq order within the request
bounds, forgets only what the controller confirmed, keeps the rest through failures."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms._backoff import Backoff
from ckms.crypto import generate_signing_key
from ckms.errors import RequestTimeoutError
from ckms.protocol import (
    MAX_ACK_BATCH,
    MAX_ACK_BATCH_BYTES,
    AckRefused,
    AckReply,
    AckRequest,
    AckStatus,
)
from ckms_agent.acks import AckSender, AckWriter
from ckms_agent.state import AgentState
from tests.support.waiting import wait_until

HOST = "web-1"
DIGEST = "hmac-sha256:" + "ab" * 32


class Controller:
    """The controller's side of ``ack`` as the sender sees it: answers by a rule per test."""

    def __init__(self) -> None:
        self.requests: list[AckRequest] = []
        self.fail: Exception | None = None
        self.refuse_first = False

    async def send(self, request: AckRequest) -> AckReply:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        seqs = [json.loads(base64.b64decode(a.value))["seq"] for a in request.acks]
        if self.refuse_first:
            self.refuse_first = False
            return AckReply(
                applied=tuple(seqs[1:]), refused=(AckRefused(index=0, reason="bad-signature"),)
            )
        return AckReply(applied=tuple(seqs))

    def sent_seqs(self) -> list[int]:
        return [
            json.loads(base64.b64decode(a.value))["seq"] for r in self.requests for a in r.acks
        ]


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[AgentState]:
    async with AgentState(tmp_path / "state.db") as s:
        yield s


async def _queue(state: AgentState, n: int, *, error: str | None = None) -> None:
    writer = AckWriter(state, identity_key=generate_signing_key(), host_id=HOST)
    for i in range(n):
        await writer.ack(
            "web/tls",
            i + 1,
            AckStatus.INSTALLED,
            started=time.monotonic(),
            digest=DIGEST,
            error=error,
        )


def _sender(state: AgentState, controller: Controller, connected: asyncio.Event) -> AckSender:
    return AckSender(
        state,
        send=controller.send,
        connected=connected,
        backoff=Backoff(0.01, 0.05),
        host_id=HOST,
    )


async def test_a_backlog_goes_in_seq_order_in_bounded_batches(state: AgentState) -> None:
    await _queue(state, 3 * MAX_ACK_BATCH + 5, error="x" * 1000)
    controller, connected = Controller(), asyncio.Event()
    connected.set()
    sender = _sender(state, controller, connected)
    task = asyncio.create_task(sender.run())
    try:
        assert await sender.wait_drained(30)
    finally:
        task.cancel()
    assert controller.sent_seqs() == list(range(1, 3 * MAX_ACK_BATCH + 6))
    for request in controller.requests:
        assert len(request.acks) <= MAX_ACK_BATCH
        size = sum(len(a.value) + len(a.sig) + len(a.kid) for a in request.acks)
        assert size <= MAX_ACK_BATCH_BYTES
        assert len(json.dumps(request.model_dump(mode="json"))) < 32 * 1024
    assert await state.pending_ack_count() == 0
    assert sender.stats.sent == 3 * MAX_ACK_BATCH + 5


async def test_nothing_is_forgotten_until_the_controller_confirms_it(state: AgentState) -> None:
    await _queue(state, 3)
    controller, connected = Controller(), asyncio.Event()
    sender = _sender(state, controller, connected)
    task = asyncio.create_task(sender.run())
    try:
        await asyncio.sleep(0)  # not connected: the sender waits, sends nothing
        assert controller.requests == []
        controller.fail = RequestTimeoutError("ack timed out")  # a reply lost on the way
        connected.set()
        await wait_until(lambda: len(controller.requests) >= 3, 10, "retries")
        assert await state.pending_ack_count() == 3
        controller.fail = None
        assert await sender.wait_drained(10)
        assert await state.pending_ack_count() == 0
        # Sent again after every failure, in the same order: the controller's (agent, seq)
        # rule makes the copies harmless.
        assert controller.sent_seqs()[-3:] == [1, 2, 3]

        # A new ack wakes the sender at once (no polling delay).
        before = len(controller.requests)
        await _queue(state, 1)
        sender.wakeup()
        await wait_until(lambda: len(controller.requests) > before, 5, "the new ack sent")
    finally:
        task.cancel()


async def test_a_refused_ack_is_dropped_so_the_queue_goes_on(state: AgentState) -> None:
    await _queue(state, 2)
    controller, connected = Controller(), asyncio.Event()
    controller.refuse_first = True
    connected.set()
    sender = _sender(state, controller, connected)
    task = asyncio.create_task(sender.run())
    try:
        assert await sender.wait_drained(10)
    finally:
        task.cancel()
    assert await state.pending_ack_count() == 0
    assert (sender.stats.sent, sender.stats.refused) == (1, 1)
