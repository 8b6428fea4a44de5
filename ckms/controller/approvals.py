"""Dual-control requests: an operation one person asked for, waiting for a second person.

A request row (table ``approvals``) stores the operation (an admin RPC method such as
``key.destroy``), its validated parameters, the requester and an expiry (24 h by default).
Its ``state`` moves ``pending`` → ``approved`` (claimed by an approver, operation running) →
``executed``; or ``pending`` → ``rejected`` / ``expired``. If the approved operation is then
refused (say the version changed state meanwhile) the request goes back to ``pending`` and the
refusal is recorded, so it can be approved again once fixed, rejected, or left to expire.
Every decision is appended to the row's ``approvals`` JSON list (who, when, what, outcome).

Claiming is one conditional UPDATE, so two approvers racing cannot both run the operation. A
process that dies between claiming and finishing leaves the request ``approved``: it is shown
as such and is not run again automatically (the audit log says whether the operation ran).

:class:`ApprovalBook` keeps the rows and their audit records; :class:`DualControl` holds the
rules that need people: which operations a policy puts under dual control (the gate), who may
request them (:data:`~ckms.protocol.REQUESTER_ROLES`), who may approve
(:data:`~ckms.protocol.APPROVER_ROLES`, never one's own request), and the table of what an
approval may run, as the requester, with the same executor a direct call uses.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel, ConfigDict, ValidationError

from ckms.controller import rowmac
from ckms.errors import (
    ApprovalRequiredError,
    CKMSError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    PolicyError,
)
from ckms.protocol import REQUESTER_ROLES, ApprovalOperation
from ckms.ssh import Principal
from ckms.store import Clock, Store, Transaction, format_time, parse_time, utc_now
from ckms.store import audit as audit_log

if TYPE_CHECKING:
    from ckms.controller.lifecycle import Lifecycle
    from ckms.controller.operators import OperatorRegistry

__all__ = ["DEFAULT_APPROVAL_TTL", "ApprovalBook", "ApprovalRequest", "DualControl", "Executor"]

log = logging.getLogger(__name__)

DEFAULT_APPROVAL_TTL = timedelta(hours=24)


class ApprovalRequest(BaseModel):
    """One request row."""

    model_config = ConfigDict(frozen=True)

    id: str
    operation: str
    object: str
    params: dict[str, Any]
    requester: str
    created_at: datetime
    expires_at: datetime
    state: str
    decisions: tuple[dict[str, Any], ...] = ()

    def expired_at(self, now: datetime) -> bool:
        """True when the request can no longer be approved at ``now``."""
        return self.state == "expired" or (self.state == "pending" and now >= self.expires_at)


def _request(row: Any, row_key: bytes | None) -> ApprovalRequest:
    rowmac.check_approval(row_key, row)
    stored = json.loads(row["params"])
    return ApprovalRequest(
        id=row["id"],
        operation=row["operation"],
        object=stored.get("object", ""),
        params=stored.get("params", {}),
        requester=row["requester"],
        created_at=parse_time(row["created_at"]),
        expires_at=parse_time(row["expires_at"]),
        state=row["state"],
        decisions=tuple(json.loads(row["approvals"])),
    )


class ApprovalBook:
    """The ``approvals`` table on an injected clock."""

    def __init__(
        self, store: Store, *, clock: Clock = utc_now, ttl: timedelta = DEFAULT_APPROVAL_TTL
    ) -> None:
        self._store = store
        self._clock = clock
        self.ttl = ttl

    async def create(
        self, operation: str, params: dict[str, Any], *, requester: str, object: str, role: str
    ) -> ApprovalRequest:
        """Store a pending request (audited as ``request.create``) and return it."""
        now = self._clock()
        request_id = "r-" + secrets.token_hex(5)
        expires = now + self.ttl
        async with self._store.write() as tx:
            await tx.execute(
                "INSERT INTO approvals(id, operation, params, requester, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    operation,
                    json.dumps({"object": object, "params": params}, sort_keys=True),
                    requester,
                    format_time(now),
                    format_time(expires),
                ),
            )
            await rowmac.stamp_approval(tx, request_id)
            await audit_log.append(
                tx,
                now=now,
                actor=requester,
                action="request.create",
                object=object,
                details={
                    "request": request_id,
                    "operation": operation,
                    "role": role,
                    "expires_at": format_time(expires),
                },
            )
            row = await tx.fetchone("SELECT * FROM approvals WHERE id = ?", (request_id,))
        log.info("%s requested %s on %s (request %s)", requester, operation, object, request_id)
        return _request(row, tx.row_key)

    async def get(self, request_id: str) -> ApprovalRequest:
        """Return one request, or raise NotFoundError."""
        row = await self._store.fetchone("SELECT * FROM approvals WHERE id = ?", (request_id,))
        if row is None:
            raise NotFoundError(f"no request {request_id!r}")
        return _request(row, self._store.row_key)

    async def list(self, *, include_done: bool = False) -> list[ApprovalRequest]:
        """Pending (and approved-but-unfinished) requests, or all of them; newest first."""
        where = "" if include_done else "WHERE state IN ('pending', 'approved')"
        rows = await self._store.fetchall(
            f"SELECT * FROM approvals {where} ORDER BY created_at DESC, id"  # noqa: S608
        )
        return [_request(r, self._store.row_key) for r in rows]

    async def for_objects(self, objects: list[str]) -> dict[str, list[ApprovalRequest]]:
        """Every request (any state) on each of ``objects`` (``key:<name>``), oldest first."""
        if not objects:
            return {}
        marks = ",".join("?" * len(objects))
        field = self._store.dialect.json_text("params", "object")
        rows = await self._store.fetchall(
            f"SELECT * FROM approvals WHERE {field} "  # noqa: S608
            f"IN ({marks}) ORDER BY created_at, id",
            tuple(objects),
        )
        out: dict[str, list[ApprovalRequest]] = {}
        for row in rows:
            request = _request(row, self._store.row_key)
            out.setdefault(request.object, []).append(request)
        return out

    async def count_pending(self) -> int:
        """How many requests wait for approval and have not expired."""
        value = await self._store.fetchval(
            "SELECT count(*) FROM approvals WHERE state = 'pending' AND expires_at > ?",
            (format_time(self._clock()),),
        )
        return int(value or 0)

    async def claim(self, request_id: str, *, approver: str, role: str) -> ApprovalRequest:
        """Mark a pending request approved by ``approver`` so exactly one caller runs it.

        Refuses the requester's own approval (PermissionDeniedError), a request that is not
        pending (PolicyError), and an expired one (PolicyError; the row becomes ``expired``).
        Approvals and expiries are audited here; the refusal of one's own request is audited
        by the RPC server's refusal hook.
        """
        now = self._clock()
        request = await self.get(request_id)
        if request.requester == approver:
            raise PermissionDeniedError(
                f"{approver} requested {request_id}; a different admin or custodian must approve"
            )
        if request.state != "pending":
            raise PolicyError(f"request {request_id} is {request.state}, not pending")
        if request.expired_at(now):
            async with self._store.write() as tx:
                changed = await tx.execute(
                    "UPDATE approvals SET state = 'expired' WHERE id = ? AND state = 'pending'",
                    (request_id,),
                )
                if changed:
                    await rowmac.stamp_approval(tx, request_id)
                    await audit_log.append(
                        tx,
                        now=now,
                        actor=approver,
                        action="request.approve",
                        object=request.object,
                        outcome="refused",
                        details={
                            "request": request_id,
                            "operation": request.operation,
                            "error": "expired",
                            "expires_at": format_time(request.expires_at),
                        },
                    )
            raise PolicyError(
                f"request {request_id} expired at {format_time(request.expires_at)}; "
                "ask the requester to make it again"
            )
        decision = {"by": approver, "role": role, "at": format_time(now), "decision": "approve"}
        async with self._store.write() as tx:
            await _decide(
                tx,
                request,
                "approved",
                decision,
                now=now,
                action="request.approve",
                details={"requester": request.requester},
            )
        return await self.get(request_id)

    async def finish(
        self, request_id: str, *, actor: str, error: str | None = None
    ) -> ApprovalRequest:
        """Record how a claimed request's operation ended: executed, or back to pending."""
        now = self._clock()
        request = await self.get(request_id)
        decisions = [dict(d) for d in request.decisions]
        if decisions:
            decisions[-1]["outcome"] = "executed" if error is None else "failed"
            if error is not None:
                decisions[-1]["error"] = error[:500]
        state = "executed" if error is None else "pending"
        async with self._store.write() as tx:
            await tx.execute(
                "UPDATE approvals SET state = ?, approvals = ? WHERE id = ? AND state = 'approved'",
                (state, json.dumps(decisions, sort_keys=True), request_id),
            )
            await rowmac.stamp_approval(tx, request_id)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="request.execute",
                object=request.object,
                outcome="ok" if error is None else "failed",
                details={"request": request_id, "operation": request.operation, "error": error},
            )
        return await self.get(request_id)

    async def reject(
        self, request_id: str, *, by: str, role: str, reason: str | None
    ) -> ApprovalRequest:
        """Reject a pending request (its requester may withdraw it the same way)."""
        now = self._clock()
        request = await self.get(request_id)
        if request.state != "pending":
            raise PolicyError(f"request {request_id} is {request.state}, not pending")
        decision = {
            "by": by,
            "role": role,
            "at": format_time(now),
            "decision": "withdraw" if by == request.requester else "reject",
            "reason": reason,
        }
        async with self._store.write() as tx:
            await _decide(
                tx,
                request,
                "rejected",
                decision,
                now=now,
                action="request.reject",
                details={"reason": reason},
            )
        return await self.get(request_id)


