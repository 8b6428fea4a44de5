"""Acks: signed and queued in the state DB first, then sent over SSH, in order, at least once.

:class:`AckWriter` signs an ack with the agent's identity key and writes it to the state DB
(:meth:`AgentState.enqueue_ack`, which also takes the next ack ``seq``), so neither a controller
outage nor a restart loses it. :class:`AckSender` drains that queue in ``seq`` order with the
``ack`` request on the agent's own SSH connection (batches bounded in count and bytes), as soon
as an ack is queued, and deletes rows only when the controller's reply says they are applied
(its reply comes after its commit). A reply lost on the way sends a batch twice; the controller
keys acks by (agent, seq) and confirms a duplicate without applying it again. The agent needs
no Kafka write access.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ckms._aio import stop_if_cancelled, wait_event
from ckms._backoff import Backoff
from ckms.errors import CKMSError, StoreError, TransportError
from ckms.protocol import (
    KEY_ID_HEADER,
    MAX_ACK_BATCH,
    MAX_ACK_BATCH_BYTES,
    SIGNATURE_HEADER,
    Ack,
    AckReply,
    AckRequest,
    AckStatus,
    EventType,
    HookResult,
    SignedAck,
    encode_event,
)
from ckms.protocol._agent_rpc import MAX_SIGNED_ACK_CHARS
from ckms_agent.state import AgentState, PendingAck

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1024
_FRAMING_BYTES = 32
"""JSON framing of one ack in a request (keys, quotes, commas), counted against the budget."""


class AckWriter:
    """Signs acks with the agent's identity key and queues them in the state DB."""

    def __init__(
        self,
        state: AgentState,
        *,
        identity_key: bytes,
        host_id: str,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self._identity = identity_key
        self._host = host_id
        self._clock = clock
        self._on_queued = on_queued

    async def ack(
        self,
        key: str,
        version: int,
        status: AckStatus,
        *,
        started: float,
        digest: str | None = None,
        hooks: Sequence[HookResult] = (),
        event_id: str | None = None,
        error: str | None = None,
        cert_serial: str | None = None,
        cert_not_after: str | None = None,
    ) -> int:
        """Queue one signed ack (``started``: ``time.monotonic()`` when the work began)."""
        now = self._clock()
        ack = Ack(
            agent=self._host,
            key=key,
            version=version,
            status=status,
            digest=digest,
            hooks=tuple(hooks),
            event_id=event_id,
            elapsed_ms=max(0, int(1000 * (time.monotonic() - started))),
            error=error[:MAX_ERROR_CHARS] if error else None,
            cert_serial=cert_serial,
            cert_not_after=cert_not_after,
        )
        at = datetime.fromtimestamp(now, UTC)
        identity = self._identity
        seq = await self._state.enqueue_ack(
            lambda s: encode_event(EventType.ACK, ack, seq=s, signing_key=identity, at=at),
            key=key,
            version=version,
            status=str(status),
            now=now,
        )
        if self._on_queued is not None:
            self._on_queued()
        log.info(
            "ack seq=%d key=%s version=%d status=%s event=%s host=%s",
            seq,
            key,
            version,
            status,
            event_id,
            self._host,
        )
        return seq

    async def ack_all(
        self,
        key: str,
        versions: Iterable[int],
        status: AckStatus,
        *,
        started: float,
        digests: Mapping[int, str] | None = None,
        hooks: Sequence[HookResult] = (),
        event_id: str | None = None,
        error: str | None = None,
    ) -> set[int]:
        """:meth:`ack` each version (``digests`` by version, where known); return the versions."""
        done = set()
        for version in versions:
            await self.ack(
                key,
                version,
                status,
                started=started,
                digest=(digests or {}).get(version),
                hooks=hooks,
                event_id=event_id,
                error=error,
            )
            done.add(version)
        return done


@dataclass
class AckSenderStats:
    """What the ack sender did since start (``ckms-agent status``, metrics, tests)."""

    sent: int = 0
    """Acks the controller confirmed (applied, or already applied: a duplicate)."""
    refused: int = 0
    failures: int = 0
    last_error: str | None = None


Send = Callable[[AckRequest], Awaitable[AckReply]]


class AckSender:
    """``await sender.run()`` in the agent's task group; ``wakeup()`` after queueing an ack.

    ``send`` makes one ``ack`` request on the controller connection (raising a CKMSError when
    it is down or the request fails); ``connected`` is set while the connection is up. Failures
    are retried with ``backoff``; unconfirmed acks stay queued across outages and restarts and
    go again, in ``seq`` order.
    """

    def __init__(
        self,
        state: AgentState,
        *,
        send: Send,
        connected: asyncio.Event,
        backoff: Backoff,
        host_id: str,
    ) -> None:
        self._state = state
        self._send = send
        self._connected = connected
        self._backoff = backoff
        self._host = host_id
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self.stats = AckSenderStats()

    def wakeup(self) -> None:
        """Say that the queue has new acks."""
        self._drained.clear()
        self._wake.set()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait (bounded) until the queue was found empty; False on timeout."""
        return await wait_event(self._drained, timeout_s)

    async def run(self) -> None:
        """Send until cancelled; a controller outage is waited out, never fatal."""
        while True:
            stop_if_cancelled()
            await self._connected.wait()
            self._wake.clear()  # before reading: an ack queued from now on wakes the wait below
            try:
                more = await self.send_pending()
            except StoreError:
                raise  # the state DB failing stops the agent, as everywhere else
            except CKMSError as exc:
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff.next()
                # The connection going away is routine (the connection task says so, once).
                level = logging.INFO if isinstance(exc, TransportError) else logging.WARNING
                log.log(level, "sending acks failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            if not more and not self._wake.is_set():
                # Every ack queued wakes the sender: nothing came since the read, so the queue
                # is drained without reading it again.
                self._drained.set()
                await self._wake.wait()

    async def send_pending(self) -> bool:
        """Send the oldest batch and forget what the controller confirmed; True if more wait."""
        pending = await self._state.pending_acks(MAX_ACK_BATCH)
        if not pending:
            return False
        batch: list[tuple[int, SignedAck]] = []
        undeliverable: list[int] = []
        size = 0
        for ack in pending:
            signed = _signed(ack)
            if signed is None:
                undeliverable.append(ack.seq)
                continue
            cost = len(signed.value) + len(signed.sig) + len(signed.kid) + _FRAMING_BYTES
            if batch and size + cost > MAX_ACK_BATCH_BYTES:
                break
            batch.append((ack.seq, signed))
            size += cost
        if undeliverable:
            # Bigger than any request may be (a real ack is a few hundred bytes): it could never
            # be sent, and would stop every ack behind it.
            log.error(
                "host=%s: acks %s exceed the request bound; dropped", self._host, undeliverable
            )
            self.stats.refused += len(undeliverable)
            await self._state.delete_acks(undeliverable)
        if not batch:
            return True
        reply = await self._send(AckRequest(acks=tuple(s for _, s in batch)))
        seqs = [seq for seq, _ in batch]
        done = (set(reply.applied) | set(reply.duplicates)) & set(seqs)
        for refused in reply.refused:
            if 0 <= refused.index < len(seqs):
                seq = seqs[refused.index]
                log.error(
                    "host=%s: the controller refused ack seq=%d (%s); dropped",
                    self._host,
                    seq,
                    refused.reason,
                )
                self.stats.refused += 1
                done.add(seq)
        if done:
            await self._state.delete_acks(sorted(done))
        confirmed = len(done) - sum(1 for r in reply.refused if 0 <= r.index < len(seqs))
        self.stats.sent += confirmed
        log.debug("host=%s: %d ack(s) confirmed up to seq %d", self._host, confirmed, seqs[-1])
        if len(done) < len(seqs):
            # The reply left some out: they stay queued and go again after a pause.
            raise _Unconfirmed(f"the controller confirmed {len(done)} of {len(seqs)} acks")
        return len(pending) > len(batch) + len(undeliverable) or len(pending) == MAX_ACK_BATCH


class _Unconfirmed(CKMSError):
    """Raised when an ``ack`` reply does not account for every ack of the batch."""


def _signed(ack: PendingAck) -> SignedAck | None:
    """The queued ack as the ``ack`` request carries it (None if it is too big to carry)."""
    headers = dict(ack.message.headers)
    value = base64.b64encode(ack.message.value).decode("ascii")
    if len(value) > MAX_SIGNED_ACK_CHARS:
        return None
    return SignedAck(
        value=value,
        sig=base64.b64encode(headers[SIGNATURE_HEADER]).decode("ascii"),
        kid=headers[KEY_ID_HEADER].decode("ascii"),
    )
