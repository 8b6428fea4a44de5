"""What the controller answers operators over SSH: the admin RPC behind the ``ckms`` CLI.

Thin over the library: each method validates its typed parameters
(:mod:`ckms.protocol.admin`), checks what the caller's role allows, calls
:class:`~ckms.controller.lifecycle.Lifecycle`, :class:`~ckms.controller.hosts.HostRegistry`,
:class:`~ckms.controller.sealing.Vault`, the audit log or the fleet view, and returns a typed
reply.

**Roles** (checked on the controller for every request: the route's roles in the SSH server,
then per-operation checks here; refusals raise PermissionDeniedError, which the server's refusal
hook writes to the audit log whether the route or the handler refused):

=================  =========================================================================
role               may call
=================  =========================================================================
``auditor``        read only: ``status``, ``key.list|show|history``, ``host.list|show``,
                   ``fleet.status``, ``audit.*``, ``operator.list``, ``request.list|show``
``operator``       the reads, plus ``key.*`` changes and ``host.enroll|label|revoke``, except
                   operations the key's policy puts under dual control (refused)
``custodian``      ``status``, ``unseal``, ``seal``, ``request.list|show|approve|reject``
``admin``          everything, including ``operator.add|remove``; dual-control operations
                   become requests
``agent``/enroll   nothing here (agent methods only)
=================  =========================================================================

**Dual control**: an operation listed in the key's ``policy.approvals_required`` (destroy and
policy changes by default), and every operator change (``operator.add|remove``), is not run
when an admin asks: a request row is stored (:class:`~ckms.controller.approvals.ApprovalBook`)
and the call is refused with ApprovalRequiredError carrying the request id. A *different* admin
or custodian runs ``request.approve``, which runs the stored operation as the requester with the
actor recorded as ``requester+approver``. Operator changes made while no other admin or
custodian exists (right after ``ckms init``) run directly, since nobody could approve them;
the audit record says so.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from ckms.controller.approvals import DEFAULT_APPROVAL_TTL, ApprovalBook, ApprovalRequest
from ckms.controller.desired import distributable_versions, drifts
from ckms.controller.duework import plan_due_work
from ckms.controller.fleet import key_fleet_status
from ckms.controller.models import DEFAULT_APPROVALS, Host, Key, Policy
from ckms.controller.operators import OperatorRegistry
from ckms.controller.policy import default_policy
from ckms.controller.targets import host_matches
from ckms.crypto import KeyType
from ckms.errors import (
    ApprovalRequiredError,
    CKMSError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
)
from ckms.protocol import APPROVER_ROLES, REQUESTER_ROLES, Role
from ckms.protocol import admin as api
from ckms.ssh import Principal, RpcServer
from ckms.store import audit as audit_log
from ckms.store import format_time, parse_time

if TYPE_CHECKING:
    from ckms.controller.service import Controller

__all__ = ["ROLES", "AdminService", "key_info"]

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)

_READ = frozenset({Role.ADMIN, Role.OPERATOR, Role.AUDITOR})
_STATUS = _READ | {Role.CUSTODIAN}
_WRITE = frozenset({Role.ADMIN, Role.OPERATOR})
_ADMIN = frozenset({Role.ADMIN})
_VAULT = frozenset({Role.ADMIN, Role.CUSTODIAN})
_REQUESTS = _STATUS
_APPROVE = APPROVER_ROLES

ROLES: dict[str, frozenset[Role]] = {
    "status": _STATUS,
    "unseal": _VAULT,
    "seal": _VAULT,
    "key.create": _WRITE,
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
    "audit.verify": _READ,
    "audit.tail": _READ,
    "audit.export": _READ,
    "operator.add": _ADMIN,
    "operator.list": _READ,
    "operator.remove": _ADMIN,
    "request.list": _REQUESTS,
    "request.show": _REQUESTS,
    "request.approve": _APPROVE,
    "request.reject": _APPROVE,
}
"""Every admin method and the roles its route admits (handlers may refuse more)."""

_REQUESTERS = REQUESTER_ROLES

_ROTATION_HORIZON = timedelta(days=4 * 365)
_DAY = timedelta(days=1)

Executor = Callable[[Any, str], Awaitable[BaseModel]]


# -- model conversions ------------------------------------------------------------------------


def policy_info(policy: Policy) -> api.PolicyInfo:
    """A policy as the wire shows it (seconds, sorted operations)."""
    dumped = policy.model_dump(mode="json")
    return api.PolicyInfo(
        cryptoperiod_s=dumped["cryptoperiod"],
        grace_s=dumped["grace"],
        activation_delay_s=dumped["activation_delay"],
        max_staleness_s=dumped["max_staleness"],
        approvals_required=tuple(dumped["approvals_required"]),
    )


def next_rotation(key: Key, now: datetime) -> datetime | None:
    """When the key's primary is due to rotate (None: no Active primary, or a version waits)."""
    work = plan_due_work([key], now + _ROTATION_HORIZON)
    return work.rotate[0].due_at if work.rotate else None


