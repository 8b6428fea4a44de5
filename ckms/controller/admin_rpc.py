"""What the controller answers operators over SSH: the admin RPC behind the ``ckms`` CLI.

Thin handlers: each validates its typed parameters (:mod:`ckms.protocol.admin`), passes dual
control (:class:`~ckms.controller.approvals.DualControl`), calls one collaborator
(:class:`~ckms.controller.lifecycle.Lifecycle`, :class:`~ckms.controller.hosts.HostRegistry`,
:class:`~ckms.controller.sealing.Vault`, :class:`~ckms.controller.fleet.FleetView`, the operator
registry or the audit log) and converts the result with :mod:`ckms.controller.replies`.

**Roles** (checked on the controller for every request: the route's roles in the SSH server,
then per-operation checks here; refusals raise PermissionDeniedError, which the server's refusal
hook writes to the audit log whether the route or the handler refused):

=================  =========================================================================
role               may call
=================  =========================================================================
``auditor``        read only: ``status``, ``whoami``, ``key.list|show|history``, ``report.*``,
                   ``host.list|show``, ``fleet.status``, ``audit.*``, ``operator.list``,
                   ``request.list|show``
``operator``       the reads, plus ``key.*`` changes and ``host.enroll|label|revoke``, except
                   operations the key's policy puts under dual control (refused)
``custodian``      ``status``, ``whoami``, ``unseal``, ``seal``,
                   ``request.list|show|approve|reject``
``admin``          everything, including ``operator.add|remove`` and ``backup.*``; dual-control
                   operations become requests
``agent``/enroll   nothing here (agent methods only)
=================  =========================================================================

**While sealed** only ``status``, ``whoami``, ``unseal`` and ``seal`` are answered
(:data:`WHILE_SEALED`): operator rows cannot be checked against their MAC until unsealed.
Before the first unseal, ``operator.add`` too (:data:`BEFORE_FIRST_UNSEAL`).

**Dual control**: an operation listed in the key's ``policy.approvals_required`` (destroy and
policy changes by default), and every operator change (``operator.add|remove``), is not run
when an admin asks: a request row is stored (:class:`~ckms.controller.approvals.DualControl`)
and the call is refused with ApprovalRequiredError carrying the request id. A *different* admin
or custodian runs ``request.approve``, which runs the stored operation as the requester with the
actor recorded as ``requester+approver``. Operator changes made while no other admin or
custodian exists (right after ``ckms init``) run directly, since nobody could approve them;
the audit record says so.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from ckms.controller import replies, rowmac
from ckms.controller.approvals import DualControl
from ckms.controller.backup import Backups
from ckms.controller.ca import CaState, ControllerCA
from ckms.controller.fleet import FleetView
from ckms.controller.hosts import HostRegistry
from ckms.controller.leader import LeaderLease
from ckms.controller.lifecycle import Lifecycle, NewKey
from ckms.controller.models import DEFAULT_APPROVALS, Host, Key
from ckms.controller.operators import OperatorRegistry
from ckms.controller.policy import check_usage, default_policy, patch_policy
from ckms.controller.report import Reports
from ckms.controller.rollout_plan import RolloutRequest
from ckms.controller.rollouts import RolloutDriver
from ckms.controller.sealing import Vault
from ckms.controller.transitions import awaits_rollout
from ckms.crypto import KeyType, certificate_info
from ckms.errors import (
    AuditAnchorError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    NotLeaderError,
    PolicyError,
    ProtocolError,
    SealedError,
)
from ckms.protocol import APPROVER_ROLES, ApprovalOperation, ControllerApproval, Gate, Role
from ckms.protocol import admin as api
from ckms.ssh import Principal, RpcServer
from ckms.store import Clock, Store, parse_time, utc_now
from ckms.store import audit as audit_log
from ckms.store import lease as leases

__all__ = ["ROLES", "AdminService", "Endpoint"]

P = TypeVar("P", bound=BaseModel)
K = TypeVar(
    "K",
    bound=api.KeyRef
    | api.KeyVersionParams
    | api.KeyRotateParams
    | api.KeyRevokeParams
    | api.KeyPolicyParams
    | api.KeyTargetsParams
    | api.RolloutResumeParams,
)


def _seconds(value: int | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


_READ = frozenset({Role.ADMIN, Role.OPERATOR, Role.AUDITOR})
_STATUS = _READ | {Role.CUSTODIAN}
_WRITE = frozenset({Role.ADMIN, Role.OPERATOR})
_ADMIN = frozenset({Role.ADMIN})
_VAULT = frozenset({Role.ADMIN, Role.CUSTODIAN})
_REQUESTS = _STATUS
_APPROVE = APPROVER_ROLES

ROLES: dict[str, frozenset[Role]] = {
    "status": _STATUS,
    "whoami": _STATUS,
    "unseal": _VAULT,
    "seal": _VAULT,
    "key.create": _WRITE,
    "key.create_many": _WRITE,
    "key.import": _WRITE,
    "key.list": _READ,
    "key.show": _READ,
    "key.history": _READ,
    "key.rotate": _WRITE,
    "key.activate": _WRITE,
    "key.suspend": _WRITE,
    "key.resume": _WRITE,
    "key.revoke": _WRITE,
    "key.destroy": _WRITE,
    "key.policy": _WRITE,
    "key.targets": _WRITE,
    "host.enroll": _WRITE,
    "host.list": _READ,
    "host.show": _READ,
    "host.label": _WRITE,
    "host.revoke": _WRITE,
    "fleet.status": _READ,
    "ca.show": _READ,
    "ca.crl": _READ,
    "ca.rotate": _ADMIN,
    "ca.retire": _ADMIN,
    "rollout.status": _READ,
    "rollout.list": _READ,
    "rollout.resume": _WRITE,
    "rollout.abort": _WRITE,
    "audit.verify": _READ,
    "audit.tail": _READ,
    "audit.export": _READ,
    "operator.add": _ADMIN,
    "operator.list": _READ,
    "operator.remove": _ADMIN,
    "request.list": _REQUESTS,
    "request.show": _REQUESTS,
    "request.approve": _APPROVE,
    "report.summary": _READ,
    "report.keys": _READ,
    "backup.create": _ADMIN,
    "backup.info": _ADMIN,
    "backup.read": _ADMIN,
    "backup.delete": _ADMIN,
    "request.reject": _APPROVE,
}
"""Every admin method and the roles its route admits (handlers may refuse more)."""

WHILE_SEALED: frozenset[str] = frozenset({"status", "whoami", "unseal", "seal"})
"""The only methods answered while sealed. Operator rows cannot be checked then (their MAC
key comes from the root KEK), so a row the database file's owner added could log in: it gets
no metadata, no audit log and no say in approvals until custodians have unsealed."""

BEFORE_FIRST_UNSEAL: frozenset[str] = frozenset({"operator.add"})
"""Also answered while sealed, but only before the store's first unseal binds its rows (the
init ceremony: the first admin adds the custodians who will unseal). Until then no row is
bound, so nothing an operator row could be trusted for has been checked yet either."""

_VERSION_OPS = (
    ApprovalOperation.ACTIVATE,
    ApprovalOperation.SUSPEND,
    ApprovalOperation.RESUME,
    ApprovalOperation.DESTROY,
)


class _Stats(Protocol):
    connected: bool
    published: int
    failures: int
    last_error: str | None


class Publisher(Protocol):
    """What ``status`` and ``unseal`` need of the outbox publisher."""

    @property
    def stats(self) -> Any: ...

    async def backlog(self) -> int: ...

    def wake(self) -> None: ...


class AckCounts(Protocol):
    """What ``status`` needs of the ack service."""

    @property
    def stats(self) -> Any: ...


@dataclass(frozen=True)
class Endpoint:
    """How operators and agents reach this controller, as ``status`` and ``host.enroll`` say."""

    listen: Callable[[], str]
    host_key_fingerprint: str
    kafka_bootstrap: str


class AdminService:
    """The operator-facing half of the controller's SSH endpoint, over explicit collaborators."""

    def __init__(
        self,
        *,
        store: Store,
        vault: Vault,
        lifecycle: Lifecycle,
        hosts: HostRegistry,
        operators: OperatorRegistry,
        dual_control: DualControl,
        fleet: FleetView,
        rollouts: RolloutDriver,
        publisher: Publisher,
        acks: AckCounts,
        endpoint: Endpoint,
        backups: Backups | None = None,
        clock: Clock = utc_now,
        ca: ControllerCA | None = None,
        leader: LeaderLease | None = None,
        controller_approvals: Collection[ControllerApproval] = frozenset(),
    ) -> None:
        self._controller_approvals = frozenset(controller_approvals)
        self._ca = ca if ca is not None else ControllerCA(store, vault)
        self._leader = leader
        self._rollouts = rollouts
        self._store = store
        self._vault = vault
        self._lifecycle = lifecycle
        self._hosts = hosts
        self.operators = operators
        self.dual = dual_control
        self.requests = dual_control.book
        self._fleet = fleet
        self._publisher = publisher
        self._acks = acks
        self._endpoint = endpoint
        self._backups = backups
        self._clock = clock
        self._reports = Reports(
            store=store,
            vault=vault,
            lifecycle=lifecycle,
            hosts=hosts,
            operators=operators,
            book=dual_control.book,
            fleet=fleet,
            checkpoint=self._checkpoint,
            clock=clock,
        )

    def _now(self) -> datetime:
        return self._clock()

    def register(self, server: RpcServer) -> None:
        """Route every admin method on ``server`` with the roles of :data:`ROLES`."""
        self._route(server, "status", api.Empty, self.status)
        self._route(server, "whoami", api.Empty, self.whoami)
        self._route(server, "unseal", api.UnsealParams, self.unseal, secret_params=True)
        self._route(server, "seal", api.Empty, self.seal)

        self._route(server, "key.create", api.KeyCreateParams, self.key_create)
        self._route(server, "key.create_many", api.KeyCreateManyParams, self.key_create_many)
        self._route(server, "key.import", api.KeyImportParams, self.key_import, secret_params=True)
        self._route(server, "key.list", api.KeyListParams, self.key_list)
        self._route(server, "key.show", api.KeyRef, self.key_show)
        self._route(server, "key.history", api.KeyRef, self.key_history)
        # Key changes: the route gates by the key's policy, then runs the executor an approval
        # of the same request runs too (one table for both).
        gated = self._gated_key
        gated(
            server,
            "key.rotate",
            api.KeyRotateParams,
            ApprovalOperation.ROTATE,
            self._run_rotate,
            prepare=self._stage_rotate,
            secret_params=True,
        )
        for op in _VERSION_OPS:
            gated(
                server,
                f"key.{op}",
                api.KeyVersionParams,
                op,
                self._version_executor(op),
                also=self._rollout_gate if op is ApprovalOperation.ACTIVATE else None,
            )
        gated(server, "key.revoke", api.KeyRevokeParams, ApprovalOperation.REVOKE, self._run_revoke)
        gated(
            server,
            "key.policy",
            api.KeyPolicyParams,
            ApprovalOperation.POLICY,
            self._run_policy,
            check=_policy_named,
        )
        gated(
            server,
            "key.targets",
            api.KeyTargetsParams,
            ApprovalOperation.TARGETS,
            self._run_targets,
        )

        self._route(server, "host.enroll", api.HostEnrollParams, self.host_enroll)
        self._route(server, "host.list", api.HostListParams, self.host_list)
        self._route(server, "host.show", api.HostRef, self.host_show)
        self._route(server, "host.label", api.HostLabelParams, self.host_label)
        self._route(server, "host.revoke", api.HostRef, self.host_revoke)

        self._route(server, "fleet.status", api.FleetStatusParams, self.fleet_status)

        self._route(server, "ca.show", api.Empty, self.ca_show)
        self._route(server, "ca.crl", api.Empty, self.ca_crl)
        self._gated_controller(
            server, "ca.rotate", api.Empty, ControllerApproval.CA, self._run_ca_rotate
        )
        self._gated_controller(
            server, "ca.retire", api.CaRetireParams, ControllerApproval.CA, self._run_ca_retire
        )
        # Rollouts: resuming releases the version further, so it passes the dual control a
        # rotation of the key needs; aborting only withdraws a version that was never primary
        # (the old one stays primary), so it needs the role alone: a rollback is never held up.
        self._route(server, "rollout.status", api.KeyRef, self.rollout_status)
        self._route(server, "rollout.list", api.Empty, self.rollout_list)
        gated(
            server,
            "rollout.resume",
            api.RolloutResumeParams,
            ApprovalOperation.ROTATE,
            self._run_rollout_resume,
            prepare=self._pin_resume,
        )
        self._route(server, "rollout.abort", api.RolloutRef, self.rollout_abort)

        self._route(server, "audit.verify", api.Empty, self.audit_verify)
        self._route(server, "audit.tail", api.AuditTailParams, self.audit_tail)
        self._route(server, "audit.export", api.AuditExportParams, self.audit_export)

        self._route(server, "operator.add", api.OperatorAddParams, self.operator_add)
        self._route(server, "operator.list", api.Empty, self.operator_list)
        self._route(server, "operator.remove", api.OperatorRef, self.operator_remove)

        self._route(server, "request.list", api.RequestListParams, self.request_list)
        self._route(server, "request.show", api.RequestRef, self.request_show)
        self._route(server, "request.approve", api.RequestRef, self.request_approve)
        self._route(server, "request.reject", api.RequestRejectParams, self.request_reject)

        self._route(server, "report.summary", api.Empty, self.report_summary)
        self._route(server, "report.keys", api.ReportKeysParams, self.report_keys)
        self._gated_controller(
            server, "backup.create", api.Empty, ControllerApproval.BACKUP, self._run_backup_create
        )
        self._route(server, "backup.info", api.BackupRef, self.backup_info)
        self._route(server, "backup.read", api.BackupReadParams, self.backup_read)
        self._route(server, "backup.delete", api.BackupRef, self.backup_delete)

        # What an approval may run, as the requester: the same executors a direct call uses.
        dual = self.dual
        dual.register("key.create", api.KeyCreateParams, self._run_create)
        dual.register("key.import", api.KeyImportParams, self._run_import)
        dual.register("operator.add", api.OperatorAddParams, self._run_operator_add)
        dual.register("operator.remove", api.OperatorRef, self._run_operator_remove)

    def _gated_key(
        self,
        server: RpcServer,
        method: str,
        params_model: type[K],
        op: ApprovalOperation,
        run: Callable[[K, str], Awaitable[BaseModel]],
        *,
        check: Callable[[K], None] | None = None,
        prepare: Callable[[Principal, K], Awaitable[K]] | None = None,
        also: Callable[[K], Awaitable[ApprovalOperation | None]] | None = None,
        secret_params: bool = False,
    ) -> None:
        """Route ``method``: check the parameters, pass the key's dual control for ``op``, run.

        ``also`` names a second operation whose dual control the call passes as well (one
        approval of the stored request covers both).

        ``run`` is also what an approval of a stored ``method`` request runs, as the requester.
        ``prepare`` turns the caller's parameters into what is gated, stored and run (imported
        material checked and sealed, so no request row holds it in the clear).
        """

        async def handle(principal: Principal, params: K) -> BaseModel:
            if check is not None:
                check(params)
            if prepare is not None:
                params = await prepare(principal, params)
            await self.dual.key_gate(principal, method, params, params.name, op)
            second = None if also is None else await also(params)
            if second is not None:
                await self.dual.key_gate(principal, method, params, params.name, second)
            return await run(params, principal.name)

        handle.__doc__ = run.__doc__
        self._route(server, method, params_model, handle, secret_params=secret_params)
        self.dual.register(method, params_model, run)

    def _gated_controller(
        self,
        server: RpcServer,
        method: str,
        params_model: type[P],
        operation: ControllerApproval,
        run: Callable[[P, str], Awaitable[BaseModel]],
    ) -> None:
        """Route a controller-wide ``method`` through dual control when the settings list
        ``operation`` (``approvals``); ``run`` is also what an approval of it runs."""

        async def handle(principal: Principal, params: P) -> BaseModel:
            await self.dual.gate(
                principal,
                method,
                params,
                operation=operation,
                required=self._controller_approvals,
                object="ca" if operation is ControllerApproval.CA else "controller",
            )
            return await run(params, principal.name)

        handle.__doc__ = run.__doc__
        self._route(server, method, params_model, handle)
        self.dual.register(method, params_model, run)

    def _route(
        self,
        server: RpcServer,
        method: str,
        params_model: type[P],
        handler: Callable[[Principal, P], Awaitable[BaseModel]],
        roles: Collection[str] | None = None,
        *,
        secret_params: bool = False,
    ) -> None:
        async def serve(principal: Principal, raw: dict[str, Any]) -> BaseModel:
            if (
                method not in WHILE_SEALED
                and self._vault.sealed
                and not (method in BEFORE_FIRST_UNSEAL and not await rowmac.is_bound(self._store))
            ):
                raise SealedError(
                    f"controller is sealed: {method} is refused until it is unsealed "
                    f"(only {', '.join(sorted(WHILE_SEALED))} are answered)"
                )
            # A ValidationError here becomes a ProtocolError naming the bad field (server side).
            return await handler(principal, params_model.model_validate(raw))

        server.route(
            method,
            serve,
            roles=roles if roles is not None else ROLES[method],
            secret_params=secret_params,
        )

    # -- status and sealing ---------------------------------------------------------------

    async def whoami(self, principal: Principal, params: api.Empty) -> api.WhoamiReply:
        """The caller's operator name and role, as the controller authenticated them."""
        return api.WhoamiReply(name=principal.name, role=principal.role)

    async def status(self, principal: Principal, params: api.Empty) -> api.StatusReply:
        """Sealed?, Kafka reachable?, outbox backlog, due rotations, stale hosts, requests."""
        now = self._now()
        seal = await self._vault.status()
        try:
            public: str | None = base64.b64encode(await self._vault.public_key()).decode()
        except NotFoundError:
            public = None
        keys = list((await self._lifecycle.current_keys()).values())
        hosts = await self._hosts.list()
        due = await self._fleet.due(now)
        pub, acks = self._publisher.stats, self._acks.stats
        anchor = self._vault.anchor.status()
        return api.StatusReply(
            now=now,
            initialized=seal.initialized,
            sealed=seal.sealed,
            mode=seal.mode,
            threshold=seal.threshold,
            shares_given=seal.shares_given,
            signer_key_id=seal.signer_key_id,
            signing_public_key=public,
            host_key_fingerprint=self._endpoint.host_key_fingerprint,
            listen=self._endpoint.listen(),
            kafka=api.KafkaStatus(
                bootstrap=self._endpoint.kafka_bootstrap,
                connected=pub.connected,
                published=pub.published,
                failures=pub.failures,
                last_error=pub.last_error,
                backlog=await self._publisher.backlog(),
                acks_applied=acks.applied,
                acks_dropped=dict(acks.dropped or {}),
            ),
            keys=len(keys),
            hosts=sum(1 for h in hosts if not h.revoked),
            hosts_revoked=sum(1 for h in hosts if h.revoked),
            rotations_due=due.rotations,
            due_counts=due.counts,
            activations_due=due.activations,
            deactivations_due=due.deactivations,
            stale_hosts=tuple(await self._fleet.stale_hosts(keys, hosts, now)),
            pending_requests=await self.requests.count_pending(),
            rollouts=tuple(await self._fleet.rollouts()),
            leadership=await self._leadership(now),
            audit_anchor=api.AuditAnchorStatus(
                loaded=anchor.loaded,
                size=anchor.size,
                head=anchor.head,
                published_size=anchor.published_size,
                broken=anchor.broken,
            ),
            cert_warnings=await self._cert_warnings(keys, hosts, now),
        )

    async def _cert_warnings(
        self, keys: list[Key], hosts: list[Host], now: datetime
    ) -> tuple[api.CertWarning, ...]:
        """Host certificates that missed their renewal (see ``ControllerCA.overdue``)."""
        if self._vault.sealed or not any(k.type is KeyType.TLS_CERT for k in keys):
            return ()
        return tuple(
            api.CertWarning(
                host=o.host,
                key=o.key,
                version=o.version,
                serial=o.serial,
                not_after=o.not_after,
                renew_at=o.renew_at,
                expired=o.expired,
            )
            for o in await self._ca.overdue(keys, hosts, now)
        )

    async def unseal(self, principal: Principal, params: api.UnsealParams) -> api.SealReply:
        """Give one custodian share (counted once per custodian identity key) or the passphrase;
        the first unseal by custodians' own keys confirms the custodian set."""
        vault = self._vault
        if params.share is not None:
            progress = await vault.submit_share(
                params.share.get_secret_value(),
                custodian=principal.name,
                key=principal.key_fingerprint,
            )
            given = progress.given
            if not progress.sealed:
                await self.operators.confirm_custodians(progress.contributors)
        else:
            assert params.passphrase is not None
            await vault.unseal_with_passphrase(
                params.passphrase.get_secret_value(), actor=principal.name
            )
            given = 1
        status = await vault.status()
        if not status.sealed:
            self._publisher.wake()  # the outbox may have waited for the signing key
        return api.SealReply(
            sealed=status.sealed,
            mode=status.mode,
            threshold=status.threshold,
            given=status.shares_given if status.sealed else given,
        )

    async def seal(self, principal: Principal, params: api.Empty) -> api.SealReply:
        """Forget the controller's secrets until the next unseal."""
        await self._vault.seal(actor=principal.name)
        status = await self._vault.status()
        replica, others = await self._unsealed_others()
        return api.SealReply(
            sealed=status.sealed,
            mode=status.mode,
            threshold=status.threshold,
            replica=replica,
            unsealed_replicas=others,
        )

    async def _unsealed_others(self) -> tuple[str | None, tuple[str, ...]]:
        """This replica's name and the other replicas alive and unsealed by their last
        heartbeat (an SSH worker answers for its parent's replica: same incarnation)."""
        if self._leader is None:
            return None, ()
        me = self._leader.incarnation
        rows = await leases.read_replicas(self._store)
        name = next((r.name for r in rows if r.incarnation == me), self._leader.name)
        now, stale = self._now(), 3 * self._leader.ttl
        others = tuple(
            r.name
            for r in rows
            if r.incarnation != me
            and r.name != name
            and not r.sealed
            and now - r.last_seen_at <= stale
        )
        return name, others

    # -- keys -----------------------------------------------------------------------------

    async def _key_reply(self, name: str, versions: tuple[int, ...] = ()) -> api.KeyChangeReply:
        key = await self._lifecycle.get(name)
        hosts = await self._lifecycle.hosts_for(name)
        return api.KeyChangeReply(
            key=replies.key_info(key, now=self._now(), hosts_targeted=len(hosts)),
            versions=versions,
        )

    async def _gate_new_key(
        self,
        principal: Principal,
        method: str,
        params: BaseModel,
        policy: api.PolicyPatch,
        name: str,
    ) -> None:
        """A new key's own policy decides whether making it needs a second person (``create``
        under dual control, by default as :data:`DEFAULT_APPROVALS` says)."""
        approvals = policy.approvals_required
        await self.dual.gate(
            principal,
            method,
            params,
            operation=ApprovalOperation.CREATE,
            required=DEFAULT_APPROVALS if approvals is None else approvals,
            object=f"key:{name}",
        )

    async def key_create(
        self, principal: Principal, params: api.KeyCreateParams
    ) -> api.KeyChangeReply:
        """Create a key (a request instead, if its own policy puts ``create`` under approval)."""
        await self._gate_new_key(principal, "key.create", params, params.policy, params.name)
        return await self._run_create(params, principal.name)

    async def key_create_many(
        self, principal: Principal, params: api.KeyCreateManyParams
    ) -> api.KeyCreateManyReply:
        """Create many keys in a few transactions, each sealed, audited and evented.

        A key whose policy puts ``create`` under dual control is refused here (nothing of the
        request is created): it goes through ``key.create`` and its approval, one by one.
        """
        for spec in params.keys:
            approvals = spec.policy.approvals_required
            required = DEFAULT_APPROVALS if approvals is None else approvals
            if str(ApprovalOperation.CREATE) in {str(r) for r in required}:
                raise PolicyError(
                    f"{spec.name} puts create under dual control: create it with key.create, "
                    "which asks for the approval; nothing of this batch was created"
                )
        created = await self._lifecycle.create_many(
            [_new_key(spec) for spec in params.keys], actor=principal.name
        )
        return api.KeyCreateManyReply(created=tuple(created))

    async def _run_create(self, params: api.KeyCreateParams, actor: str) -> api.KeyChangeReply:
        spec = _new_key(params)
        await self._lifecycle.create(
            spec.name,
            spec.type,
            actor=actor,
            usage=spec.usage,
            policy=spec.policy,
            targets=spec.targets,
            install=spec.install,
            secret_length=spec.secret_length,
            secret_alphabet=spec.secret_alphabet,
        )
        return await self._key_reply(params.name, (1,))

    async def key_import(
        self, principal: Principal, params: api.KeyImportParams
    ) -> api.KeyChangeReply:
        """Create a key whose version 1 is the operator's material, checked and converted to
        its canonical encoding (a request instead, if its policy puts ``create`` under
        approval: the request holds the material sealed, never in the clear)."""
        create = _import_as_create(params)
        kt = _key_type(params.type)
        usage = _usage_of(kt, params.usage)
        material = await self._lifecycle.read_import(
            params.name,
            kt,
            usage,
            _file_bytes(params),
            params.format,
            actor=principal.name,
        )
        staged = params.model_copy(
            update={
                "material": None,
                "staged": self._vault.seal_staged("key.import", params.name, kt, usage, material),
            }
        )
        del material
        await self._gate_new_key(principal, "key.import", staged, params.policy, params.name)
        return await self._run_import(staged, principal.name, checked=create)

    async def _run_import(
        self, params: api.KeyImportParams, actor: str, checked: api.KeyCreateParams | None = None
    ) -> api.KeyChangeReply:
        """Create the imported key from staged material (directly, or once approved)."""
        spec = _new_key(checked if checked is not None else _import_as_create(params))
        kt = _key_type(params.type)
        if params.staged is None:
            raise ConfigError("key.import: the stored request holds no material")
        material = self._vault.open_staged(
            "key.import", params.name, kt, _usage_of(kt, params.usage), params.staged
        )
        await self._lifecycle.create(
            spec.name,
            spec.type,
            actor=actor,
            usage=spec.usage,
            policy=spec.policy,
            targets=spec.targets,
            install=spec.install,
            material=material,
        )
        return await self._key_reply(params.name, (1,))

    async def key_list(self, principal: Principal, params: api.KeyListParams) -> api.KeyListReply:
        """One page of keys by name, one line each; ``next`` continues after the last one.

        Pages keep every reply far under the reply bound and the work per request flat, however
        many keys there are (one indexed range read of ``limit`` + 1 keys).
        """
        now = self._now()
        keys = await self._lifecycle.page(params.after, params.limit + 1)
        more = len(keys) > params.limit
        keys = keys[: params.limit]
        summaries = []
        for i, key in enumerate(keys, 1):
            summaries.append(replies.key_summary(key, now=now))
            if i % 100 == 0:
                await asyncio.sleep(0)  # a page is not summarised in one hold of the loop
        return api.KeyListReply(
            keys=tuple(summaries),
            next=keys[-1].name if more else None,
        )

    async def key_show(self, principal: Principal, params: api.KeyRef) -> api.KeyChangeReply:
        """One key with its versions, policy, targets and how many hosts it targets."""
        return await self._key_reply(params.name)

    async def key_history(self, principal: Principal, params: api.KeyRef) -> api.KeyHistoryReply:
        """Every state transition of the key's versions."""
        rows = await self._lifecycle.history(params.name)
        return api.KeyHistoryReply(
            key=params.name, history=tuple(replies.history_entry(row) for row in rows)
        )

    async def _stage_rotate(
        self, principal: Principal, params: api.KeyRotateParams
    ) -> api.KeyRotateParams:
        """A rotation that brings its material: check it against the key and seal it."""
        if params.staged is not None:
            raise ProtocolError("staged material is set by the controller, never by a caller")
        if params.material is None:
            return params
        key = await self._lifecycle.get(params.name)
        usage = key.usage_list
        material = await self._lifecycle.read_import(
            params.name, key.type, usage, _file_bytes(params), params.format, actor=principal.name
        )
        staged = self._vault.seal_staged("key.rotate", key.name, key.type, usage, material)
        del material
        return params.model_copy(update={"material": None, "staged": staged})

    async def _run_rotate(self, params: api.KeyRotateParams, actor: str) -> api.KeyChangeReply:
        """Add a version (primary now, PreActive until the activation delay ends, or until its
        rollout completes); its material is generated, or the operator's (``--import-file``)
        when staged."""
        material = None
        if params.material is not None:
            raise ConfigError("key.rotate: imported material must be checked first")
        if params.staged is not None:
            key = await self._lifecycle.get(params.name)
            material = self._vault.open_staged(
                "key.rotate", key.name, key.type, key.usage_list, params.staged
            )
        plan = None
        if params.rolls_out:
            plan = RolloutRequest(
                stages=params.stages or (100,),
                gate=params.gate or Gate.INSTALLED,
                spread=params.spread,
                deadline=_seconds(params.deadline_s),
                threshold_pct=params.threshold_pct,
                max_failures=params.max_failures,
            )
        version = await self._lifecycle.rotate(
            params.name,
            actor=actor,
            reason=params.reason,
            material=material,
            activate_when=params.activate_when,
            rollout=plan,
        )
        self._rollouts.wake()
        return await self._key_reply(params.name, (version.version,))

    async def rollout_status(
        self, principal: Principal, params: api.KeyRef
    ) -> api.RolloutStatusReply:
        """A key's rollout: stage, state, gate, and the hosts holding it up or failing it."""
        view = await self._rollouts.view(await self._lifecycle.get(params.name))
        return api.RolloutStatusReply(rollout=view.info())

    async def rollout_list(self, principal: Principal, params: api.Empty) -> api.RolloutListReply:
        """Every rollout not ended."""
        return api.RolloutListReply(rollouts=tuple(await self._fleet.rollouts()))

    async def _pin_resume(
        self, principal: Principal, params: api.RolloutResumeParams
    ) -> api.RolloutResumeParams:
        """Name the version rolling out now in what is gated, stored and run."""
        rollout = (await self._lifecycle.get(params.name)).rollout
        if params.version is not None or rollout is None:
            return params
        return params.model_copy(update={"version": rollout.version})

    async def _run_rollout_resume(
        self, params: api.RolloutResumeParams, actor: str
    ) -> api.RolloutStatusReply:
        """Go on with a halted, rolled-back or expired rollout (its stage goes out again)."""
        await self._rollouts.resume(
            params.name,
            actor=actor,
            reason=params.reason,
            deadline=_seconds(params.deadline_s),
            version=params.version,
            max_failures=params.max_failures,
        )
        view = await self._rollouts.view(await self._lifecycle.get(params.name))
        return api.RolloutStatusReply(rollout=view.info())

    async def rollout_abort(
        self, principal: Principal, params: api.RolloutRef
    ) -> api.RolloutStatusReply:
        """Withdraw the stage in progress: its hosts drop the version, the old stays primary."""
        await self._rollouts.abort(params.name, actor=principal.name, reason=params.reason)
        view = await self._rollouts.view(await self._lifecycle.get(params.name))
        return api.RolloutStatusReply(rollout=view.info())

    def _version_executor(
        self, op: ApprovalOperation
    ) -> Callable[[api.KeyVersionParams, str], Awaitable[BaseModel]]:
        change = {
            ApprovalOperation.ACTIVATE: self._lifecycle.activate,
            ApprovalOperation.SUSPEND: self._lifecycle.suspend,
            ApprovalOperation.RESUME: self._lifecycle.resume,
            ApprovalOperation.DESTROY: self._lifecycle.destroy,
        }[op]

        async def run(params: api.KeyVersionParams, actor: str) -> BaseModel:
            await change(params.name, params.version, actor=actor, reason=params.reason)
            return await self._key_reply(params.name, (params.version,))

        run.__doc__ = f"{str(op).capitalize()} one version of a key."

        return run

    async def _rollout_gate(self, params: api.KeyVersionParams) -> ApprovalOperation | None:
        """Activating a version that waits for its rollout releases it to every host at once,
        past the stages: it passes the rotation's dual control, as a resume does."""
        key = await self._lifecycle.get(params.name)
        version = next((v for v in key.versions if v.version == params.version), None)
        if version is not None and awaits_rollout(version.state, version.activation_at):
            return ApprovalOperation.ROTATE
        return None

    async def _run_revoke(self, params: api.KeyRevokeParams, actor: str) -> api.KeyChangeReply:
        """Revoke one version, or every version the KMIP reason applies to."""
        versions = await self._lifecycle.revoke(
            params.name,
            params.reason,
            actor=actor,
            version=params.version,
            message=params.message,
        )
        return await self._key_reply(params.name, tuple(v.version for v in versions))

    async def _run_policy(self, params: api.KeyPolicyParams, actor: str) -> api.KeyChangeReply:
        """Change the policy (under dual control by default)."""
        key = await self._lifecycle.get(params.name)
        policy = patch_policy(key.policy, params.policy)
        await self._lifecycle.set_policy(params.name, policy, actor=actor)
        return await self._key_reply(params.name)

    async def _run_targets(self, params: api.KeyTargetsParams, actor: str) -> api.KeyChangeReply:
        """Replace the key's targets (and optionally its install spec)."""
        await self._lifecycle.set_targets(
            params.name, params.targets, actor=actor, install=params.install
        )
        return await self._key_reply(params.name)

    # -- hosts ----------------------------------------------------------------------------

    async def host_enroll(
        self, principal: Principal, params: api.HostEnrollParams
    ) -> api.HostEnrollReply:
        """A one-time token for a new host, and the host key fingerprint it must pin."""
        token = await self._hosts.create_token(
            params.name, params.labels, actor=principal.name, ttl=timedelta(seconds=params.ttl_s)
        )
        return api.HostEnrollReply(
            host=token.host,
            labels=token.labels,
            token=token.token,
            expires_at=token.expires_at,
            host_key_fingerprint=self._endpoint.host_key_fingerprint,
            listen=self._endpoint.listen(),
        )

    async def host_list(
        self, principal: Principal, params: api.HostListParams
    ) -> api.HostListReply:
        """One page of enrolled hosts by id (revoked ones included); ``next`` continues.

        Pages keep each reply far under the reply bound however large the fleet.
        """
        hosts = await self._hosts.page(params.after, params.limit + 1)
        more = len(hosts) > params.limit
        hosts = hosts[: params.limit]
        return api.HostListReply(
            hosts=tuple(await self._fleet.host_infos(hosts)),
            next=hosts[-1].id if more else None,
        )

    async def host_show(self, principal: Principal, params: api.HostRef) -> api.HostInfo:
        """One host, with the keys that target it."""
        (info,) = await self._fleet.host_infos([await self._hosts.get(params.name)])
        return info

    async def host_label(self, principal: Principal, params: api.HostLabelParams) -> api.HostInfo:
        """Set, unset or replace a host's labels."""
        host = await self._hosts.get(params.name)
        labels = {} if params.replace else dict(host.labels)
        labels.update(params.set)
        for name in params.unset:
            labels.pop(name, None)
        updated = await self._hosts.set_labels(params.name, labels, actor=principal.name)
        (info,) = await self._fleet.host_infos([updated])
        return info

    async def host_revoke(self, principal: Principal, params: api.HostRef) -> api.HostInfo:
        """Revoke a host: its key stops authenticating, a ``host.revoked`` event goes out."""
        revoked = await self._hosts.revoke(params.name, actor=principal.name)
        (info,) = await self._fleet.host_infos([revoked])
        return info

    # -- fleet ----------------------------------------------------------------------------

    async def fleet_status(
        self, principal: Principal, params: api.FleetStatusParams
    ) -> api.FleetStatusReply:
        """Per key: host x version x status x age, converged %, failures and drift first (one
        key, or one page of every key: ``next`` continues); for ``tls-cert`` keys each host's
        newest certificate and its expiry."""
        reply = await self._fleet.fleet_status(params.key, params.limit, params.after)
        if self._vault.sealed:
            return reply
        keys = await self._lifecycle.current_keys()
        if not any(
            (k := keys.get(f.key)) is not None and k.type is KeyType.TLS_CERT for f in reply.keys
        ):
            return reply
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for row in await self._ca.latest():
            at = (str(row["host_id"]), str(row["key_name"]))
            held = newest.get(at)
            if held is None or (row["version"], row["issued_at"]) > (
                held["version"],
                held["issued_at"],
            ):
                newest[at] = row
        out = []
        for fleet in reply.keys:
            hosts = []
            for h in fleet.hosts:
                row = newest.get((h.host, fleet.key))
                if row is not None:
                    h = h.model_copy(
                        update={
                            "cert_serial": row["serial"],
                            "cert_not_after": parse_time(row["not_after"]),
                            "cert_installed": row["installed_at"] is not None,
                        }
                    )
                hosts.append(h)
            out.append(fleet.model_copy(update={"hosts": tuple(hosts)}))
        return reply.model_copy(update={"keys": tuple(out)})

    # -- CA -------------------------------------------------------------------------------

    async def _ca_reply(self, state: CaState) -> api.CaReply:
        trusted = {g.generation for g in state.trusted}
        gens = []
        for g in state.generations:
            root, issuing = (
                certificate_info(g.root.certificate),
                certificate_info(g.issuing.certificate),
            )
            gens.append(
                api.CaGenerationInfo(
                    generation=g.generation,
                    root_fingerprint=root.fingerprint,
                    root_subject=root.subject,
                    root_not_after=root.not_after,
                    issuing_fingerprint=issuing.fingerprint,
                    issuing_subject=issuing.subject,
                    issuing_not_after=issuing.not_after,
                    active=g is state.active,
                    trusted=g.generation in trusted,
                )
            )
        return api.CaReply(generations=tuple(gens), bundle=state.bundle().decode("ascii"))

    async def ca_show(self, principal: Principal, params: api.Empty) -> api.CaReply:
        """The CA's generations and the trust bundle hosts hold."""
        return await self._ca_reply(await self._ca.state())

    async def ca_crl(self, principal: Principal, params: api.Empty) -> api.CrlReply:
        """A CRL per trusted generation listing the revoked, unexpired host certificates."""
        pem, serials = await self._ca.crl(now=self._now())
        return api.CrlReply(crl=pem.decode("ascii"), serials=serials)

    async def _run_ca_rotate(self, params: api.Empty, actor: str) -> api.CaReply:
        """Add a CA generation that signs from now on; the previous root stays trusted."""
        state = await self._ca.rotate(now=self._now(), actor=actor)
        self._publisher.wake()
        return await self._ca_reply(state)

    async def _run_ca_retire(self, params: api.CaRetireParams, actor: str) -> api.CaReply:
        """Stop trusting every CA generation but the active one (end of the overlap)."""
        state = await self._ca.retire(now=self._now(), actor=actor, force=params.force)
        self._publisher.wake()
        return await self._ca_reply(state)

    async def _leadership(self, now: datetime) -> api.LeadershipStatus | None:
        """Every replica's heartbeat and the lease, for ``ckms status``."""
        if self._leader is None:
            return None
        mine = self._leader.status()
        lease = await leases.read_lease(self._store)
        stale = 3 * self._leader.ttl
        replicas = tuple(
            api.ReplicaInfo(
                name=r.name,
                address=r.address,
                version=r.version,
                sealed=r.sealed,
                last_seen_at=r.last_seen_at,
                leader=lease is not None
                and r.incarnation == lease.holder
                and lease.expires_at > now,
                alive=now - r.last_seen_at <= stale,
            )
            for r in await leases.read_replicas(self._store)
        )
        return api.LeadershipStatus(
            replica=mine.name,
            # An SSH worker never runs the lease: it leads when its parent process does.
            leading=mine.leading
            or (
                lease is not None
                and lease.holder == self._leader.incarnation
                and lease.expires_at > now
            ),
            leader=None if lease is None else lease.holder_name,
            epoch=None if lease is None else lease.epoch,
            expires_at=None if lease is None else lease.expires_at,
            replicas=replicas,
        )

    # -- audit ----------------------------------------------------------------------------

    async def _checkpoint(self) -> int | None:
        """Sign a checkpoint of the log as it is now (None while sealed, on a replica that does
        not lead, or while the anchor forbids signing: the verification that follows says why)."""
        if self._vault.sealed:
            return None
        try:
            return (await self._vault.checkpoint_audit()).size
        except (AuditAnchorError, NotLeaderError):
            return None

    async def audit_verify(self, principal: Principal, params: api.Empty) -> api.AuditVerifyReply:
        """Checkpoint the log (when unsealed), then verify chain, every checkpoint and the
        checkpoint chain, and the log against the anchor the controller holds."""
        size = await self._checkpoint()
        anchor = self._vault.anchor
        report = await audit_log.verify_store(
            self._store, await self._vault.public_key(), anchor=anchor.last
        )
        if report.ok and anchor.broken is not None:
            report = report.model_copy(update={"ok": False, "reason": anchor.broken})
        if report.ok and not self._vault.sealed:
            try:  # the log holds each issuance's count: no certificate row may be missing
                await self._ca.check_issued()
            except NotFoundError:
                pass  # no CA yet
            except IntegrityError as exc:
                report = report.model_copy(update={"ok": False, "reason": str(exc)})
        return api.AuditVerifyReply(checkpoint_size=size, **report.model_dump())

    async def _audit_size(self) -> int:
        value = await self._store.fetchval("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit")
        return int(value or 0)

    async def audit_tail(
        self, principal: Principal, params: api.AuditTailParams
    ) -> api.AuditTailReply:
        """The newest records, oldest first."""
        size = await self._audit_size()
        records = await audit_log.load_records(self._store, start=max(0, size - params.count))
        return api.AuditTailReply(
            size=size,
            records=tuple(
                api.AuditRecordInfo(**r.model_dump(exclude={"prev_hash"})) for r in records
            ),
        )

    async def audit_export(
        self, principal: Principal, params: api.AuditExportParams
    ) -> api.AuditExportReply:
        """One page of the export (JSON lines); the first page checkpoints the log first.

        Pages keep replies under the SSH reply limit. ``upto`` is fixed by the first page, so a
        paged export is one consistent prefix of the (append-only) log; the last page carries
        every signed checkpoint within it. Lines are exactly what :func:`audit.export_jsonl`
        writes, so :func:`audit.parse_jsonl` reads them back.
        """
        if params.upto is None and params.start == 0:
            await self._checkpoint()
        upto = params.upto if params.upto is not None else await self._audit_size()
        end = min(upto, params.start + params.limit)
        records = [
            r
            for r in await audit_log.load_records(self._store, start=params.start)
            if r.index < end
        ]
        lines = [audit_log._record_line(r) for r in records]
        done = end >= upto
        if done:
            lines += [
                audit_log.checkpoint_line(cp)
                for cp in await audit_log.load_checkpoints(self._store)
                if cp.size <= upto
            ]
        return api.AuditExportReply(lines=tuple(lines), upto=upto, next_start=None if done else end)

    # -- reports --------------------------------------------------------------------------

    async def report_summary(self, principal: Principal, params: api.Empty) -> api.ReportSummary:
        """The inventory's header: audit verification (head and checkpoint), counts, people,
        overdue rotations, stale hosts and the controller-wide findings."""
        return await self._reports.summary()

    async def report_keys(
        self, principal: Principal, params: api.ReportKeysParams
    ) -> api.ReportKeysReply:
        """One page of the key inventory with each key's findings; ``next`` continues."""
        return await self._reports.keys(params.after, params.limit)

    # -- backups --------------------------------------------------------------------------

    def _require_backups(self) -> Backups:
        if self._backups is None:
            raise ConfigError("this controller has no home to write backups into")
        return self._backups

    async def _run_backup_create(self, params: api.Empty, actor: str) -> api.BackupInfo:
        """Copy the store now, while serving (material stays sealed); audited with the audit
        head the copy contains. Fetch it with ``backup.read``, then ``backup.delete`` it.

        The log is checkpointed first (when unsealed and the anchor allows), so the copy holds
        a signed checkpoint near its head: a restore can show what it brings back was signed.
        """
        backups = self._require_backups()
        await self._checkpoint()
        backup_id, facts = await backups.create(actor=actor)
        return api.BackupInfo(id=backup_id, **dataclasses.asdict(facts))

    async def backup_read(
        self, principal: Principal, params: api.BackupReadParams
    ) -> api.BackupChunk:
        """One chunk of a backup file."""
        data, size = await self._require_backups().read(params.id, params.offset, params.length)
        return api.BackupChunk(
            offset=params.offset, size=size, data=base64.b64encode(data).decode("ascii")
        )

    async def backup_info(self, principal: Principal, params: api.BackupRef) -> api.BackupInfo:
        """A backup made earlier (by an approved request), to fetch it by its id."""
        facts = await self._require_backups().facts(params.id)
        return api.BackupInfo(id=params.id, **dataclasses.asdict(facts))

    async def backup_delete(self, principal: Principal, params: api.BackupRef) -> api.BackupDeleted:
        """Remove a fetched backup from the controller's home."""
        await self._require_backups().delete(params.id)
        return api.BackupDeleted(id=params.id)

    # -- operators ------------------------------------------------------------------------

    async def operator_list(self, principal: Principal, params: api.Empty) -> api.OperatorListReply:
        """Every operator (disabled ones included)."""
        return api.OperatorListReply(
            operators=tuple(replies.operator_info(o) for o in await self.operators.list())
        )

    async def operator_add(
        self, principal: Principal, params: api.OperatorAddParams
    ) -> api.OperatorReply:
        """Add an operator (dual control, except while nobody else could approve)."""
        waiver = await self.dual.role_gate(principal, "operator.add", params, params.name)
        op = await self.operators.add(
            params.name,
            params.role,
            params.ssh_public_key,
            actor=principal.name,
            details={"dual_control": waiver},
        )
        return api.OperatorReply(operator=replies.operator_info(op))

    async def _run_operator_add(
        self, params: api.OperatorAddParams, actor: str
    ) -> api.OperatorReply:
        op = await self.operators.add(params.name, params.role, params.ssh_public_key, actor=actor)
        return api.OperatorReply(operator=replies.operator_info(op))

    async def operator_remove(
        self, principal: Principal, params: api.OperatorRef
    ) -> api.OperatorReply:
        """Disable an operator (dual control, except while nobody else could approve)."""
        await self.operators.get(params.name, enabled_only=True)
        waiver = await self.dual.role_gate(principal, "operator.remove", params, params.name)
        op = await self.operators.remove(
            params.name, actor=principal.name, details={"dual_control": waiver}
        )
        return api.OperatorReply(operator=replies.operator_info(op))

    async def _run_operator_remove(self, params: api.OperatorRef, actor: str) -> api.OperatorReply:
        op = await self.operators.remove(params.name, actor=actor)
        return api.OperatorReply(operator=replies.operator_info(op))

    # -- requests -------------------------------------------------------------------------

    async def request_list(
        self, principal: Principal, params: api.RequestListParams
    ) -> api.RequestListReply:
        """Pending requests (or all of them), newest first."""
        now = self._now()
        requests = await self.requests.list(include_done=params.all)
        return api.RequestListReply(requests=tuple(replies.request_info(r, now) for r in requests))

    async def request_show(self, principal: Principal, params: api.RequestRef) -> api.RequestInfo:
        """One request with its decisions."""
        return replies.request_info(await self.requests.get(params.id), self._now())

    async def request_approve(
        self, principal: Principal, params: api.RequestRef
    ) -> api.ApproveReply:
        """Approve another person's request and run it as ``requester+approver``."""
        done, result = await self.dual.approve(principal, params.id)
        return api.ApproveReply(
            request=replies.request_info(done, self._now()), result=result.model_dump(mode="json")
        )

    async def request_reject(
        self, principal: Principal, params: api.RequestRejectParams
    ) -> api.RequestInfo:
        """Reject a pending request (or withdraw one's own)."""
        rejected = await self.dual.reject(principal, params.id, params.reason)
        return replies.request_info(rejected, self._now())