async def _decide(
    tx: Transaction,
    request: ApprovalRequest,
    state: str,
    decision: dict[str, object],
    *,
    now: datetime,
    action: str,
    details: dict[str, object],
) -> None:
    """Move a pending request to ``state`` with one more decision (only one decider wins) and
    audit it as ``action`` by the decider, in the caller's transaction."""
    changed = await tx.execute(
        "UPDATE approvals SET state = ?, approvals = ? WHERE id = ? AND state = 'pending'",
        (state, json.dumps([*request.decisions, decision], sort_keys=True), request.id),
    )
    if not changed:
        raise PolicyError(f"request {request.id} was decided by someone else meanwhile")
    await rowmac.stamp_approval(tx, request.id)
    await audit_log.append(
        tx,
        now=now,
        actor=str(decision["by"]),
        action=action,
        object=request.object,
        details={"request": request.id, "operation": request.operation, **details},
    )


Executor = Callable[[Any, str], Awaitable[BaseModel]]
"""Runs one operation with validated parameters as the given actor and returns its reply."""


class DualControl:
    """The gate in front of operations that need a second person, and the approval that runs them.

    A gated operation asked by an admin becomes a stored request and the call is refused with
    ApprovalRequiredError carrying the request id; any other role is refused outright. A
    *different* admin or custodian approves it, and the operation runs as the requester with
    the actor recorded as ``requester+approver``.
    """

    def __init__(
        self, book: ApprovalBook, operators: OperatorRegistry, lifecycle: Lifecycle
    ) -> None:
        self.book = book
        self._operators = operators
        self._lifecycle = lifecycle
        self._executors: dict[str, tuple[type[BaseModel], Executor]] = {}

    def register(self, method: str, model: type[BaseModel], run: Executor) -> None:
        """Say what an approval of ``method`` runs (the executor a direct call uses too)."""
        self._executors[method] = (model, run)

    async def gate(
        self,
        principal: Principal,
        method: str,
        params: BaseModel,
        *,
        operation: ApprovalOperation | str,
        required: Collection[ApprovalOperation | str],
        object: str,
    ) -> None:
        """Return if ``operation`` is not in ``required``; else refuse, or store a request."""
        if str(operation) in {str(r) for r in required}:
            await self._request(principal, method, params, operation=operation, object=object)

    async def _request(
        self,
        principal: Principal,
        method: str,
        params: BaseModel,
        *,
        operation: ApprovalOperation | str,
        object: str,
    ) -> NoReturn:
        """Store a request for a gated operation (admins only) and refuse the call with its id."""
        if principal.role not in REQUESTER_ROLES:
            raise PermissionDeniedError(
                f"{method} on {object} needs dual control ({operation} is in its approvals); "
                f"role {principal.role} may not request it: ask an admin"
            )
        request = await self.book.create(
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

    async def key_gate(
        self,
        principal: Principal,
        method: str,
        params: BaseModel,
        name: str,
        operation: ApprovalOperation,
    ) -> None:
        """:meth:`gate` with the approvals the key's own policy requires."""
        key = await self._lifecycle.get(name)
        await self.gate(
            principal,
            method,
            params,
            operation=operation,
            required=key.policy.approvals_required,
            object=f"key:{name}",
        )

    async def role_gate(
        self, principal: Principal, method: str, params: BaseModel, name: str
    ) -> str:
        """Operator changes need a second person unless nobody else could approve (bootstrap,
        which ends for good once a custodian set is confirmed).

        Returns what the audit record says about dual control when the change runs directly.
        """
        if (
            await self._operators.bootstrap_open()
            and await self._operators.other_approvers(principal.name) == 0
        ):
            # Bootstrap only: it ends for good once a custodian set is confirmed.
            return "waived: no other admin or custodian exists to approve"
        # Operator changes are always under dual control (``role``), whatever a key's policy says.
        await self._request(
            principal, method, params, operation=ApprovalOperation.ROLE, object=f"operator:{name}"
        )

    async def approve(
        self, principal: Principal, request_id: str
    ) -> tuple[ApprovalRequest, BaseModel]:
        """Approve another person's request and run it as ``requester+approver``."""
        request = await self.book.get(request_id)
        if request.operation not in self._executors:
            raise ConfigError(f"request {request.id} names an unknown operation")
        try:
            requester = await self._operators.get(request.requester, enabled_only=True)
        except NotFoundError:
            raise PermissionDeniedError(
                f"{request.requester}, who requested {request.id}, is no longer an operator"
            ) from None
        if requester.role not in REQUESTER_ROLES:
            raise PermissionDeniedError(
                f"{requester.name} is now {requester.role} and may no longer request "
                f"{request.operation}"
            )
        claimed = await self.book.claim(request.id, approver=principal.name, role=principal.role)
        actor = f"{claimed.requester}+{principal.name}"
        model, run = self._executors[claimed.operation]
        try:
            result = await run(model.model_validate(claimed.params), actor)
        except CKMSError as exc:
            await self.book.finish(claimed.id, actor=actor, error=f"{type(exc).__name__}: {exc}")
            raise
        except ValidationError:
            await self.book.finish(claimed.id, actor=actor, error="stored parameters invalid")
            raise ConfigError(f"request {claimed.id} has invalid stored parameters") from None
        done = await self.book.finish(claimed.id, actor=actor)
        log.info(
            "request %s (%s) approved by %s and executed", done.id, done.operation, principal.name
        )
        return done, result

    async def reject(
        self, principal: Principal, request_id: str, reason: str | None
    ) -> ApprovalRequest:
        """Reject a pending request (or withdraw one's own)."""
        return await self.book.reject(
            request_id, by=principal.name, role=principal.role, reason=reason
        )
