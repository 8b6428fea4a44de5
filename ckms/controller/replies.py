"""Domain models as the admin RPC shows them: the one place a model becomes a reply.

Pure conversions (no I/O): keys, versions, policies, hosts, operators and approval requests into
the reply models of :mod:`ckms.protocol.admin`. No reply carries key material or an operator's
SSH key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from ckms.controller.approvals import ApprovalRequest
from ckms.controller.duework import rotation_due
from ckms.controller.keyview import AnyKey
from ckms.controller.models import Host, Key, Policy, Rollout
from ckms.controller.operators import Operator
from ckms.controller.rollout_plan import GateVerdict
from ckms.controller.targets import host_matches
from ckms.protocol import admin as api
from ckms.store import parse_time

__all__ = [
    "history_entry",
    "host_info",
    "key_info",
    "key_summary",
    "next_rotation",
    "operator_info",
    "policy_info",
    "request_info",
    "rollout_info",
]

_ROTATION_HORIZON = timedelta(days=4 * 365)


def policy_info(policy: Policy) -> api.PolicyInfo:
    """A policy as the wire shows it (seconds, sorted operations)."""
    dumped = policy.model_dump(mode="json")
    return api.PolicyInfo(
        cryptoperiod_s=dumped["cryptoperiod"],
        grace_s=dumped["grace"],
        activation_delay_s=dumped["activation_delay"],
        max_staleness_s=dumped["max_staleness"],
        approvals_required=tuple(dumped["approvals_required"]),
        cert_lifetime_s=dumped["cert_lifetime"],
        activate_when=policy.activate_when,
        activation_deadline_s=dumped["activation_deadline"],
        activation_threshold_pct=policy.activation_threshold_pct,
    )


def next_rotation(key: AnyKey, now: datetime) -> datetime | None:
    """When the key's primary is due to rotate (None: no Active primary, or a version waits)."""
    due = rotation_due(key)
    return due if due is not None and due <= now + _ROTATION_HORIZON else None


def key_info(key: Key, *, now: datetime, hosts_targeted: int | None = None) -> api.KeyInfo:
    """A key with its versions (never material)."""
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


def key_summary(key: AnyKey, *, now: datetime) -> api.KeySummary:
    """A key in one line of ``key list``."""
    states: dict[str, int] = {}
    for v in key.versions:
        states[str(v.state)] = states.get(str(v.state), 0) + 1
    primary = key.primary
    return api.KeySummary(
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


def history_entry(row: Mapping[str, Any]) -> api.HistoryEntry:
    """One state transition of a version."""
    return api.HistoryEntry(**{**row, "at": parse_time(row["at"])})


def host_info(
    host: Host, facts: Mapping[str, Any], *, stale: bool, keys: Iterable[AnyKey]
) -> api.HostInfo:
    """A host with the keys that target it; ``facts`` are its last-seen time and wrap suite."""
    return api.HostInfo(
        id=host.id,
        labels=host.labels,
        enrolled_at=host.enrolled_at,
        revoked=host.revoked,
        last_seen_at=facts.get("last_seen_at"),
        stale=stale,
        wrap_suite=facts.get("wrap_suite"),
        keys=tuple(k.name for k in keys if host_matches(k.targets, host)),
    )


def operator_info(op: Operator) -> api.OperatorInfo:
    """An operator without their SSH key."""
    return api.OperatorInfo(**op.model_dump(exclude={"ssh_public_key"}))


def request_info(request: ApprovalRequest, now: datetime) -> api.RequestInfo:
    """A dual-control request with whether it has expired at ``now``."""
    return api.RequestInfo(expired=request.expired_at(now), **request.model_dump())


def rollout_info(
    key: str, rollout: Rollout, verdict: GateVerdict | None, primary: int | None
) -> api.RolloutInfo:
    """A rollout as the wire shows it, with its gate now when it is not ended."""
    return api.RolloutInfo(
        key=key,
        version=rollout.version,
        state=rollout.state,
        stage=rollout.stage,
        stages=rollout.stages,
        gate=rollout.gate,
        spread=rollout.spread,
        released=None if rollout.released is None else len(rollout.released),
        threshold_pct=rollout.threshold_pct,
        max_failures=rollout.max_failures,
        primary_version=primary,
        started_at=rollout.started_at,
        started_by=rollout.started_by,
        stage_started_at=rollout.stage_started_at,
        deadline_at=rollout.deadline_at,
        updated_at=rollout.updated_at,
        reason=rollout.reason,
        hosts=None if verdict is None else verdict.hosts,
        acked=() if verdict is None else verdict.acked,
        waiting=() if verdict is None else verdict.waiting,
        failed=() if verdict is None else verdict.failed,
        uncounted=() if verdict is None else verdict.uncounted,
        gate_holds=None if verdict is None else verdict.holds,
    )
