"""Evidence for auditors: the key inventory (PCI DSS 3.6.1.1) and the compliance findings,
generated from the live controller rather than kept by hand.

Two admin methods behind ``ckms report inventory|compliance``:

- ``report.summary``: the header. It checkpoints the audit log (when unsealed) and verifies it
  exactly as ``audit verify`` does, naming the head and the checkpoint it verified; counts keys
  and hosts; names custodians and approvers; says how many rotations are overdue
  (:meth:`FleetView.due`, from the next-due index) and which hosts are stale.
- ``report.keys``: one page of keys by name (the key view ``key.list`` pages), each with its
  type, purpose, cryptoperiod, created / rotated / next-due times, the hosts that hold each
  version now (their acks, as the fleet view reads them), how many targeted hosts converged
  (:func:`~ckms.controller.fleet.host_key_status` over
  :func:`~ckms.controller.desired.desired_versions`), its dual-control requests with their
  requesters and approvers, and the findings that apply to it. A page is bounded in keys and in
  holder names, so a reply stays small at any fleet size; each page is its own snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from ckms.controller.approvals import ApprovalBook, ApprovalRequest
from ckms.controller.fleet import FleetView, host_key_status
from ckms.controller.hosts import HostRegistry
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import Host, Key, KeyState
from ckms.controller.operators import OperatorRegistry
from ckms.controller.policy import LIMITS, purpose_of
from ckms.controller.replies import next_rotation
from ckms.controller.sealing import Vault
from ckms.controller.targets import match_hosts
from ckms.crypto import signer_key_id
from ckms.errors import NotFoundError
from ckms.protocol import APPROVER_ROLES, ApprovalOperation, Role
from ckms.protocol import admin as api
from ckms.store import Clock, Store, utc_now
from ckms.store import audit as audit_log

__all__ = ["Reports"]

_REVOKED = frozenset({KeyState.COMPROMISED, KeyState.DESTROYED, KeyState.DESTROYED_COMPROMISED})


class Reports:
    """Builds the report's header and its pages of keys from the live collaborators."""

    def __init__(
        self,
        *,
        store: Store,
        vault: Vault,
        lifecycle: Lifecycle,
        hosts: HostRegistry,
        operators: OperatorRegistry,
        book: ApprovalBook,
        fleet: FleetView,
        checkpoint: Callable[[], Awaitable[int | None]],
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._vault = vault
        self._lifecycle = lifecycle
        self._hosts = hosts
        self._operators = operators
        self._book = book
        self._fleet = fleet
        self._checkpoint = checkpoint
        self._clock = clock

    # -- the header ------------------------------------------------------------------------

    async def summary(self) -> api.ReportSummary:
        """Audit verification, counts, people and the controller-wide findings, now."""
        now = self._clock()
        audit = await self._verify()
        keys = list((await self._lifecycle.current_keys()).values())
        hosts = await self._hosts.list()
        due = await self._fleet.due(now)
        stale = tuple(await self._fleet.stale_hosts(keys, hosts, now))
        people = await self._operators.list()
        custodians = tuple(
            api.ReportPerson(name=o.name, role=str(o.role), disabled=o.disabled)
            for o in people
            if o.role == Role.CUSTODIAN
        )
        approvers = tuple(
            api.ReportPerson(name=o.name, role=str(o.role), disabled=o.disabled)
            for o in people
            if o.role in APPROVER_ROLES
        )
        try:
            kid: str | None = signer_key_id(await self._vault.public_key())
        except NotFoundError:
            kid = None
        overdue = due.counts.get("overdue", 0)
        findings: list[str] = []
        if not audit.ok:
            findings.append(f"the audit log does not verify: {audit.reason}")
        if audit.checkpoint_size is None:
            findings.append("no signed audit checkpoint covers the log")
        anchor = self._vault.anchor.status()
        if not anchor.loaded:
            findings.append("the audit anchor has not been read back from Kafka")
        if overdue:
            findings.append(f"{overdue} rotation(s) overdue")
        if stale:
            findings.append(f"{len(stale)} host(s) stale past their keys' max staleness")
        if not [c for c in custodians if not c.disabled]:
            findings.append("no enabled custodian: no operator holds an unseal share by role")
        return api.ReportSummary(
            generated_at=now,
            signer_key_id=kid,
            keys=len(keys),
            hosts=sum(1 for h in hosts if not h.revoked),
            hosts_revoked=sum(1 for h in hosts if h.revoked),
            stale_hosts=stale,
            rotations_overdue=overdue,
            pending_requests=await self._book.count_pending(),
            custodians=custodians,
            approvers=approvers,
            audit=audit,
            findings=tuple(findings),
        )

    async def _verify(self) -> api.ReportAudit:
        """What ``audit verify`` does (checkpoint, then verify against the anchor), and the
        newest checkpoint within what was verified."""
        await self._checkpoint()
        anchor = self._vault.anchor
        report = await audit_log.verify_store(
            self._store, await self._vault.public_key(), anchor=anchor.last
        )
        if report.ok and anchor.broken is not None:
            report = report.model_copy(update={"ok": False, "reason": anchor.broken})
        covered = [
            cp for cp in await audit_log.load_checkpoints(self._store) if cp.size <= report.size
        ]
        newest = covered[-1] if covered else None
        return api.ReportAudit(
            ok=report.ok,
            size=report.size,
            head_hash=report.head_hash,
            checkpoints_verified=report.checkpoints_verified,
            checkpoint_size=None if newest is None else newest.size,
            checkpoint_head=None if newest is None else newest.head_hash,
            checkpoint_at=None if newest is None else newest.at,
            anchor_size=report.anchor_size,
            reason=report.reason,
            first_bad_index=report.first_bad_index,
        )

    # -- pages of keys ---------------------------------------------------------------------

    async def keys(self, after: str | None, limit: int) -> api.ReportKeysReply:
        """Up to ``limit`` keys after ``after``, ending early to keep the holder names of a
        page within :data:`~ckms.protocol.admin.REPORT_HOLDERS_MAX`."""
        now = self._clock()
        batch = await self._lifecycle.page(after, limit + 1)
        more = len(batch) > limit
        batch = batch[:limit]
        if not batch:
            return api.ReportKeysReply(keys=())
        rows = await self._fleet_rows([k.id for k in batch])
        hosts = await self._hosts.list()
        requests = await self._book.for_objects([f"key:{k.name}" for k in batch])
        out: list[api.ReportKey] = []
        budget = api.REPORT_HOLDERS_MAX
        for i, key in enumerate(batch):
            entry = _entry(key, now, hosts, rows.get(key.id, {}), requests, budget)
            held = sum(len(v.holders) for v in entry.versions)
            if out and held > budget:
                return api.ReportKeysReply(keys=tuple(out), next=out[-1].name)
            out.append(entry)
            budget -= held
            if i % 50 == 49:
                await asyncio.sleep(0)  # a page is not built in one hold of the loop
        return api.ReportKeysReply(keys=tuple(out), next=out[-1].name if more else None)

    async def _fleet_rows(self, key_ids: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
        """fleet_state rows of these keys, by key id and host id, in one query."""
        marks = ",".join("?" * len(key_ids))
        rows = await self._store.fetchall(
            "SELECT host_id, key_id, version, status, digest, updated_at, latency_ms, error "  # noqa: S608 - placeholders only
            f"FROM fleet_state WHERE key_id IN ({marks})",
            tuple(key_ids),
        )
        out: dict[str, dict[str, list[Any]]] = {}
        for row in rows:
            out.setdefault(row["key_id"], {}).setdefault(row["host_id"], []).append(row)
        return out


def _entry(
    key: Key,
    now: datetime,
    hosts: list[Host],
    rows: dict[str, list[Any]],
    requests: dict[str, list[ApprovalRequest]],
    budget: int,
) -> api.ReportKey:
    """One key of the inventory (holder names cut to ``budget``, counts kept whole)."""
    purpose = purpose_of(key.usage)
    limits = LIMITS[purpose]
    targeted = match_hosts(key.targets, hosts)
    statuses = [host_key_status(key, h, rows.get(h.id, [])) for h in targeted]
    holders: dict[int, list[str]] = {}
    for host_id, host_rows in rows.items():
        for row in host_rows:
            if str(row["status"]) == "installed":
                holders.setdefault(int(row["version"]), []).append(host_id)
    due = next_rotation(key, now)
    findings: list[str] = []
    if due is not None and due <= now:
        findings.append(f"rotation overdue since {due.isoformat()}")
    if key.primary_version is None:
        findings.append("no Active primary version")
    if key.policy.cryptoperiod > limits.max_cryptoperiod:
        findings.append("cryptoperiod exceeds the SP 800-57 maximum for its purpose")
    if ApprovalOperation.DESTROY not in key.policy.approvals_required:
        findings.append("destroy is not under dual control")
    behind = sum(1 for s in statuses if not s.converged)
    if behind:
        findings.append(f"{behind} of {len(statuses)} targeted host(s) not converged")
    versions = []
    for v in key.versions:
        names = sorted(holders.get(v.version, []))
        if v.state in _REVOKED and names:
            findings.append(
                f"v{v.version} is {v.state} but still installed on {len(names)} host(s)"
            )
        shown = names[: max(0, budget)]
        budget -= len(shown)
        versions.append(
            api.ReportVersion(
                version=v.version,
                state=str(v.state),
                primary=v.version == key.primary_version,
                origin=v.origin,
                created_at=v.created_at,
                activated_at=v.activated_at,
                deactivated_at=v.deactivated_at,
                compromised_at=v.compromised_at,
                destroyed_at=v.destroyed_at,
                holders=tuple(shown),
                holders_total=len(names),
            )
        )
    newest = key.versions[-1] if key.versions else None
    return api.ReportKey(
        name=key.name,
        type=str(key.type),
        purpose=str(purpose),
        usage=tuple(key.usage_list),
        cryptoperiod_s=int(key.policy.cryptoperiod.total_seconds()),
        max_cryptoperiod_s=int(limits.max_cryptoperiod.total_seconds()),
        grace_s=int(key.policy.grace.total_seconds()),
        approvals_required=tuple(sorted(str(a) for a in key.policy.approvals_required)),
        targets=tuple(key.targets.describe()),
        env=key.targets.effective_env,
        created_at=key.created_at,
        created_by=key.created_by,
        rotated_at=newest.created_at if newest is not None and newest.version > 1 else None,
        next_rotation_at=due,
        overdue=due is not None and due <= now,
        primary_version=key.primary_version,
        hosts_targeted=len(statuses),
        hosts_converged=len(statuses) - behind,
        versions=tuple(versions),
        approvals=tuple(
            api.ReportApproval(
                id=r.id,
                operation=r.operation,
                requester=r.requester,
                state=r.state,
                created_at=r.created_at,
                decisions=r.decisions,
            )
            for r in requests.get(f"key:{key.name}", [])
        ),
        findings=tuple(findings),
    )