def _new_key(params: api.KeyCreateParams) -> NewKey:
    """What the lifecycle creates for a ``key.create`` request (its policy patch applied)."""
    policy = None
    if not params.policy.empty:
        try:
            kt = KeyType(params.type)
        except ValueError:
            raise ConfigError(f"unsupported key type {params.type!r}") from None
        usage = None if params.usage is None else frozenset(params.usage)
        policy = patch_policy(default_policy(kt, usage), params.policy)  # type: ignore[arg-type]
    return NewKey(
        name=params.name,
        type=params.type,
        usage=params.usage,
        policy=policy,
        targets=params.targets,
        install=params.install,
        secret_length=params.secret_length,
        secret_alphabet=params.secret_alphabet,
    )


def _key_type(name: str) -> KeyType:
    try:
        return KeyType(name)
    except ValueError:
        raise ConfigError(f"unsupported key type {name[:32]!r}") from None


def _usage_of(kt: KeyType, usage: tuple[str, ...] | None) -> list[str]:
    """The usage mask a key of ``kt`` gets (its default when none is named), sorted."""
    return sorted(str(u) for u in check_usage(kt, None if usage is None else frozenset(usage)))  # type: ignore[arg-type]


def _import_as_create(params: api.KeyImportParams) -> api.KeyCreateParams:
    """The key an import creates, as ``key.create`` would check it (name, policy, install)."""
    if params.staged is not None and params.material is not None:
        raise ProtocolError("key.import: give material, not staged material")
    return api.KeyCreateParams(
        name=params.name,
        type=params.type,
        usage=params.usage,
        policy=params.policy,
        targets=params.targets,
        install=params.install,
    )


def _file_bytes(params: api.KeyImportParams | api.KeyRotateParams) -> bytes:
    """The operator's file from its base64 (refusing anything else), never echoed."""
    if params.staged is not None:
        raise ProtocolError("staged material is set by the controller, never by a caller")
    if params.material is None:
        raise ConfigError("no material: give the key file to import")
    try:
        return base64.b64decode(params.material.get_secret_value().encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ConfigError("the material is not base64 text") from None


def _policy_named(params: api.KeyPolicyParams) -> None:
    """A policy change must name a field (refused before any request is stored)."""
    if params.policy.empty:
        raise ConfigError("name at least one policy field to change")
