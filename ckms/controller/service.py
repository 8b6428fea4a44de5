"""The controller as one asyncio service: SSH endpoint, publisher, scheduler, rollouts, anchor.

``Controller(settings)`` opens the store and the vault (sealed); ``run()`` serves until
cancelled, with every loop a task in one ``asyncio.TaskGroup``: the first failure stops the
service and cancellation is a clean stop. Kafka being down is not a failure: the
publisher waits it out while the SSH endpoint keeps serving (hosts' acks arrive over SSH and are
applied meanwhile; their ``fleet.acked`` events wait in the outbox). With
``metrics_listen`` set, Prometheus metrics are served there too (:mod:`ckms.controller.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import socket
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ckms import _gc
from ckms._aio import EventLoop
from ckms._exposition import MetricsEndpoint, parse_listen
from ckms._kafka import TopicSpec
from ckms._kafka_security import KafkaLink, KafkaProtocol, KafkaSecurity
from ckms._secret_file import read_secret_file
from ckms.controller import rowmac
from ckms.controller.admin_rpc import AdminService, Endpoint
from ckms.controller.agent_rpc import AgentService
from ckms.controller.anchor import AuditAnchor
from ckms.controller.approvals import ApprovalBook, DualControl
from ckms.controller.backup import Backups
from ckms.controller.ca import ControllerCA
from ckms.controller.fleet import FleetView
from ckms.controller.hosts import HostRegistry, logs_in_with
from ckms.controller.leader import LeaderLease
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.metrics import ControllerMetrics
from ckms.controller.operators import OperatorRegistry
from ckms.controller.publisher import OutboxPublisher
from ckms.controller.rollouts import RolloutDriver
from ckms.controller.scheduler import Scheduler
from ckms.controller.sealing import Vault
from ckms.controller.workers import ParentLink, RemoteVault, WorkerPool
from ckms.errors import CKMSError, ConfigError, IntegrityError, NotFoundError, ProtocolError
from ckms.protocol import (
    AUDIT_TOPIC,
    EVENTS_TOPIC,
    FLEET_TOPIC,
    OPERATOR_ROLES,
    ControllerApproval,
    Role,
)
from ckms.ssh import (
    ConnectionLimits,
    Principal,
    RefusalBurst,
    RpcServer,
    fingerprint,
    load_or_create_host_key,
    public_key_text,
)
from ckms.store import Clock, Store, StoreURL, format_time, parse_store_url, utc_now
from ckms.store import audit as audit_log

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("ckms")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


VERSION = _version()
"""This controller's version, in its replica heartbeat."""


