"""The audit anchor: the last checkpoint the controller signed, kept outside its database.

The database's owner can cut the audit log and its checkpoints together, so a checkpoint stored
beside the log proves nothing about its tail. The anchor is the newest checkpoint, held in memory
while the controller runs and published on the ``ckms.audit`` topic (one partition, compacted
by signer key id), which the controller writes and auditors read:

- on start (and at the start of each term as leader), :meth:`AuditAnchor.load` first starts
  the anchor's transactional producer, then reads back the newest record this controller
  published
  (record key: its signer key id, so several controllers can share the topic), checks its
  signature, and checks that the stored log extends it (same record at its size, the anchored
  checkpoint row still there, newer checkpoints chaining to it);
- :meth:`AuditAnchor.checkpoint` signs only over a log that extends the anchor, then publishes
  the new checkpoint (if Kafka is down, it stays the anchor in memory and is published later);
- on a mismatch the anchor is **broken**: nothing more is signed, the store refuses every audit
  append (so every operation that must be audited fails), ``ckms status`` says why, and the log
  says so at CRITICAL. Only a restart over a restored log that extends the anchor clears it.

Each anchor is sent in a Kafka transaction under one transactional id per signer key, so
shared by the replicas of one controller (:func:`~ckms._kafka_acls.anchor_transactional_id`;
other controllers on the topic have ids of their own), and read back as committed: the producer a
new leader starts at its term's read-back fences the old leader's, so a leader that froze with
a signed anchor in hand, past its last lease check, cannot commit it after the new leader read
the topic back (an older anchor landing after a newer one would anchor the log at the older
size). What it committed before that producer started is there at the read-back, and the log
extends it. Before starting a producer and before each commit the leader checks its lease in
the store, as the outbox publisher does (``ckms.controller.publisher``).

Until the topic has been read (Kafka down at start), nothing is signed: signing first could put
a signature on a log cut while the controller was stopped. A topic with no record (a new
installation, or a wiped topic) gives no anchor; that is logged, since from here on the
guarantee starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer
from aiokafka.errors import TransactionalIdAuthorizationFailed

from ckms._aio import stop_if_cancelled, wait_event
from ckms._backoff import Backoff
from ckms._kafka import (
    TopicSpec,
    abort_producer,
    ensure_topics,
    kafka_errors,
    kafka_within,
    read_newest,
    wait_delivered,
)
from ckms._kafka_acls import anchor_transactional_id, anchor_transactional_prefix
from ckms._kafka_security import KafkaLink
from ckms.controller.sealing import Vault
from ckms.crypto import signer_key_id
from ckms.errors import AuditAnchorError, KafkaUnavailableError, NotLeaderError
from ckms.store import Clock, Store, require_utc, utc_now
from ckms.store import audit as audit_log
from ckms.store import lease as leases

if TYPE_CHECKING:
    from ckms.controller.leader import LeaderLease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorStatus:
    """What ``ckms status`` shows about the anchor."""

    loaded: bool
    size: int | None
    head: str | None
    published_size: int | None
    broken: str | None


class AuditAnchor:
    """Signs checkpoints only over a log that extends the last one; publishes each one."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        *,
        kafka: KafkaLink | None,
        topic: str,
        replication: int = 1,
        clock: Clock = utc_now,
        delivery_timeout_s: float = 10.0,
    ) -> None:
        self._store = store
        self._vault = vault
        self._kafka = kafka
        self._topic = topic
        self._spec = TopicSpec(topic, 1, replication, (("cleanup.policy", "compact"),))
        self._clock = clock
        self._delivery_timeout_s = delivery_timeout_s
        self._lock = asyncio.Lock()
        self._publishing = asyncio.Lock()
        """One publish at a time: a checkpoint's and the loop's share one producer, and two
        transactions at once on it are an error (and each one's failure aborted the other's)."""
        self._producer: AIOKafkaProducer | None = None
        self.last: audit_log.Anchor | None = None
        self._loaded = asyncio.Event()
        self.loaded = kafka is None  # without a topic there is nothing to read back
        self.published_size: int | None = None
        self.broken: str | None = None
        self.leader: LeaderLease | None = None
        """Set among replicas: only the lease holder signs, and its checkpoint write is fenced
        by the lease (a replica that lost it cannot sign, whichever task asks)."""

    @property
    def loaded(self) -> bool:
        """True once the newest anchor was read back (or there is no topic to read it from)."""
        return self._loaded.is_set()

    @loaded.setter
    def loaded(self, value: bool) -> None:
        if value:
            self._loaded.set()
        else:
            self._loaded.clear()

    def reset(self) -> None:
        """Forget the anchor read back (a leader that stepped down reads it again next term)."""
        self.loaded = self._kafka is None
        self.last = None
        self.published_size = None

    def status(self) -> AnchorStatus:
        """The anchor's state, for ``ckms status``."""
        return AnchorStatus(
            loaded=self.loaded,
            size=None if self.last is None else self.last.size,
            head=None if self.last is None else self.last.head_hash,
            published_size=self.published_size,
            broken=self.broken,
        )

    def _fail(self, problem: str) -> None:
        self.broken = problem
        self._store.audit_blocked = problem
        log.critical(
            "AUDIT LOG DOES NOT EXTEND ITS LAST SIGNED ANCHOR (%s): refusing to sign checkpoints "
            "and every audited operation until the log is restored",
            problem,
        )

    async def load(self) -> None:
        """Read the newest anchor this controller published and check the stored log extends it.

        The producer starts first: from then on no older producer of the id commits, so what
        the read-back finds stays the newest until this replica publishes.
        """
        assert self._kafka is not None
        await ensure_topics(self._kafka, [self._spec])
        public = await self._vault.public_key()
        kid = signer_key_id(public)
        async with self._publishing:
            await self._ensure_producer(kid)
        value = await read_newest(self._kafka, self._topic, key=kid.encode())
        async with self._lock:
            self.loaded = True
            if value is None:
                log.warning(
                    "no audit anchor of %s on %s: the log is trusted as it is now, and anchored "
                    "from the next checkpoint on",
                    kid,
                    self._topic,
                )
                return
            try:
                newest = audit_log.parse_checkpoint_line(value)
            except ValueError:
                self._fail(f"the newest record of {kid} on {self._topic} is not a checkpoint")
                return
            anchor = audit_log.Anchor.of(newest)
            self.last = anchor
            self.published_size = anchor.size
            problem = await audit_log.anchor_problem(self._store, anchor, public)
            if problem is None and not audit_log.is_signed(newest, public):
                problem = f"the anchor on {self._topic} is not signed by this controller's key"
            if problem is not None:
                self._fail(problem)
                return
        log.info("audit anchor loaded from %s: %s", self._topic, anchor)

    async def checkpoint(self) -> audit_log.AuditCheckpoint:
        """Sign and store a checkpoint over a log that extends the anchor, then publish it."""
        self._vault.require_unsealed("sign an audit checkpoint")
        await self._settle()
        async with self._lock:
            if self.broken is not None:
                raise AuditAnchorError(self.broken)
            if not self.loaded:
                raise AuditAnchorError(
                    f"the last audit anchor has not been read back from {self._topic} yet "
                    "(is Kafka reachable?): not signing until it is"
                )
            fence = None
            if self.leader is not None:
                fence = self.leader.fence
                if fence is None:
                    raise NotLeaderError(
                        "this replica does not hold the leader lease: the leader signs checkpoints"
                    )
            try:
                with leases.fenced(fence) if fence is not None else contextlib.nullcontext():
                    cp = await audit_log.checkpoint(
                        self._store,
                        sign=self._vault.sign,
                        public_key=await self._vault.public_key(),
                        now=require_utc(self._clock()),
                        anchor=self.last,
                    )
            except AuditAnchorError as exc:
                self._fail(str(exc))
                raise
            self.last = audit_log.Anchor.of(cp)
        log.info(
            "audit checkpoint signed at size %d%s",
            cp.size,
            "" if fence is None else f" (leader epoch {fence.epoch})",
        )
        await self.publish()
        return cp

    async def _settle(self) -> None:
        """Right after an unseal or a takeover, this replica's lease round and the read-back of
        the anchor are still under way: a checkpoint asked for then (an export, a backup)
        waits for them, bounded, rather than being skipped. A replica that another one leads
        does not wait: it cannot sign."""
        deadline = asyncio.get_running_loop().time() + self._delivery_timeout_s
        leader = self.leader
        if leader is not None and not leader.leading and not leader.led_elsewhere():
            await wait_event(leader.leads, self._delivery_timeout_s)
        if not self.loaded and self.broken is None:
            await wait_event(self._loaded, deadline - asyncio.get_running_loop().time())

    async def publish(self) -> bool:
        """Publish the anchor if the topic does not have it yet; False if Kafka did not take it."""
        async with self._publishing:
            return await self._publish()

    async def _publish(self) -> bool:
        anchor = self.last
        if self._kafka is None or anchor is None or anchor.checkpoint is None:
            return True
        if self.published_size == anchor.size:
            return True
        if self.leader is not None and self.leader.fence is None:
            return False  # only the leader publishes
        committed = False
        try:
            producer = await self._ensure_producer(anchor.checkpoint.signer_key_id)
            what = f"publishing the audit anchor to {self._topic}"
            async with kafka_within(what, self._delivery_timeout_s):
                await producer.begin_transaction()
                future = await producer.send(
                    self._topic,
                    audit_log.checkpoint_line(anchor.checkpoint).encode(),
                    key=anchor.checkpoint.signer_key_id.encode(),
                )
            (error,) = await wait_delivered([future], self._delivery_timeout_s)
            if error is not None:
                with kafka_errors(what):
                    raise error
            # The last word before the commit: a leader that lost its lease meanwhile stops
            # here; one that loses it after this is fenced by the next leader's producer.
            await self._may_send()
            async with kafka_within(what, self._delivery_timeout_s):
                await producer.commit_transaction()
            committed = True
        except KafkaUnavailableError as exc:
            log.warning("audit anchor %s not published yet: %s", anchor, exc)
            return False
        finally:
            if not committed:
                await self.close()  # aborts its transaction: the next producer's start does
        self.published_size = anchor.size
        return True

    async def _may_send(self) -> None:
        """Pass the leader fence in a store transaction (NotLeaderError if the lease is gone);
        a single controller (no lease) always may."""
        fence = None if self.leader is None else self.leader.fence
        if self.leader is not None and fence is None:
            raise NotLeaderError("this replica does not hold the leader lease")
        if fence is not None:
            with leases.fenced(fence):
                async with self._store.write():
                    pass

    async def _ensure_producer(self, kid: str) -> AIOKafkaProducer:
        """The anchor's transactional producer for signer ``kid``, started after a lease check
        (a replica that lost the lease must not start one: it would fence the real leader's).
        Called with ``_publishing`` held."""
        if self._producer is not None:
            return self._producer
        assert self._kafka is not None
        await self._may_send()
        transactional_id = anchor_transactional_id(self._topic, kid)
        producer = AIOKafkaProducer(
            **self._kafka.client_args(),
            acks="all",
            enable_idempotence=True,
            transactional_id=transactional_id,
            client_id="ckms-controller-audit",
        )
        try:
            # Its start waits for a producer id from a transaction coordinator, for as long as
            # none answers: bounded, so an outage is reported.
            async with kafka_within(
                f"connecting to Kafka at {self._kafka.bootstrap}", self._delivery_timeout_s
            ):
                await producer.start()
        except KafkaUnavailableError as exc:
            await abort_producer(producer)
            if isinstance(exc.__cause__, TransactionalIdAuthorizationFailed):
                raise KafkaUnavailableError(
                    f"the broker refuses the controller the audit anchor's transactional id "
                    f"{transactional_id!r}: grant it WRITE and DESCRIBE on the ids prefixed "
                    f"{anchor_transactional_prefix(self._topic)!r} (python -m ckms.devkafka "
                    "acls grants every ckms ACL)"
                ) from exc
            raise
        except BaseException:
            await abort_producer(producer)
            raise
        self._producer = producer
        return producer

    async def run(self) -> None:
        """Read the anchor back (retrying while Kafka is away), then keep it published."""
        if self._kafka is None:
            return
        backoff = Backoff(0.5, 10.0)
        while not self.loaded:
            stop_if_cancelled()
            try:
                await self.load()
            except KafkaUnavailableError as exc:
                delay = backoff.next()
                log.warning("cannot read the audit anchor (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        while True:
            # aiokafka can turn a cancel into a Kafka error that publish() logs and absorbs:
            # without this check the loop slept on forever and the controller never stopped.
            stop_if_cancelled()
            await asyncio.sleep(5.0)
            await self.publish()

    async def close(self) -> None:
        """Stop the producer; safe to call twice."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await abort_producer(producer)  # it suppresses Kafka's and the socket's errors