def key_info(key: Key, *, now: datetime, hosts_targeted: int | None = None) -> api.KeyInfo:
    """A key as the wire shows it (never material)."""
    return api.KeyInfo(
        name=key.name,
        type=str(key.type),
        usage=tuple(key.usage_list),
        policy=policy_info(key.policy),
        targets=key.targets,
        install=key.install,
        primary_version=key.primary_version,
        created_at=key.created_at,
        created_by=key.created_by,
        updated_at=key.updated_at,
        versions=tuple(
            api.VersionInfo(
                primary=v.version == key.primary_version,
                **v.model_dump(exclude={"key"}),
            )
            for v in key.versions
        ),
        next_rotation_at=next_rotation(key, now),
        hosts_targeted=hosts_targeted,
    )


def _request_info(request: ApprovalRequest, now: datetime) -> api.RequestInfo:
    return api.RequestInfo(
        expired=request.expired_at(now),
        **request.model_dump(),
    )


def _patched_policy(base: Policy, patch: api.PolicyPatch) -> Policy:
    """``base`` with the fields of ``patch`` that are set; ConfigError if the result is invalid."""
    values: dict[str, Any] = {
        "cryptoperiod": base.cryptoperiod,
        "grace": base.grace,
        "activation_delay": base.activation_delay,
        "max_staleness": base.max_staleness,
        "approvals_required": base.approvals_required,
    }
    for field in ("cryptoperiod", "grace", "activation_delay", "max_staleness"):
        seconds = getattr(patch, f"{field}_s")
        if seconds is not None:
            values[field] = timedelta(seconds=seconds)
    if patch.approvals_required is not None:
        values["approvals_required"] = frozenset(patch.approvals_required)
    try:
        return Policy(**values)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]["msg"]
        raise ConfigError(f"invalid policy: {first.removeprefix('Value error, ')}") from None


# -- the service ------------------------------------------------------------------------------