class ControllerSettings(BaseModel):
    """Everything the controller needs to run, validated once at the edge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path
    store: str | None = None
    """Where the store is: a SQLite file (a path or ``sqlite:PATH``; default:
    ``<home>/controller.db``), or a PostgreSQL database, ``postgresql://user@host:port/db``
    (never with its password: see ``store_password_file``). Controllers naming the same store
    are replicas (one leads, see :mod:`ckms.controller.leader`)."""
    store_password_file: Path | None = None
    """For a PostgreSQL store: a file (mode 0600) holding the password. Unset, the
    ``PGPASSWORD`` environment (or libpq's ``~/.pgpass``) is used."""
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=2222, ge=0, le=65535)
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: KafkaProtocol = KafkaProtocol.SSL
    """``SSL`` (mutual TLS, the default), ``SASL_SSL`` (SCRAM-SHA-512 over TLS, for clusters
    that already use it) or ``PLAINTEXT`` (development only; warns at start)."""
    kafka_ca_file: Path | None = None
    """The CA bundle the brokers' certificates must chain to (default: ``<home>/kafka/ca.pem``)."""
    kafka_cert_file: Path | None = None
    """The controller's client certificate with its chain, ``CN=<name>,OU=ckms-controller``
    (default for SSL: ``<home>/kafka/client.pem``)."""
    kafka_key_file: Path | None = None
    """Its private key (default for SSL: ``<home>/kafka/client.key``)."""
    kafka_sasl_file: Path | None = None
    """For SASL_SSL: a TOML file with ``username`` and ``password`` (never on a command line)."""
    kafka_check_hostname: bool = True
    events_topic: str = EVENTS_TOPIC
    fleet_topic: str = FLEET_TOPIC
    """Where ``fleet.acked`` goes: the hosts' acks the controller applied, signed by it (the
    controller writes it, subscribers read it; agents have no access)."""
    audit_topic: str = AUDIT_TOPIC
    """Where every signed audit checkpoint is published; the newest is the anchor read back on
    start (the controller writes it, auditors read it)."""
    events_partitions: int = Field(default=1, ge=1, le=1000)
    """Partitions of the events topic. One keeps every event in order and is measured best:
    every agent reads every partition, and with several, an event landing on a partition whose
    previous event an agent was still handling waits for that agent's long poll to end (the
    Kafka client fetches each broker with one request at a time), up to the poll length."""
    fleet_partitions: int = Field(default=3, ge=1, le=1000)
    """Partitions of the fleet topic (partitioned by key name, like the events topic)."""
    replication: int = Field(default=1, ge=1, le=5)
    reconcile_interval_s: int = Field(default=300, ge=5)
    rollout_interval_s: float = Field(default=5.0, gt=0, le=3600)
    """How often running rollouts are judged besides after every batch of acks (deadlines,
    hosts going stale)."""
    agent_cert_lifetime_s: int = Field(default=86400, ge=30, le=397 * 86400)
    """How long an agent's Kafka client certificate lives (agents renew at two thirds)."""
    ssh_max_concurrent: int = Field(default=16, ge=1, le=1024)
    """Requests in flight on one SSH connection."""
    ssh_max_connections: int = Field(default=16384, ge=1)
    """SSH connections open at once, in total (each agent keeps one)."""
    ssh_max_unauthenticated_per_source: int = Field(default=16, ge=1)
    """Connections per source address not (yet) authenticated with a known key (enrolling
    agents count here; known keys do not, so a fleet behind one NAT address is not capped)."""
    ssh_max_unauthenticated_share: float = Field(default=0.25, gt=0, le=1)
    """The part of ``ssh_max_connections`` strangers may hold together (from any number of
    addresses; IPv6 counted per /64), so known agents and operators always find room."""
    ssh_refusal_burst: int = Field(default=20, ge=1)
    """Refusals of unknown keys a source may collect at once before its connections are
    dropped on arrival (a penalty), refilled at ``ssh_refusal_rate_per_s``."""
    ssh_refusal_rate_per_s: float = Field(default=0.5, gt=0)
    ssh_refusal_report_s: float = Field(default=10.0, gt=0)
    """A source's refusals are audited as one record once it has been quiet this long (and at
    least every six times this long while it goes on)."""
    ssh_debug: bool = False
    """Let asyncssh log at DEBUG when the log level is DEBUG (off: asyncssh stays at WARNING;
    a redaction filter covers what it logs either way)."""
    reuse_port: bool = False
    replica_name: str | None = Field(default=None, min_length=1, max_length=255)
    """This replica's name in ``ckms status`` (default: the machine's host name and the SSH
    port). Replicas on one store need distinct names."""
    leader_lease_s: float = Field(default=10.0, ge=0.5, le=300)
    """How long the leader lease lasts unless renewed (renewed every third of it): a leader
    that died is replaced within about this long plus a third."""
    ssh_workers: int = Field(default=1, ge=1, le=64)
    """Processes serving SSH (:mod:`ckms.controller.workers`). 1: this process serves SSH
    itself and does everything else too. N > 1: N worker processes serve SSH on the same port
    (``SO_REUSEPORT``, Linux) and this one keeps the publisher, scheduler, anchor and rollouts.
    Raise it when the controller's one core is busy serving agents (a large fleet syncing,
    rotations reaching thousands of hosts at once), up to the cores the controller may use;
    every worker holds its own store connection and caches (tens of MB), and the SSH limits
    below apply per worker. Not yet for tens of thousands of keys: the store cannot say which
    rows another process's commit changed, so after the others' commits (every ack, every
    host seen) each process reloads its whole key view, at most every 50 ms."""
    event_loop: EventLoop = "auto"
    """``uvloop``, or ``auto`` (uvloop when installed: the ``fast`` extra), or ``asyncio``, for
    the controller's processes (``ckms controller run`` and its SSH workers); see
    :func:`ckms._aio.run` for what it measured."""
    metrics_listen: str | None = None
    """``HOST:PORT`` of the Prometheus ``/metrics`` endpoint; unset, none is served."""
    approvals: frozenset[ControllerApproval] = frozenset()
    """Controller-wide operations under dual control: ``ca`` (``ca rotate``, ``ca retire``)
    and ``backup`` (``backup``); each then becomes a request a second admin or custodian
    approves. None by default."""

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_listen(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _kafka_complete(self) -> ControllerSettings:
        try:
            self.kafka_security  # noqa: B018  (built to refuse an incomplete TLS/SASL setting)
        except ValidationError as exc:
            raise ValueError(exc.errors(include_url=False)[0]["msg"]) from None
        return self

    @property
    def kafka_security(self) -> KafkaSecurity:
        """How the controller authenticates to Kafka (files default to ``<home>/kafka/``)."""
        return KafkaSecurity.from_settings(
            protocol=self.kafka_security_protocol,
            directory=self.home / "kafka",
            ca_file=self.kafka_ca_file,
            cert_file=self.kafka_cert_file,
            key_file=self.kafka_key_file,
            sasl_file=self.kafka_sasl_file,
            check_hostname=self.kafka_check_hostname,
        )

    @property
    def kafka(self) -> KafkaLink:
        """Where Kafka is and how to talk to it: what every controller Kafka client uses."""
        return KafkaLink(self.kafka_bootstrap, self.kafka_security)

    @field_validator("store", mode="before")
    @classmethod
    def _store_location(cls, value: object) -> object:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)  # a file path (as code gives it) names a SQLite file
        if isinstance(value, str):
            try:
                parse_store_url(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def store_url(self) -> StoreURL:
        """The store's engine and location (the SQLite file by default)."""
        if self.store is None:
            return StoreURL("sqlite", str(self.home / "controller.db"))
        return parse_store_url(self.store)

    @property
    def db_path(self) -> Path:
        """The controller's SQLite store file; ConfigError for a PostgreSQL store (no file)."""
        url = self.store_url
        if url.engine != "sqlite":
            raise ConfigError(
                "the store is a PostgreSQL database, not a file: back it up and restore it "
                "with PostgreSQL's own tools (pg_dump, pg_restore, replication)"
            )
        return Path(url.target)

    def store_password(self) -> str | None:
        """The PostgreSQL store's password from ``store_password_file`` (refused when others
        may read it), or None (then ``PGPASSWORD`` or ``~/.pgpass`` apply)."""
        if self.store_password_file is None or self.store_url.engine != "postgresql":
            return None
        return read_secret_file(self.store_password_file, "store_password_file")

    async def open_store(self) -> Store:
        """Open (and migrate) the configured store: what the controller and its tools use."""
        url = self.store_url
        return await Store.open(url.target, password=self.store_password())

    @property
    def host_key_path(self) -> Path:
        """The controller's persistent SSH host key."""
        return self.home / "ssh_host_ed25519_key"

    def topic_specs(self) -> list[TopicSpec]:
        """The topics the controller creates at start (idempotent)."""
        return [
            TopicSpec(self.events_topic, self.events_partitions, self.replication),
            TopicSpec(self.fleet_topic, self.fleet_partitions, self.replication),
        ]


class Controller:
    """The controller service; ``async with Controller(settings) as c: await c.run()``."""

    def __init__(
        self,
        settings: ControllerSettings,
        *,
        clock: Clock = utc_now,
        parent: ParentLink | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store: Store | None = None
        self._started = asyncio.Event()
        self._parent = parent
        """Set in an SSH worker process: the link to the controller that started it."""
        self.workers: WorkerPool | None = None
        """The SSH worker processes once running (``ssh_workers`` > 1), else None."""

    async def open(self) -> None:
        """Open the store and build the parts; the vault starts sealed."""
        self.settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = await self.settings.open_store()
        store = self.store
        if self._parent is not None:
            self.vault: Vault = RemoteVault(store, self._parent, clock=self.clock)
        else:
            self.vault = Vault(store, clock=self.clock)
        self.lifecycle = Lifecycle(store, self.vault, clock=self.clock)
        self.hosts = HostRegistry(store, self.vault, clock=self.clock)
        self.ca = ControllerCA(store, self.vault)
        self.host_key = load_or_create_host_key(self.settings.host_key_path)
        self.rpc = RpcServer(
            host_key=self.host_key,
            authenticate=self.authenticate,
            on_refused=self._audit_refusal,
            revalidate=self._revalidate,
            on_refusal_burst=self._audit_refusal_burst,
            limits=ConnectionLimits(
                max_connections=self.settings.ssh_max_connections,
                max_unauthenticated_per_source=self.settings.ssh_max_unauthenticated_per_source,
                max_unauthenticated_share=self.settings.ssh_max_unauthenticated_share,
                refusal_burst=self.settings.ssh_refusal_burst,
                refusal_rate_per_s=self.settings.ssh_refusal_rate_per_s,
                burst_quiet_s=self.settings.ssh_refusal_report_s,
                burst_max_s=6 * self.settings.ssh_refusal_report_s,
            ),
            max_concurrent=self.settings.ssh_max_concurrent,
            clock=self.clock,
            reuse_port=self.settings.reuse_port,
        )
        self.agents = AgentService(
            store,
            self.vault,
            self.lifecycle,
            self.hosts,
            kafka_bootstrap=self.settings.kafka_bootstrap,
            events_topic=self.settings.events_topic,
            reconcile_interval_s=self.settings.reconcile_interval_s,
            clock=self.clock,
            ca=self.ca,
            agent_cert_lifetime=timedelta(seconds=self.settings.agent_cert_lifetime_s),
        )
        self.agents.register(self.rpc)
        self.acks = self.agents.acks
        topics = self.settings.topic_specs()
        self.publisher = OutboxPublisher(
            store,
            self.vault,
            kafka=self.settings.kafka,
            topics=topics,
            topic=self.settings.events_topic,
            fleet_topic=self.settings.fleet_topic,
            clock=self.clock,
        )
        self.vault.anchor = AuditAnchor(
            store,
            self.vault,
            kafka=self.settings.kafka,
            topic=self.settings.audit_topic,
            replication=self.settings.replication,
            clock=self.clock,
        )
        self.scheduler = Scheduler(store, self.vault, self.lifecycle, clock=self.clock)
        self.rollouts = RolloutDriver(
            store,
            self.vault,
            self.lifecycle,
            self.hosts,
            clock=self.clock,
            interval=timedelta(seconds=self.settings.rollout_interval_s),
        )
        self.acks.on_applied = self.rollouts.wake
        self.leader = LeaderLease(
            store,
            name=self.settings.replica_name or socket.gethostname(),
            address=self._listen,
            version=VERSION,
            sealed=lambda: self.vault.sealed,
            ttl=timedelta(seconds=self.settings.leader_lease_s),
            clock=self.clock,
            on_step_down=self._stepped_down,
        )
        self.vault.anchor.leader = self.leader
        if self._parent is not None:
            # The parent runs the publisher and the rollout driver: tell it at once.
            parent = self._parent
            store.add_outbox_listener(lambda: parent.wake("outbox"))
            self.acks.on_applied = lambda: parent.wake("rollouts")
            parent.on_disconnect = lambda name, roles: self.disconnect(
                name, roles=roles, forward=False
            )
        self.operators = OperatorRegistry(store, clock=self.clock)
        self.hosts.on_revoked = self._host_revoked
        self.operators.on_removed = self._operator_removed
        self.dual_control = DualControl(
            ApprovalBook(store, clock=self.clock), self.operators, self.lifecycle
        )
        self.fleet = FleetView(
            store, self.lifecycle, self.hosts, clock=self.clock, rollouts=self.rollouts
        )
        self.admin = AdminService(
            store=store,
            vault=self.vault,
            lifecycle=self.lifecycle,
            hosts=self.hosts,
            operators=self.operators,
            dual_control=self.dual_control,
            fleet=self.fleet,
            rollouts=self.rollouts,
            publisher=self.publisher,
            acks=self.acks,
            endpoint=Endpoint(
                listen=self._listen,
                host_key_fingerprint=self.host_key_fingerprint,
                kafka_bootstrap=self.settings.kafka_bootstrap,
            ),
            backups=Backups(store, self.settings.home, clock=self.clock),
            clock=self.clock,
            ca=self.ca,
            leader=self.leader,
            controller_approvals=self.settings.approvals,
        )
        self.admin.register(self.rpc)
        self.metrics = ControllerMetrics(self)
        self.acks.on_latency = self.metrics.ack_latency.observe
        self.metrics_endpoint: MetricsEndpoint | None = None

    def _host_revoked(self, host_id: str) -> None:
        """Authentication is once per connection: a revoked host loses the connections (and
        channels) it holds at once, as it could not open a new one."""
        self.disconnect(host_id, roles={Role.AGENT})

    def _operator_removed(self, name: str, actor: str) -> None:
        """As for a host; an operator removing themselves keeps the connection asking."""
        if name != actor:
            self.disconnect(name, roles=OPERATOR_ROLES)

    def disconnect(self, name: str, *, roles: Collection[str], forward: bool = True) -> None:
        """Close ``name``'s connections here and, with SSH workers, in every process."""
        self.rpc.disconnect(name, roles=roles)
        if not forward:
            return
        if self._parent is not None:
            self._parent.disconnect(name, roles)
        elif self.workers is not None:
            self.workers.disconnect(name, roles)

    def _listen(self) -> str:
        """``host:port`` of the SSH endpoint (the bound port once listening)."""
        port = self.rpc.port if self.rpc.port is not None else self.settings.listen_port
        if self.workers is not None and self.workers.port is not None:
            port = self.workers.port
        return f"{self.settings.listen_host}:{port}"

    @property
    def host_key_fingerprint(self) -> str:
        """``SHA256:...`` of the SSH host key, for agents to pin at enrollment."""
        return fingerprint(self.host_key)

    @property
    def port(self) -> int:
        """The SSH port once listening."""
        if self.workers is not None and self.workers.port is not None:
            return self.workers.port
        if self.rpc.port is None:
            raise CKMSError("the controller is not listening yet")
        return self.rpc.port

    async def wait_started(self) -> None:
        """Wait until the SSH endpoint listens."""
        await self._started.wait()

    async def authenticate(self, username: str, key: asyncssh.SSHKey) -> Principal | None:
        """Map an SSH login to a principal: an enrolling agent, an agent, or an operator."""
        presented = public_key_text(key)
        fp = fingerprint(key)
        if username == Role.ENROLL:
            # Any key may enroll (the token decides), so it is a stranger with one request.
            return Principal(
                str(Role.ENROLL), Role.ENROLL, fp, presented, known=False, max_requests=1
            )
        host = await self.hosts.authenticate(username, presented)
        if host is not None:
            return Principal(host.id, Role.AGENT, fp, presented)
        role = await self._operator_role(username, presented)
        return None if role is None else Principal(username, role, fp, presented)

    async def _operator_role(self, name: str, presented: str) -> str | None:
        """The role of the enabled operator ``name`` whose key ``presented`` is, else None."""
        assert self.store is not None
        row = await self.store.fetchone(
            "SELECT * FROM operators WHERE name = ? AND disabled = 0", (name,)
        )
        if row is None or " ".join(row["ssh_public_key"].split()[:2]) != presented:
            return None
        try:
            rowmac.check_operator(self.store.row_key, row)
        except IntegrityError as exc:
            log.error("operator %s refused: %s", name, exc)
            return None
        return str(row["role"])

    async def _revalidate(self, principal: Principal) -> str | None:
        """Before each request: an operator is still enabled, with the key and role it
        logged in with. A removal through another replica closes only that replica's
        connections, and a removed operator may be added back with another key or role.
        A host the same way (not revoked, and still the key it logged in with), from the
        cached identity every agent handler reads anyway
        (``HostRegistry.identity``: another process's commit is seen within
        ``FOREIGN_CHECK_S``), so its connection closes after one refusal."""
        if principal.role == Role.ENROLL:
            return None
        if principal.role == Role.AGENT:
            try:
                host, _ = await self.hosts.identity(principal.name)
            except NotFoundError:
                return f"host {principal.name} is not enrolled"
            if host.revoked:
                return f"host {principal.name} is revoked"
            if not logs_in_with(host, principal.public_key):
                # Revoked and enrolled again with a new key through another replica while
                # this connection (the old key's, perhaps a thief's) sat idle.
                return f"host {principal.name} was enrolled again since this connection logged in"
            return None
        if await self._operator_role(principal.name, principal.public_key) == principal.role:
            return None
        return (
            f"operator {principal.name} was removed or changed since this connection "
            "logged in"
        )

    async def _audit_refusal(
        self, principal: Principal | None, method: str, exc: CKMSError
    ) -> None:
        assert self.store is not None
        who = principal.name if principal else "anonymous"
        role = principal.role if principal else "none"
        actor = f"host:{who}" if role == Role.AGENT else who
        async with self.store.write() as tx:
            await audit_log.append(
                tx,
                now=self.clock(),
                actor=actor,
                action=f"rpc.{method}" if not isinstance(exc, ProtocolError) else "rpc.invalid",
                object=f"rpc:{method}",
                outcome="refused",
                details={"role": role, "error": type(exc).__name__, "message": str(exc)[:500]},
            )

    async def _audit_refusal_burst(self, burst: RefusalBurst) -> None:
        """One audit record for a burst of refused strangers from one source, with counts."""
        assert self.store is not None
        async with self.store.write() as tx:
            await audit_log.append(
                tx,
                now=self.clock(),
                actor=f"source:{burst.source}",
                action="ssh.refused",
                object="ssh",
                outcome="refused",
                details={
                    "count": burst.count,
                    "refused": burst.refused,
                    "dropped": burst.dropped,
                    "first_at": format_time(burst.first_at),
                    "last_at": format_time(burst.last_at),
                },
            )

    async def run(self) -> None:
        """Serve until cancelled (one task group: SSH, publisher, scheduler, rollouts, anchor)."""
        if self.store is None:
            await self.open()
        if self._parent is not None:
            await self._run_worker(self._parent)
            return
        # Fail now on a missing or unreadable TLS file, not at the first event.
        await asyncio.to_thread(self.settings.kafka_security.check)
        _gc.settle()  # what lives as long as the controller is never walked by a collection
        if self.settings.ssh_workers > 1:
            self.workers = WorkerPool(
                self,
                self.settings.ssh_workers,
                wake={"outbox": self.publisher.wake, "rollouts": self.rollouts.wake},
                clock=self.clock,
            )
        else:
            await self.rpc.start(self.settings.listen_host, self.settings.listen_port)
        if self.settings.metrics_listen is not None:
            host, port = parse_listen(self.settings.metrics_listen)
            self.metrics_endpoint = MetricsEndpoint(self.metrics.render, host, port)
            try:
                await self.metrics_endpoint.start()
            except CKMSError:
                await self.rpc.close()
                raise
        try:
            async with asyncio.TaskGroup() as group:
                if self.workers is not None:
                    group.create_task(self.workers.run(), name="ssh-workers")
                    await self.workers.started.wait()  # a worker that fails is restarted
                if self.settings.replica_name is None:  # the bound port tells replicas apart
                    self.leader.name = f"{socket.gethostname()}:{self.port}"
                self._started.set()
                log.info(
                    "controller listening on %s:%d (host key %s%s)",
                    self.settings.listen_host,
                    self.port,
                    self.host_key_fingerprint,
                    f", {self.settings.ssh_workers} SSH workers" if self.workers else "",
                )
                group.create_task(self.leader.run(self._lead), name="leader-lease")
        finally:
            await self.rpc.close()
            if self.workers is not None:
                await self.workers.close()
            await self.vault.anchor.close()
            if self.metrics_endpoint is not None:
                await self.metrics_endpoint.close()

    async def _lead(self) -> None:
        """The work that must happen once among replicas, run only by the leader (its
        writes fenced by the lease, see ckms.controller.leader)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.publisher.run(), name="outbox-publisher")
            group.create_task(self.scheduler.run(), name="scheduler")
            group.create_task(self.rollouts.run(), name="rollout-driver")
            group.create_task(self.vault.anchor.run(), name="audit-anchor")

    async def _stepped_down(self) -> None:
        """After the leader-only work stopped: nothing is signed until the next term reads
        the anchor back (another leader may have moved it meanwhile)."""
        await self.vault.anchor.close()
        self.vault.anchor.reset()

    async def _run_worker(self, parent: ParentLink) -> None:
        """An SSH worker's whole life: take the parent's vault state, serve SSH until the
        parent is gone or this process is stopped (``ckms.controller.workers``)."""
        link = asyncio.create_task(parent.serve(), name="parent-link")
        try:
            state = asyncio.create_task(parent.state_received.wait())
            await asyncio.wait([link, state], return_when=asyncio.FIRST_COMPLETED)
            if link.done():
                state.cancel()
                return
            await self.rpc.start(self.settings.listen_host, self.settings.listen_port)
            self._started.set()
            await parent.ready()
            await link
        finally:
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link
            await self.rpc.close()

    async def close(self) -> None:
        """Close the SSH endpoint, the metrics endpoint and the store; safe to call twice."""
        if hasattr(self, "rpc"):
            await self.rpc.close()
        if getattr(self, "metrics_endpoint", None) is not None:
            await self.metrics_endpoint.close()
        store, self.store = self.store, None
        if store is not None:
            await store.close()

    async def __aenter__(self) -> Controller:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def describe(self) -> dict[str, Any]:
        """Where the controller listens and what agents must pin."""
        return {
            "listen": f"{self.settings.listen_host}:{self.rpc.port}",
            "host_key_fingerprint": self.host_key_fingerprint,
            "kafka_bootstrap": self.settings.kafka_bootstrap,
        }
