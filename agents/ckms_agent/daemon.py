"""The host agent daemon: keep this host's keys equal to what the controller wants.

``Agent(config).run()`` is one ``asyncio.TaskGroup`` of:

- **connection**: one pinned SSH connection to the controller, reconnected with jittered
  exponential backoff (never a busy loop); every (re)connect asks for a reconcile;
- **reconcile**: ``sync`` (on start, after reconnect, every reconcile interval, and for relevant
  events; a sync for an event asks for the versions the event names to come back in its reply,
  so a rotation is one request), then per key: fetch every version not held, unwrap it,
  check the digest the controller named (in the sync reply, the fetch reply and the triggering
  event), install through :class:`~ckms_agent.installer.Installer`, remove what is no longer
  wanted, and ack each change;
- **events**: a :class:`~ckms.consumer.Subscriber` from the positions in the state DB (the very
  first run seeds them from the end of the topic *before* the first sync, so nothing falls in
  between); revocations are applied locally at once from the signed event;
- **heartbeat**: report the digests of what is intact on disk; drift triggers a reconcile;
- **staleness**: a key whose policy allows at most N seconds without controller contact is
  removed when that passes (and acked once the controller is back);
- **acks**: drain the state DB's pending-acks queue to the controller over the same SSH
  connection (``ack`` requests; the agent has no Kafka write access).

The first task to fail stops all. Cancelling ``run()`` or calling :meth:`Agent.stop` (SIGTERM)
is a clean stop: an install in progress finishes (files are replaced atomically either way) and
its record and acks are written before the process exits. Key material lives only in the files,
in memory while being installed, and in a per-process cache (so keyrings can be rewritten
without the controller); never in the state DB, logs, or error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, ValidationError

from ckms._aio import stop_if_cancelled, wait_event
from ckms._backoff import Backoff
from ckms._kafka import kafka_errors, partitions_of
from ckms.consumer import Position, Subscriber
from ckms.crypto import signer_key_id
from ckms.errors import (
    CKMSError,
    ControllerUnavailableError,
    KafkaUnavailableError,
    ProtocolError,
    RequestTimeoutError,
    StoreError,
    TransportError,
)
from ckms.protocol import (
    AckReply,
    AckRequest,
    CaRotated,
    CertSignReply,
    CertSignRequest,
    ClientCertReply,
    ClientCertRequest,
    DigestKeyReply,
    DigestKeyRequest,
    Envelope,
    FetchReply,
    FetchRequest,
    HeartbeatReply,
    InstalledVersion,
    SyncReply,
    SyncRequest,
)
from ckms.ssh import RpcClient
from ckms_agent.acks import AckSender, AckWriter
from ckms_agent.certs import CertKeeper, ClientCertKeeper, is_cert_key
from ckms_agent.config import AgentConfig
from ckms_agent.events import RELEVANT_TYPES, EventAction, classify
from ckms_agent.identity import (
    AgentKeys,
    load_digest_key,
    load_keys,
    save_digest_key,
    unwrap_digest_key,
)
from ckms_agent.installer import Installer
from ckms_agent.keyops import KeyOps, Trigger, critical
from ckms_agent.metrics import AgentMetrics
from ckms_agent.plan import plan_changes
from ckms_agent.policy import HostPolicy
from ckms_agent.state import AgentState

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# The stored contact time only matters after a restart (staleness); a stale value errs on the
# safe side (keys removed sooner), and a durable write per request cost more than the request.
_CONTACT_WRITE_EVERY_S = 15.0
_SEED_TIMEOUT_S = 15.0


_RENEWAL_RECHECK_S = 5.0
"""After asking for a renewal sync, how long until the renewal loop looks again."""


class HostRevokedError(CKMSError):
    """Raised when the controller revoked this host: its keys are removed; re-enroll to use it."""


class _StopRequested(Exception):
    """Raised inside the task group to stop every task cleanly (see :meth:`Agent.stop`)."""


class Agent:
    """The ckms host agent; see the module docstring. ``clock`` is wall time (tests move it)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        keys: AgentKeys | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._keys = keys
        self._signer_key_id: str | None = None
        self._installer = Installer(
            host_id=config.host_id, root=config.root, policy=HostPolicy.from_config(config)
        )
        self._revocations: dict[str, asyncio.Task[None]] = {}
        self._state: AgentState | None = None
        self._rpc: RpcClient | None = None
        self._acks: AckSender | None = None
        self._subscriber: Subscriber | None = None
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._events_ready = asyncio.Event()
        self._reconcile_wanted = asyncio.Event()
        self._ops: KeyOps | None = None
        self._certs: CertKeeper | None = None
        self._client_cert: ClientCertKeeper | None = None
        self._cert_wake = asyncio.Event()
        self._triggers: dict[str, Trigger] = {}
        self._desired_keys: set[str] = set()
        self._controller_interval: float | None = None
        self._last_contact: float | None = None
        self._contact_written = 0.0
        self._healthy = False
        self.reconciles = 0
        """Completed reconciles (for tests and metrics)."""
        self.metrics = AgentMetrics(self)

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to stop cleanly (safe from a signal handler on the loop)."""
        self._stop.set()

    @property
    def event_stats(self) -> dict[str, int]:
        """Delivered and dropped events by reason, from the Subscriber (empty before it starts)."""
        return dict(self._subscriber.stats) if self._subscriber is not None else {}

    @property
    def connected(self) -> bool:
        """True while the connection to the controller is up."""
        return self._connected.is_set()

    @property
    def state(self) -> AgentState:
        """The open state DB (only while running)."""
        if self._state is None:
            raise StoreError("the agent is not running")
        return self._state

    async def run(self) -> None:
        """Run until stopped; raises the first fatal error (never a transient one)."""
        cfg = self.config
        if self._keys is None:
            self._keys = load_keys(cfg.identity_key_path, cfg.wrapping_key_path, cfg.wrap_suite)
        # A missing or unreadable Kafka TLS file is a setup error: say so now, not in a retry loop.
        await asyncio.to_thread(cfg.kafka_security.check)
        self._signer_key_id = signer_key_id(self._keys.identity_public)
        async with AgentState(cfg.state_db_path) as state:
            self._state = state
            try:
                if await state.revoked():
                    raise HostRevokedError(
                        f"host {cfg.host_id} was revoked by the controller; "
                        "re-enroll it (ckms-agent enroll --force) to use it again"
                    )
                self._acks = AckSender(
                    state,
                    send=self._send_acks,
                    connected=self._connected,
                    backoff=self._backoff(),
                    host_id=cfg.host_id,
                )
                writer = AckWriter(
                    state,
                    identity_key=self._keys.identity,
                    host_id=cfg.host_id,
                    clock=self._clock,
                    on_queued=self._acks.wakeup,
                )
                self._certs = CertKeeper(
                    state=state,
                    installer=self._installer,
                    acks=writer,
                    host_id=cfg.host_id,
                    bundle_path=cfg.ca_bundle_path,
                    clock=self._clock,
                )
                await self._certs.load()
                self._client_cert = ClientCertKeeper(
                    cert_path=cfg.kafka_client_cert_path,
                    key_path=cfg.kafka_client_key_path,
                    bundle_path=cfg.ca_bundle_path,
                    host_id=cfg.host_id,
                    clock=self._clock,
                )
                self._ops = KeyOps(
                    state=state,
                    installer=self._installer,
                    acks=writer,
                    wrapping_key=self._keys.wrapping,
                    host_id=cfg.host_id,
                    request_reconcile=self._request_reconcile,
                    clock=self._clock,
                    digest_key=load_digest_key(cfg.digest_key_path),
                )
                self._last_contact = await state.last_contact()
                self._ops.sweep_held(await state.keys())
                await self.check_staleness()
                self._rpc = RpcClient(
                    endpoints=cfg.controllers,
                    username=cfg.host_id,
                    client_key=self._keys.ssh_key(),
                    host_key_fingerprint=cfg.host_key_fingerprint,
                    connect_timeout_s=min(cfg.rpc_timeout_s, 10.0),
                    retry_min_s=cfg.reconnect_backoff_min_s,
                    retry_max_s=cfg.reconnect_backoff_max_s,
                    channel=True,  # one framed channel for all its requests (exec fallback)
                )
                log.info(
                    "agent starting host=%s controller=%s allowed_paths=%s hooks=%s",
                    cfg.host_id,
                    cfg.controller_address,
                    [str(p) for p in cfg.allowed_paths],
                    sorted(cfg.hooks),
                )
                if cfg.allow_controller_commands:
                    log.warning(
                        "allow_controller_commands is on: the controller (and anyone who can "
                        "change an install spec there) can run any command on this host as %s",
                        "root" if os.geteuid() == 0 else f"uid {os.geteuid()}",
                    )
                await self._task_group()
            finally:
                pending = list(self._revocations.values())
                if pending:  # each finishes its file work first (a critical section)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                if self._rpc is not None:
                    await self._rpc.close()
                self._state = None
                self._ops = None
                self._certs = None
        log.info("agent stopped host=%s", cfg.host_id)

    async def _task_group(self) -> None:
        assert self._acks is not None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._stop_watch(), name="stop")
                tg.create_task(self._connection_loop(), name="connection")
                tg.create_task(self._reconcile_loop(), name="reconcile")
                tg.create_task(self._event_loop(), name="events")
                tg.create_task(self._heartbeat_loop(), name="heartbeat")
                tg.create_task(self._staleness_loop(), name="staleness")
                tg.create_task(self._renewal_loop(), name="renewal")
                tg.create_task(self._acks.run(), name="acks")
                cfg = self.config
                if cfg.metrics_textfile is not None or cfg.metrics_listen is not None:
                    tg.create_task(self.metrics.run(), name="metrics")
        except BaseExceptionGroup as group:
            # The condition also sees (nested) groups: let those recurse, drop only the stop.
            rest = group.subgroup(lambda e: not isinstance(e, _StopRequested | BaseExceptionGroup))
            if rest is None:
                return
            first = _first_leaf(rest)
            if isinstance(first, CKMSError | KeyboardInterrupt | SystemExit):
                raise first from None
            raise

    async def _stop_watch(self) -> None:
        await self._stop.wait()
        log.info("stop requested: finishing the current step and shutting down")
        raise _StopRequested

    def _backoff(self) -> Backoff:
        return Backoff(self.config.reconnect_backoff_min_s, self.config.reconnect_backoff_max_s)

    # -- controller connection --------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        assert self._rpc is not None
        backoff = self._backoff()
        while True:
            try:
                await self._rpc.connect()
            except TransportError as exc:
                delay = backoff.next()
                log.warning("controller unreachable: %s; next attempt in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._healthy = False
            self._lost.clear()
            self._connected.set()
            log.info("connected to controller %s", self._rpc.endpoint)
            self._request_reconcile()
            await self._until_lost()
            self._connected.clear()
            await self._rpc.close()
            if self._healthy:
                backoff.reset()
            delay = backoff.next()
            log.warning("connection to the controller lost; reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _until_lost(self) -> None:
        """Until the connection or its channel closes, or a request found it broken: woken by
        those events, never by a timer (an idle fleet of agents costs no wake-ups here)."""
        lost = asyncio.ensure_future(self._lost.wait())
        gone = asyncio.ensure_future(self._rpc.wait_lost())
        try:
            await asyncio.wait([lost, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            gone.cancel()

    async def _call(self, method: str, params: BaseModel, reply_type: type[M]) -> M:
        """One request on the open connection; raises TransportError at once when it is down."""
        rpc = self._rpc
        if rpc is None or not rpc.connected or not self._connected.is_set():
            raise TransportError("not connected to the controller")
        try:
            raw = await rpc.call(
                method, params.model_dump(mode="json"), timeout_s=self.config.rpc_timeout_s
            )
        except RequestTimeoutError:
            raise  # the controller is busy; the connection stays (no handshake on every retry)
        except TransportError:
            self._lost.set()
            raise
        except StoreError as exc:
            # The controller's store failed (its database restarting): not this host's state
            # DB, whose StoreError stops the agent. Kept apart so every loop waits it out.
            raise ControllerUnavailableError(f"{method}: {exc}") from None
        try:
            reply = reply_type.model_validate(raw)
        except ValidationError:
            raise ProtocolError(f"the controller sent a malformed {method} reply") from None
        self._healthy = True
        await self._touch_contact()
        return reply

    async def _touch_contact(self) -> None:
        now = self._clock()
        self._last_contact = now
        if abs(now - self._contact_written) >= _CONTACT_WRITE_EVERY_S:
            self._contact_written = now
            await self.state.set_last_contact(now)

    # -- reconcile ------------------------------------------------------------------------------

    def _request_reconcile(self, trigger: Trigger | None = None) -> None:
        if trigger is not None:
            older = self._triggers.get(trigger.key)
            if older is not None:
                trigger.merge(older)
            self._triggers[trigger.key] = trigger
        self._reconcile_wanted.set()

    def _reconcile_interval(self) -> float:
        interval = self.config.reconcile_interval_s
        if self._controller_interval:
            interval = min(interval, self._controller_interval)
        return interval

    async def _reconcile_loop(self) -> None:
        backoff = self._backoff()
        await self._events_ready.wait()
        while True:
            await wait_event(self._reconcile_wanted, self._reconcile_interval())
            await self._connected.wait()
            self._reconcile_wanted.clear()
            triggers, self._triggers = self._triggers, {}
            try:
                await self.reconcile(triggers.values())
                backoff.reset()
            except StoreError:
                raise
            except TransportError as exc:
                self._restore_triggers(triggers)
                if not isinstance(exc, RequestTimeoutError | ControllerUnavailableError):
                    # The connection task reconnects and asks again; the triggers wait for then.
                    log.warning("reconcile interrupted: %s", exc)
                    continue
                # A busy controller (or one whose store is down): ask again after a jittered,
                # growing pause.
                delay = backoff.next()
                log.warning("reconcile timed out: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                self._reconcile_wanted.set()
            except CKMSError as exc:
                delay = backoff.next()
                log.error("reconcile failed: %s; retrying in %.1f s", exc, delay)
                self._restore_triggers(triggers)
                await asyncio.sleep(delay)
                self._reconcile_wanted.set()

    def _restore_triggers(self, triggers: dict[str, Trigger]) -> None:
        for trigger in triggers.values():
            if trigger.key not in self._triggers:
                self._triggers[trigger.key] = trigger

    async def reconcile(self, triggers: Iterable[Trigger] = ()) -> None:
        """Sync with the controller and make the host match its desired state (one pass)."""
        started = time.monotonic()
        by_key = {t.key: t for t in triggers}
        ops = self.ops
        if ops.digest_key is None:
            await self._obtain_digest_key()
        report = await ops.held_report()
        prefetch = ops.prefetch_requests(by_key.values(), await self.state.keys())
        reply = await self._call(
            "sync",
            SyncRequest(
                installed=self._installed(report.installed), fetch=prefetch, want_ca_bundle=True
            ),
            SyncReply,
        )
        if reply.host != self.config.host_id:
            raise ProtocolError(f"sync reply is for host {reply.host!r}, not this host")
        self._desired_keys = {k.key for k in reply.keys}
        self._controller_interval = float(reply.reconcile_interval_s)
        carried = {(m.key, m.version): m for m in reply.material}

        async def fetch(request: FetchRequest) -> FetchReply:
            # What the sync reply carried first (checked like any fetch reply), else ask.
            return carried.pop((request.key, request.version), None) or await self._fetch(request)

        held = await self.state.keys()
        certs = self.certs
        certs.save_bundle(reply.ca_bundle)
        cert_keys = tuple(k for k in reply.keys if is_cert_key(k))
        # tls-cert keys are the certificate keeper's: their key never comes from the controller.
        keyed = reply.model_copy(
            update={"keys": tuple(k for k in reply.keys if not is_cert_key(k))}
        )
        plans = plan_changes(
            keyed, held, drifted=report.drifted, tombstones=frozenset(ops.tombstones)
        )
        acked: dict[str, set[int]] = {}
        # A failed change the controller no longer asks for (what it wants is what the host
        # holds, e.g. a rollout stage rolled back), or that a rollout event asked for anew (a
        # stage resumed), is forgotten: it is tried at once instead of waiting out the hold-off.
        ops.forget_failures(
            except_keys={p.key for p in plans},
            asked_again={t.key for t in by_key.values() if t.retry},
        )
        # A version acked 'failed' and never held that the controller no longer lists (revoked
        # while an outage delayed its event): the host's last word on it becomes 'removed'.
        await ops.settle_failures({k.key: {v.version for v in k.versions} for k in reply.keys})
        # Retried by the periodic reconcile (a little less than its interval, so the next one
        # does retry), or as soon as the key changes.
        retry_after = 0.9 * self._reconcile_interval()
        for plan in plans:
            if ops.holding_off(plan, retry_after):
                log.info(
                    "key=%s host=%s: this change failed recently; not retrying it for %.0f s "
                    "unless the key changes",
                    plan.key,
                    self.config.host_id,
                    retry_after,
                )
                continue
            log.info(
                "key=%s host=%s %s (%s) fetch=%s drop=%s",
                plan.key,
                self.config.host_id,
                plan.action,
                plan.reason,
                list(plan.fetch),
                list(plan.dropped),
            )
            acked[plan.key] = await ops.execute(
                plan, held.get(plan.key), by_key.get(plan.key), fetch
            )
        await ops.answer_triggers(by_key.values(), acked)
        await certs.reconcile(cert_keys, self._cert_sign)
        if self._client_cert is not None:
            await self._client_cert.ensure(self._client_sign)
        self._cert_wake.set()
        self.reconciles += 1
        self.metrics.synced(self._clock())
        log.info(
            "reconciled host=%s keys=%d changes=%d in %.1f ms",
            self.config.host_id,
            len(reply.keys),
            len(plans),
            1000 * (time.monotonic() - started),
        )

    # -- events ---------------------------------------------------------------------------------

    async def _seed_positions(self) -> bool:
        """On the very first run, save the end of every partition as the start (True if seeded)."""
        cfg = self.config
        if await self.state.load_positions(cfg.events_topic):
            return False
        consumer = AIOKafkaConsumer(
            **cfg.kafka.client_args(),
            group_id=None,
            enable_auto_commit=False,
            client_id=f"ckms-agent-{cfg.host_id}-seed",
        )
        try:
            with kafka_errors(f"cannot read the end of {cfg.events_topic}"):
                await consumer.start()
                parts = await partitions_of(cfg.kafka, cfg.events_topic, wait_s=10.0)
                ends = await consumer.end_offsets(
                    [TopicPartition(cfg.events_topic, p) for p in parts]
                )
        finally:
            await consumer.stop()
        await self.state.save_positions(
            cfg.events_topic, {tp.partition: Position(offset, None) for tp, offset in ends.items()}
        )
        log.info(
            "first run: events from the end of %s %s",
            cfg.events_topic,
            {tp.partition: o for tp, o in ends.items()},
        )
        return True

    async def _event_loop(self) -> None:
        cfg = self.config
        backoff = self._backoff()
        first = True
        while True:
            try:
                async with asyncio.timeout(_SEED_TIMEOUT_S):
                    seeded = await self._seed_positions()
                if seeded and not first:
                    # The first sync ran before this start position existed: sync again.
                    self._request_reconcile()
                first = False
                self._events_ready.set()
                async with Subscriber(
                    bootstrap=cfg.kafka_bootstrap,
                    security=cfg.kafka_security,
                    trust={cfg.controller_key_id: cfg.controller_public_key},
                    types=RELEVANT_TYPES,
                    topic=cfg.events_topic,
                    offsets=self.state.offset_store(),
                    start="earliest",
                    fetch_max_wait_ms=cfg.kafka_fetch_max_wait_ms,
                    # An idle loop turn per long poll, not per second: records end the wait.
                    poll_ms=cfg.kafka_fetch_max_wait_ms,
                    client_id=f"ckms-agent-{cfg.host_id}",
                    min_seq=cfg.event_seq_floor,
                ) as subscriber:
                    self._subscriber = subscriber
                    backoff.reset()
                    async for event in subscriber:
                        await self._on_event(event)
            except (KafkaUnavailableError, TimeoutError) as exc:
                first = False
                self._events_ready.set()
                delay = backoff.next()
                log.warning(
                    "event stream unavailable: %s; retrying in %.1f s", exc or "timeout", delay
                )
                await asyncio.sleep(delay)

    async def _on_event(self, event: Envelope) -> None:
        """Act on one verified event; a failure is logged, never fatal (except host revocation)."""
        held = set(await self.state.keys())
        decision = classify(
            event,
            host_id=self.config.host_id,
            labels=self.config.labels,
            held=held,
            desired=self._desired_keys,
            signer_key_id=self._signer_key_id,
        )
        if decision.action is EventAction.IGNORE:
            log.debug("event %s id=%s seq=%d not for this host", event.type, event.id, event.seq)
            return
        self.metrics.event(self._clock() - event.time.timestamp())
        log.info(
            "event %s id=%s seq=%d key=%s versions=%s host=%s -> %s",
            event.type,
            event.id,
            event.seq,
            decision.key,
            list(decision.versions),
            self.config.host_id,
            decision.action,
        )
        if decision.action is EventAction.HOST_REVOKED:
            await self._host_revoked(event)
            return
        if decision.action is EventAction.REFRESH_TRUST:
            # A new CA generation signs now: move every certificate onto it (so the old root
            # can be retired soon), and fetch the new bundle, in one sync.
            assert isinstance(event.data, CaRotated)
            renewing = self.certs.renew_unless_issued_by(event.data.issuing)
            if self._client_cert is not None and self._client_cert.renew_unless_issued_by(
                event.data.issuing
            ):
                renewing += 1
            if renewing:
                log.info(
                    "host=%s: renewing %d certificates on the new CA",
                    self.config.host_id,
                    renewing,
                )
            self._request_reconcile()
            return
        assert decision.key is not None
        if decision.action is EventAction.REMOVE_VERSIONS and self.certs.holds(decision.key):
            # A certificate's version was revoked: its files go now, renewal stops.
            await self.certs.revoke(decision.key, decision.versions, event.id)
            self._request_reconcile()
            return
        if decision.action is EventAction.RECONCILE:
            versions = decision.versions if decision.digests or decision.retry else ()
            self._request_reconcile(
                Trigger(decision.key, event.id, dict(decision.digests), versions, decision.retry)
            )
            return
        key, versions = decision.key, decision.versions
        self.ops.note_revoked(key, versions)
        busy = self._revocations.get(key)
        if busy is None and not self.ops.lock(key).locked():
            await self._revoke(key, versions, decision.primary_version, event.id)
            return
        # The key is being changed (a reload may hang until its timeout): its revocation waits
        # for that, the events of every other key go on. Tombstones already stop a reinstall.
        log.info("key=%s busy: its revocation (event %s) runs when the change ends", key, event.id)

        async def after_busy() -> None:
            if busy is not None:
                with contextlib.suppress(BaseException):
                    await busy
            await self._revoke(key, versions, decision.primary_version, event.id)

        task = asyncio.create_task(after_busy(), name=f"revoke {key}")
        self._revocations[key] = task
        task.add_done_callback(lambda t: self._revocation_done(key, t))

    def _revocation_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._revocations.get(key) is task:
            del self._revocations[key]
        if not task.cancelled() and task.exception() is not None:
            log.critical("key=%s revocation failed: %s", key, task.exception())
            self._request_reconcile()

    async def _revoke(
        self, key: str, versions: tuple[int, ...], primary: int | None, event_id: str
    ) -> None:
        try:
            settled = await critical(self.ops.revoke(key, versions, primary, event_id))
        except StoreError:
            raise
        except CKMSError as exc:
            log.error("key=%s host=%s revocation not applied: %s", key, self.config.host_id, exc)
            settled = False
        if not settled:
            # Removed more than revoked (fail closed), or a primary to fetch: ask the controller.
            self._request_reconcile(Trigger(key, event_id))

    async def _host_revoked(self, event: Envelope) -> None:
        """This host's identity was revoked: drop every key, ack, and stop for good."""
        log.critical(
            "controller revoked host=%s (event %s): removing every key",
            self.config.host_id,
            event.id,
        )
        await self.ops.drop_everything(event.id)
        await self.certs.drop_everything(event.id)
        # The removal acks stay in the state DB as the host's record: the controller takes no
        # request from a revoked host, so there is nothing to wait for before stopping.
        raise HostRevokedError(
            f"host {self.config.host_id} was revoked by the controller; its keys were removed"
        )

    # -- heartbeat and staleness -------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            if not self._connected.is_set():
                continue
            report = await self.ops.held_report()
            try:
                reply = await self._call(
                    "heartbeat",
                    SyncRequest(installed=self._installed(report.installed)),
                    HeartbeatReply,
                )
            except StoreError:
                raise
            except CKMSError as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            recent = self._clock() - self._reconcile_interval()
            drift = {
                k for k in {*reply.drift, *report.drifted} if self.ops.failed_at.get(k, 0) < recent
            }
            if drift:
                log.info(
                    "drift on keys=%s host=%s: reconciling", sorted(drift), self.config.host_id
                )
                self._request_reconcile()

    async def _staleness_loop(self) -> None:
        every = min(self.config.heartbeat_interval_s, 30.0)
        while True:
            await asyncio.sleep(every)
            await self.check_staleness()

    async def check_staleness(self) -> list[str]:
        """Remove keys whose max staleness passed without controller contact; return them."""
        return await self.ops.remove_stale_keys(
            last_contact=self._last_contact,
            default_max_staleness_s=self.config.default_max_staleness_s,
        )

    async def _renewal_loop(self) -> None:
        """Ask for a sync when a certificate is due for renewal (the sync renews it)."""
        while True:
            stop_if_cancelled()
            dues = [self.certs.next_renewal()]
            if self._client_cert is not None:
                dues.append(self._client_cert.renew_at())
            due = min((d for d in dues if d is not None), default=None)
            delay = 60.0 if due is None else min(60.0, max(0.0, due - self._clock()))
            self._cert_wake.clear()
            if delay > 0:
                await wait_event(self._cert_wake, delay)
                continue
            log.info("host=%s: a certificate is due for renewal", self.config.host_id)
            self._request_reconcile()
            # The reconcile sets the wake event; until then (or a failure) look again in a while.
            await wait_event(self._cert_wake, _RENEWAL_RECHECK_S)

    def _installed(self, keyed: Iterable[InstalledVersion]) -> tuple[InstalledVersion, ...]:
        """What the host holds: installed key versions and intact certificates."""
        return (*keyed, *self.certs.installed())

    async def _cert_sign(self, request: CertSignRequest) -> CertSignReply:
        return await self._call("cert_sign", request, CertSignReply)

    async def _client_sign(self, request: ClientCertRequest) -> ClientCertReply:
        return await self._call("client_cert", request, ClientCertReply)

    @property
    def certs(self) -> CertKeeper:
        """The certificate keeper of the running agent."""
        if self._certs is None:
            raise StoreError("the agent is not running")
        return self._certs

    @property
    def ops(self) -> KeyOps:
        """The key operations of the running agent."""
        if self._ops is None:
            raise StoreError("the agent is not running")
        return self._ops

    async def _send_acks(self, request: AckRequest) -> AckReply:
        return await self._call("ack", request, AckReply)

    @property
    def acks(self) -> AckSender:
        """The ack sender of the running agent."""
        if self._acks is None:
            raise StoreError("the agent is not running")
        return self._acks

    async def _fetch(self, request: FetchRequest) -> FetchReply:
        return await self._call("fetch", request, FetchReply)

    async def _obtain_digest_key(self) -> None:
        """Ask for the fleet's digest key once (a host enrolled before digests were keyed)."""
        assert self._keys is not None
        reply = await self._call("digest_key", DigestKeyRequest(), DigestKeyReply)
        key = unwrap_digest_key(self._keys.wrapping, reply.wrapped, host_id=self.config.host_id)
        save_digest_key(self.config.digest_key_path, key)
        self.ops.digest_key = key
        log.info("host=%s received the fleet digest key", self.config.host_id)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