class AdminService:
    """The operator-facing half of the controller's SSH endpoint."""

    def __init__(
        self, controller: Controller, *, approval_ttl: timedelta = DEFAULT_APPROVAL_TTL
    ) -> None:
        assert controller.store is not None, "open the controller first"
        self._c = controller
        self._store = controller.store
        self.operators = OperatorRegistry(controller.store, clock=controller.clock)
        self.requests = ApprovalBook(controller.store, clock=controller.clock, ttl=approval_ttl)
        self._executors: dict[str, tuple[type[BaseModel], Executor]] = {}

    def _now(self) -> datetime:
        return self._c.clock()

    def register(self, server: RpcServer) -> None:
        """Route every admin method on ``server`` with the roles of :data:`ROLES`."""
        self._route(server, "status", api.Empty, self.status)
        self._route(server, "unseal", api.UnsealParams, self.unseal, secret_params=True)
        self._route(server, "seal", api.Empty, self.seal)

        self._route(server, "key.create", api.KeyCreateParams, self.key_create)
        self._route(server, "key.list", api.Empty, self.key_list)
        self._route(server, "key.show", api.KeyRef, self.key_show)
        self._route(server, "key.history", api.KeyRef, self.key_history)
        self._route(server, "key.rotate", api.KeyRotateParams, self.key_rotate)
        for verb in ("activate", "suspend", "resume", "destroy"):
            self._route(server, f"key.{verb}", api.KeyVersionParams, self._version_handler(verb))
        self._route(server, "key.revoke", api.KeyRevokeParams, self.key_revoke)
        self._route(server, "key.policy", api.KeyPolicyParams, self.key_policy)
        self._route(server, "key.targets", api.KeyTargetsParams, self.key_targets)

        self._route(server, "host.enroll", api.HostEnrollParams, self.host_enroll)
        self._route(server, "host.list", api.Empty, self.host_list)
        self._route(server, "host.show", api.HostRef, self.host_show)
        self._route(server, "host.label", api.HostLabelParams, self.host_label)
        self._route(server, "host.revoke", api.HostRef, self.host_revoke)

        self._route(server, "fleet.status", api.FleetStatusParams, self.fleet_status)

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

        # What an approval may run, as the requester: the same executors a direct call uses.
        self._executors = {
            "key.create": (api.KeyCreateParams, self._run_create),
            "key.rotate": (api.KeyRotateParams, self._run_rotate),
            "key.revoke": (api.KeyRevokeParams, self._run_revoke),
            "key.policy": (api.KeyPolicyParams, self._run_policy),
            "key.targets": (api.KeyTargetsParams, self._run_targets),
            "operator.add": (api.OperatorAddParams, self._run_operator_add),
            "operator.remove": (api.OperatorRef, self._run_operator_remove),
        }
        for verb in ("activate", "suspend", "resume", "destroy"):
            self._executors[f"key.{verb}"] = (api.KeyVersionParams, self._version_executor(verb))

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
            # A ValidationError here becomes a ProtocolError naming the bad field (server side).
            return await handler(principal, params_model.model_validate(raw))

        server.route(
            method,
            serve,
            roles=roles if roles is not None else ROLES[method],
            secret_params=secret_params,
        )

    # -- dual control ---------------------------------------------------------------------

    async def _gate(
        self,
        principal: Principal,
        method: str,
        params: BaseModel,
        *,
        operation: str,
        required: Collection[str],
        object: str,
    ) -> None:
        """Refuse or turn into a request an operation that ``required`` puts under dual control."""
        if operation not in {str(r) for r in required}:
            return
        if principal.role not in _REQUESTERS:
            raise PermissionDeniedError(
                f"{method} on {object} needs dual control ({operation} is in its approvals); "
                f"role {principal.role} may not request it: ask an admin"
            )
        request = await self.requests.create(
            method,
            params.model_dump(mode="json"),
            requester=principal.name,
            object=object,
            role=principal.role,
        )
        raise ApprovalRequiredError(
            f"{method} on {object} needs a second person's approval: request {request.id} "
            f"created (expires {format_time(request.expires_at)}); another admin or custodian "
            f"runs `ckms approve {request.id}`",
            request_id=request.id,
        )

    async def _key_gate(
        self, principal: Principal, method: str, params: BaseModel, name: str, operation: str
    ) -> None:
        key = await self._c.lifecycle.get(name)
        await self._gate(
            principal,
            method,
            params,
            operation=operation,
            required=key.policy.approvals_required,
            object=f"key:{name}",
        )

    async def _role_gate(
        self, principal: Principal, method: str, params: BaseModel, name: str
    ) -> str:
        """Operator changes need a second person unless nobody else could approve (bootstrap)."""
        if await self.operators.other_approvers(principal.name) == 0:
            return "waived: no other admin or custodian exists to approve"
        await self._gate(
            principal,
            method,
            params,
            operation="role",
            required=DEFAULT_APPROVALS,
            object=f"operator:{name}",
        )
        return "approved"  # pragma: no cover - _gate always raises for "role"

    # -- status and sealing ---------------------------------------------------------------

    async def status(self, principal: Principal, params: api.Empty) -> api.StatusReply:
        """Sealed?, Kafka reachable?, outbox backlog, due rotations, stale hosts, requests."""
        c = self._c
        now = self._now()
        seal = await c.vault.status()
        try:
            public: str | None = base64.b64encode(await c.vault.public_key()).decode()
        except NotFoundError:
            public = None
        keys = await c.lifecycle.list_keys()
        hosts = await c.hosts.list()
        soon = plan_due_work(keys, now + timedelta(days=30))
        current = plan_due_work(keys, now)
        rotations = tuple(
            api.DueEntry(key=i.key, version=i.version, due_at=i.due_at) for i in soon.rotate
        )
        counts = {
            label: sum(1 for r in rotations if r.due_at <= now + delta)
            for label, delta in (
                ("overdue", timedelta(0)),
                ("1d", _DAY),
                ("7d", 7 * _DAY),
                ("30d", 30 * _DAY),
            )
        }
        pub, acks = c.publisher.stats, c.acks.stats
        return api.StatusReply(
            now=now,
            initialized=seal.initialized,
            sealed=seal.sealed,
            mode=seal.mode,
            threshold=seal.threshold,
            shares_given=seal.shares_given,
            signer_key_id=seal.signer_key_id,
            signing_public_key=public,
            host_key_fingerprint=c.host_key_fingerprint,
            listen=self._listen(),
            kafka=api.KafkaStatus(
                bootstrap=c.settings.kafka_bootstrap,
                connected=pub.connected,
                published=pub.published,
                failures=pub.failures,
                last_error=pub.last_error,
                backlog=await c.publisher.backlog(),
                acks_applied=acks.applied,
                acks_dropped=dict(acks.dropped or {}),
            ),
            keys=len(keys),
            hosts=sum(1 for h in hosts if not h.revoked),
            hosts_revoked=sum(1 for h in hosts if h.revoked),
            rotations_due=rotations,
            due_counts=counts,
            activations_due=len(current.activate),
            deactivations_due=len(current.deactivate),
            stale_hosts=tuple(await self._stale_hosts(keys, hosts, now)),
            pending_requests=await self.requests.count_pending(),
        )

    def _listen(self) -> str:
        port = self._c.rpc.port if self._c.rpc.port is not None else self._c.settings.listen_port
        return f"{self._c.settings.listen_host}:{port}"

    async def _host_facts(self) -> dict[str, dict[str, Any]]:
        """Last-seen time, last report and wrap suite of every host, in one query."""
        rows = await self._store.fetchall(
            "SELECT id, last_seen_at, reported, wrap_suite FROM hosts"
        )
        return {
            row["id"]: {
                "last_seen_at": parse_time(row["last_seen_at"]) if row["last_seen_at"] else None,
                "reported": json.loads(row["reported"]) if row["reported"] else None,
                "wrap_suite": row["wrap_suite"],
            }
            for row in rows
        }

    async def _stale_hosts(self, keys: list[Key], hosts: list[Host], now: datetime) -> list[str]:
        """Hosts not seen for longer than the shortest max staleness of the keys they hold."""
        facts = await self._host_facts()
        stale = []
        for host in hosts:
            if host.revoked:
                continue
            limits = [k.policy.max_staleness for k in keys if host_matches(k.targets, host)]
            limit = min(limits, default=_DAY)
            seen = facts.get(host.id, {}).get("last_seen_at") or host.enrolled_at
            if seen is None or now - seen > limit:
                stale.append(host.id)
        return stale

    async def unseal(self, principal: Principal, params: api.UnsealParams) -> api.SealReply:
        """Give one custodian share (counted once per custodian) or the passphrase."""
        vault = self._c.vault
        if params.share is not None:
            progress = await vault.submit_share(
                params.share.get_secret_value(), custodian=principal.name
            )
            given = progress.given
        else:
            assert params.passphrase is not None
            await vault.unseal_with_passphrase(
                params.passphrase.get_secret_value(), actor=principal.name
            )
            given = 1
        status = await vault.status()
        if not status.sealed:
            self._c.publisher.wake()  # the outbox may have waited for the signing key
        return api.SealReply(
            sealed=status.sealed,
            mode=status.mode,
            threshold=status.threshold,
            given=status.shares_given if status.sealed else given,
        )

    async def seal(self, principal: Principal, params: api.Empty) -> api.SealReply:
        """Forget the controller's secrets until the next unseal."""
        await self._c.vault.seal(actor=principal.name)
        status = await self._c.vault.status()
        return api.SealReply(sealed=status.sealed, mode=status.mode, threshold=status.threshold)

    # -- keys -----------------------------------------------------------------------------

    async def _key_reply(self, name: str, versions: tuple[int, ...] = ()) -> api.KeyChangeReply:
        key = await self._c.lifecycle.get(name)
        hosts = await self._c.lifecycle.hosts_for(name)
        return api.KeyChangeReply(
            key=key_info(key, now=self._now(), hosts_targeted=len(hosts)), versions=versions
        )

    async def key_create(
        self, principal: Principal, params: api.KeyCreateParams
    ) -> api.KeyChangeReply:
        """Create a key (a request instead, if its own policy puts ``create`` under approval)."""
        approvals = params.policy.approvals_required
        await self._gate(
            principal,
            "key.create",
            params,
            operation="create",
            required=DEFAULT_APPROVALS if approvals is None else approvals,
            object=f"key:{params.name}",
        )
        return await self._run_create(params, principal.name)

    async def _run_create(self, params: api.KeyCreateParams, actor: str) -> api.KeyChangeReply:
        policy = None
        if not params.policy.empty:
            try:
                kt = KeyType(params.type)
            except ValueError:
                raise ConfigError(f"unsupported key type {params.type!r}") from None
            usage = None if params.usage is None else frozenset(params.usage)
            policy = _patched_policy(default_policy(kt, usage), params.policy)  # type: ignore[arg-type]
        await self._c.lifecycle.create(
            params.name,
            params.type,
            actor=actor,
            usage=params.usage,
            policy=policy,
            targets=params.targets,
            install=params.install,
            secret_length=params.secret_length,
            secret_alphabet=params.secret_alphabet,
        )
        return await self._key_reply(params.name, (1,))

    async def key_list(self, principal: Principal, params: api.Empty) -> api.KeyListReply:
        """Every key, one line each."""
        now = self._now()
        out = []
        for key in await self._c.lifecycle.list_keys():
            states: dict[str, int] = {}
            for v in key.versions:
                states[str(v.state)] = states.get(str(v.state), 0) + 1
            primary = key.primary
            out.append(
                api.KeySummary(
                    name=key.name,
                    type=str(key.type),
                    primary_version=key.primary_version,
                    primary_state=None if primary is None else str(primary.state),
                    versions=len(key.versions),
                    states=states,
                    targets=tuple(key.targets.describe()),
                    next_rotation_at=next_rotation(key, now),
                    updated_at=key.updated_at,
                )
            )
        return api.KeyListReply(keys=tuple(out))

    async def key_show(self, principal: Principal, params: api.KeyRef) -> api.KeyChangeReply:
        """One key with its versions, policy, targets and how many hosts it targets."""
        return await self._key_reply(params.name)

    async def key_history(self, principal: Principal, params: api.KeyRef) -> api.KeyHistoryReply:
        """Every state transition of the key's versions."""
        rows = await self._c.lifecycle.history(params.name)
        return api.KeyHistoryReply(
            key=params.name,
            history=tuple(api.HistoryEntry(**{**row, "at": parse_time(row["at"])}) for row in rows),
        )

    async def key_rotate(
        self, principal: Principal, params: api.KeyRotateParams
    ) -> api.KeyChangeReply:
        """Add a version (primary now, or PreActive until the activation delay ends)."""
        await self._key_gate(principal, "key.rotate", params, params.name, "rotate")
        return await self._run_rotate(params, principal.name)

    async def _run_rotate(self, params: api.KeyRotateParams, actor: str) -> api.KeyChangeReply:
        version = await self._c.lifecycle.rotate(params.name, actor=actor, reason=params.reason)
        return await self._key_reply(params.name, (version.version,))

    def _version_handler(
        self, verb: str
    ) -> Callable[[Principal, api.KeyVersionParams], Awaitable[BaseModel]]:
        run = self._version_executor(verb)

        async def handle(principal: Principal, params: api.KeyVersionParams) -> BaseModel:
            await self._key_gate(principal, f"key.{verb}", params, params.name, verb)
            return await run(params, principal.name)

        handle.__doc__ = f"{verb.capitalize()} one version of a key."
        return handle

    def _version_executor(
        self, verb: str
    ) -> Callable[[api.KeyVersionParams, str], Awaitable[BaseModel]]:
        async def run(params: api.KeyVersionParams, actor: str) -> BaseModel:
            op = getattr(self._c.lifecycle, verb)
            await op(params.name, params.version, actor=actor, reason=params.reason)
            return await self._key_reply(params.name, (params.version,))

        return run

    async def key_revoke(
        self, principal: Principal, params: api.KeyRevokeParams
    ) -> api.KeyChangeReply:
        """Revoke one version, or every version the KMIP reason applies to."""
        await self._key_gate(principal, "key.revoke", params, params.name, "revoke")
        return await self._run_revoke(params, principal.name)

    async def _run_revoke(self, params: api.KeyRevokeParams, actor: str) -> api.KeyChangeReply:
        versions = await self._c.lifecycle.revoke(
            params.name,
            params.reason,
            actor=actor,
            version=params.version,
            message=params.message,
        )
        return await self._key_reply(params.name, tuple(v.version for v in versions))

    async def key_policy(
        self, principal: Principal, params: api.KeyPolicyParams
    ) -> api.KeyChangeReply:
        """Change the policy (under dual control by default)."""
        if params.policy.empty:
            raise ConfigError("name at least one policy field to change")
        await self._key_gate(principal, "key.policy", params, params.name, "policy")
        return await self._run_policy(params, principal.name)

    async def _run_policy(self, params: api.KeyPolicyParams, actor: str) -> api.KeyChangeReply:
        key = await self._c.lifecycle.get(params.name)
        policy = _patched_policy(key.policy, params.policy)
        await self._c.lifecycle.set_policy(params.name, policy, actor=actor)
        return await self._key_reply(params.name)

    async def key_targets(
        self, principal: Principal, params: api.KeyTargetsParams
    ) -> api.KeyChangeReply:
        """Replace the key's targets (and optionally its install spec)."""
        await self._key_gate(principal, "key.targets", params, params.name, "targets")
        return await self._run_targets(params, principal.name)

    async def _run_targets(self, params: api.KeyTargetsParams, actor: str) -> api.KeyChangeReply:
        await self._c.lifecycle.set_targets(
            params.name, params.targets, actor=actor, install=params.install
        )
        return await self._key_reply(params.name)

    # -- hosts ----------------------------------------------------------------------------

    async def host_enroll(
        self, principal: Principal, params: api.HostEnrollParams
    ) -> api.HostEnrollReply:
        """A one-time token for a new host, and the host key fingerprint it must pin."""
        token = await self._c.hosts.create_token(
            params.name, params.labels, actor=principal.name, ttl=timedelta(seconds=params.ttl_s)
        )
        return api.HostEnrollReply(
            host=token.host,
            labels=token.labels,
            token=token.token,
            expires_at=token.expires_at,
            host_key_fingerprint=self._c.host_key_fingerprint,
            listen=self._listen(),
        )

    async def _host_infos(self, hosts: list[Host]) -> list[api.HostInfo]:
        now = self._now()
        keys = await self._c.lifecycle.list_keys()
        facts = await self._host_facts()
        stale = set(await self._stale_hosts(keys, hosts, now))
        return [
            api.HostInfo(
                id=h.id,
                labels=h.labels,
                enrolled_at=h.enrolled_at,
                revoked=h.revoked,
                last_seen_at=facts.get(h.id, {}).get("last_seen_at"),
                stale=h.id in stale,
                wrap_suite=facts.get(h.id, {}).get("wrap_suite"),
                keys=tuple(k.name for k in keys if host_matches(k.targets, h)),
            )
            for h in hosts
        ]

    async def host_list(self, principal: Principal, params: api.Empty) -> api.HostListReply:
        """Every enrolled host (revoked ones included)."""
        return api.HostListReply(hosts=tuple(await self._host_infos(await self._c.hosts.list())))

    async def host_show(self, principal: Principal, params: api.HostRef) -> api.HostInfo:
        """One host, with the keys that target it."""
        (info,) = await self._host_infos([await self._c.hosts.get(params.name)])
        return info

    async def host_label(self, principal: Principal, params: api.HostLabelParams) -> api.HostInfo:
        """Set, unset or replace a host's labels."""
        host = await self._c.hosts.get(params.name)
        labels = {} if params.replace else dict(host.labels)
        labels.update(params.set)
        for name in params.unset:
            labels.pop(name, None)
        updated = await self._c.hosts.set_labels(params.name, labels, actor=principal.name)
        (info,) = await self._host_infos([updated])
        return info

    async def host_revoke(self, principal: Principal, params: api.HostRef) -> api.HostInfo:
        """Revoke a host: its key stops authenticating, a ``host.revoked`` event goes out."""
        revoked = await self._c.hosts.revoke(params.name, actor=principal.name)
        (info,) = await self._host_infos([revoked])
        return info

    # -- fleet ----------------------------------------------------------------------------

    async def fleet_status(
        self, principal: Principal, params: api.FleetStatusParams
    ) -> api.FleetStatusReply:
        """Per key: host x version x status x age, converged %, failures and drift first."""
        c = self._c
        assert c.store is not None
        now = self._now()
        keys = [await c.lifecycle.get(params.key)] if params.key else await c.lifecycle.list_keys()
        facts = await self._host_facts()
        hosts = {h.id: h for h in await c.hosts.list()}
        out = []
        for key in keys:
            wanted = {v.version for v in distributable_versions(key)}
            rows = []
            for s in await key_fleet_status(c.store, c.lifecycle, c.hosts, key.name):
                report = facts.get(s.host, {}).get("reported")
                # Drift: the acks say the host is current, but a heartbeat sent after its last
                # ack says it holds something else.
                drift = (
                    s.converged
                    and report is not None
                    and (s.updated_at is None or parse_time(report["at"]) > s.updated_at)
                    and drifts(
                        key,
                        hosts[s.host],
                        ((i.get("key"), i["version"], i["digest"]) for i in report["installed"]),
                    )
                )
                rows.append(
                    api.FleetHost(
                        host=s.host,
                        versions=s.versions,
                        converged=s.converged,
                        failed=s.failed,
                        drift=drift,
                        digests_ok=s.digests_ok,
                        updated_at=s.updated_at,
                        age_s=None
                        if s.updated_at is None
                        else round((now - s.updated_at).total_seconds(), 3),
                        latency_ms=s.latency_ms,
                    )
                )
            rows.sort(key=lambda h: (not h.failed, not h.drift, h.converged, h.host))
            converged = sum(1 for h in rows if h.converged)
            out.append(
                api.KeyFleet(
                    key=key.name,
                    primary_version=key.primary_version,
                    wanted_versions=tuple(sorted(wanted)),
                    targeted=len(rows),
                    converged=converged,
                    failed=sum(1 for h in rows if h.failed),
                    drift=sum(1 for h in rows if h.drift),
                    converged_pct=round(100.0 * converged / len(rows), 1) if rows else 100.0,
                    hosts=tuple(rows[: params.limit]),
                    truncated=max(0, len(rows) - params.limit),
                )
            )
        return api.FleetStatusReply(keys=tuple(out))

    # -- audit ----------------------------------------------------------------------------

    async def _checkpoint(self) -> int | None:
        """Sign a checkpoint of the log as it is now (None while sealed)."""
        if self._c.vault.sealed:
            return None
        return (await self._c.vault.checkpoint_audit()).size

    async def audit_verify(self, principal: Principal, params: api.Empty) -> api.AuditVerifyReply:
        """Checkpoint the log (when unsealed), then verify chain and every checkpoint."""
        size = await self._checkpoint()
        report = await audit_log.verify_store(self._store, await self._c.vault.public_key())
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
                audit_log._checkpoint_line(cp)
                for cp in await audit_log.load_checkpoints(self._store)
                if cp.size <= upto
            ]
        return api.AuditExportReply(lines=tuple(lines), upto=upto, next_start=None if done else end)

    # -- operators ------------------------------------------------------------------------

    @staticmethod
    def _operator_info(op: Any) -> api.OperatorInfo:
        return api.OperatorInfo(**op.model_dump(exclude={"ssh_public_key"}))

    async def operator_list(self, principal: Principal, params: api.Empty) -> api.OperatorListReply:
        """Every operator (disabled ones included)."""
        return api.OperatorListReply(
            operators=tuple(self._operator_info(o) for o in await self.operators.list())
        )

    async def operator_add(
        self, principal: Principal, params: api.OperatorAddParams
    ) -> api.OperatorReply:
        """Add an operator (dual control, except while nobody else could approve)."""
        waiver = await self._role_gate(principal, "operator.add", params, params.name)
        op = await self.operators.add(
            params.name,
            params.role,
            params.ssh_public_key,
            actor=principal.name,
            details={"dual_control": waiver},
        )
        return api.OperatorReply(operator=self._operator_info(op))

    async def _run_operator_add(
        self, params: api.OperatorAddParams, actor: str
    ) -> api.OperatorReply:
        op = await self.operators.add(params.name, params.role, params.ssh_public_key, actor=actor)
        return api.OperatorReply(operator=self._operator_info(op))

    async def operator_remove(
        self, principal: Principal, params: api.OperatorRef
    ) -> api.OperatorReply:
        """Disable an operator (dual control, except while nobody else could approve)."""
        await self.operators.get(params.name, enabled_only=True)
        waiver = await self._role_gate(principal, "operator.remove", params, params.name)
        op = await self.operators.remove(
            params.name, actor=principal.name, details={"dual_control": waiver}
        )
        return api.OperatorReply(operator=self._operator_info(op))

    async def _run_operator_remove(self, params: api.OperatorRef, actor: str) -> api.OperatorReply:
        op = await self.operators.remove(params.name, actor=actor)
        return api.OperatorReply(operator=self._operator_info(op))

    # -- requests -------------------------------------------------------------------------

    async def request_list(
        self, principal: Principal, params: api.RequestListParams
    ) -> api.RequestListReply:
        """Pending requests (or all of them), newest first."""
        now = self._now()
        requests = await self.requests.list(include_done=params.all)
        return api.RequestListReply(requests=tuple(_request_info(r, now) for r in requests))

    async def request_show(self, principal: Principal, params: api.RequestRef) -> api.RequestInfo:
        """One request with its decisions."""
        return _request_info(await self.requests.get(params.id), self._now())

    async def request_approve(
        self, principal: Principal, params: api.RequestRef
    ) -> api.ApproveReply:
        """Approve another person's request and run it as ``requester+approver``."""
        request = await self.requests.get(params.id)
        if request.operation not in self._executors:
            raise ConfigError(f"request {request.id} names an unknown operation")
        try:
            requester = await self.operators.get(request.requester, enabled_only=True)
        except NotFoundError:
            raise PermissionDeniedError(
                f"{request.requester}, who requested {request.id}, is no longer an operator"
            ) from None
        if requester.role not in _REQUESTERS:
            raise PermissionDeniedError(
                f"{requester.name} is now {requester.role} and may no longer request "
                f"{request.operation}"
            )
        claimed = await self.requests.claim(
            request.id, approver=principal.name, role=principal.role
        )
        actor = f"{claimed.requester}+{principal.name}"
        model, run = self._executors[claimed.operation]
        try:
            result = await run(model.model_validate(claimed.params), actor)
        except CKMSError as exc:
            await self.requests.finish(
                claimed.id, actor=actor, error=f"{type(exc).__name__}: {exc}"
            )
            raise
        except ValidationError:
            await self.requests.finish(claimed.id, actor=actor, error="stored parameters invalid")
            raise ConfigError(f"request {claimed.id} has invalid stored parameters") from None
        done = await self.requests.finish(claimed.id, actor=actor)
        log.info(
            "request %s (%s) approved by %s and executed", done.id, done.operation, principal.name
        )
        return api.ApproveReply(
            request=_request_info(done, self._now()), result=result.model_dump(mode="json")
        )

    async def request_reject(
        self, principal: Principal, params: api.RequestRejectParams
    ) -> api.RequestInfo:
        """Reject a pending request (or withdraw one's own)."""
        rejected = await self.requests.reject(
            params.id, by=principal.name, role=principal.role, reason=params.reason
        )
        return _request_info(rejected, self._now())
