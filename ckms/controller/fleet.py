"""The fleet view: which host holds which version, as acks and heartbeats report it.

Queries only (the rows are written by :mod:`ckms.controller.acks` and by agent heartbeats):
per key and host, whether the host acknowledged every version it should hold
(:func:`~ckms.controller.desired.desired_versions`) and no other; drift (a heartbeat newer than
the last ack reporting something else); stale hosts; and the fleet rows of ``fleet status``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ckms.controller.desired import desired_versions, distributable_versions, drifts
from ckms.controller.duework import due_keys, plan_due_work
from ckms.controller.hosts import HostRegistry
from ckms.controller.keyview import AnyKey
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import Host, Key, Targets
from ckms.controller.replies import host_info
from ckms.controller.rollouts import RolloutDriver
from ckms.controller.targets import host_matches, match_hosts
from ckms.protocol import admin as api
from ckms.store import Clock, Store, parse_time, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostKeyStatus:
    """One host's standing for one key: what it should hold and what it acknowledged."""

    host: str
    key: str
    primary: int | None
    versions: dict[int, str]
    digests_ok: bool
    updated_at: datetime | None
    latency_ms: float | None
    converged: bool
    failed: bool
    error: str | None = None


async def key_fleet_status(
    store: Store, lifecycle: Lifecycle, hosts: HostRegistry, name: str
) -> list[HostKeyStatus]:
    """Per targeted host: has it acknowledged every version it should hold (and no revoked one)?

    A host is converged for a key when its acks say ``installed`` for every distributable
    version with the right digest and ``removed`` (or nothing) for every other version.
    """
    key = await lifecycle.get(name)
    targeted = match_hosts(key.targets, await hosts.list())
    rows = await store.fetchall(
        "SELECT host_id, version, status, digest, updated_at, latency_ms, error FROM fleet_state "
        "WHERE key_id = ?",
        (key.id,),
    )
    by_host: dict[str, list[Any]] = {}
    for row in rows:
        by_host.setdefault(row["host_id"], []).append(row)
    return [host_key_status(key, host, by_host.get(host.id, [])) for host in targeted]


def host_key_status(key: Key, host: Host, rows: list[Any]) -> HostKeyStatus:
    """One host's standing for ``key`` from its ``fleet_state`` rows of that key (the one
    convergence rule: what :func:`desired_versions` says it should hold, and nothing else)."""
    want = {v.version: v.digest for v in desired_versions(key, host)}
    got = {int(r["version"]): r for r in rows}
    versions = {v: str(r["status"]) for v, r in got.items()}
    failed = any(str(r["status"]) == "failed" for r in rows if int(r["version"]) in want)
    digests_ok = all(
        v in got and str(got[v]["status"]) == "installed" and got[v]["digest"] == d
        for v, d in want.items()
    )
    clean = all(str(r["status"]) != "installed" for v, r in got.items() if v not in want)
    stamps = [parse_time(r["updated_at"]) for r in rows]
    latencies = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
    return HostKeyStatus(
        host=host.id,
        key=key.name,
        primary=key.primary_version,
        versions=versions,
        digests_ok=digests_ok,
        updated_at=max(stamps) if stamps else None,
        latency_ms=max(latencies) if latencies else None,
        converged=digests_ok and clean,
        failed=failed,
        error=next(
            (
                r["error"]
                for r in sorted(rows, key=lambda r: r["updated_at"], reverse=True)
                if str(r["status"]) == "failed" and r["error"]
            ),
            None,
        ),
    )


DEFAULT_STALENESS = timedelta(days=1)
"""How long a host that no key targets may go unseen before it is called stale."""

DUE_HORIZON = timedelta(days=30)
"""How far ahead ``status`` lists rotations."""

_DUE_BUCKETS = (
    ("overdue", timedelta(0)),
    ("1d", timedelta(days=1)),
    ("7d", timedelta(days=7)),
    ("30d", DUE_HORIZON),
)


@dataclass(frozen=True)
class DueSummary:
    """What ``status`` says is due: rotations within the horizon, counts by how soon, and how
    many activations and deactivations are due now."""

    rotations: tuple[api.DueEntry, ...]
    counts: dict[str, int]
    activations: int
    deactivations: int


class FleetView:
    """The fleet queries behind ``status``, ``host list|show`` and ``fleet status``."""

    def __init__(
        self,
        store: Store,
        lifecycle: Lifecycle,
        hosts: HostRegistry,
        *,
        clock: Clock = utc_now,
        rollouts: RolloutDriver | None = None,
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._hosts = hosts
        self._clock = clock
        self._rollouts = rollouts

    async def rollouts(self) -> list[api.RolloutInfo]:
        """Every rollout not ended, with the hosts holding each up (``status``)."""
        if self._rollouts is None:
            return []
        return [v.info() for v in await self._rollouts.views()]

    async def host_facts(self, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Last-seen time, last report and wrap suite of every host (or of ``ids``), in one
        query: a page of hosts reads its own rows, not the whole fleet's."""
        sql = "SELECT id, last_seen_at, reported, wrap_suite FROM hosts"
        if ids is None:
            rows = await self._store.fetchall(sql)
        elif not ids:
            return {}
        else:
            marks = ",".join("?" * len(ids))
            rows = await self._store.fetchall(f"{sql} WHERE id IN ({marks})", tuple(ids))
        return {
            row["id"]: {
                "last_seen_at": parse_time(row["last_seen_at"]) if row["last_seen_at"] else None,
                "reported": json.loads(row["reported"]) if row["reported"] else None,
                "wrap_suite": row["wrap_suite"],
            }
            for row in rows
        }

    async def due(self, now: datetime) -> DueSummary:
        """Rotations due within :data:`DUE_HORIZON` and what is due now.

        Only the keys due within the horizon are planned (the next-due index), not every key.
        """
        horizon = now + DUE_HORIZON
        due_soon, _ = await due_keys(self._store, horizon)
        soon = plan_due_work(due_soon, horizon)
        current = plan_due_work(due_soon, now)
        rotations = tuple(
            api.DueEntry(key=i.key, version=i.version, due_at=i.due_at) for i in soon.rotate
        )
        counts = {
            label: sum(1 for r in rotations if r.due_at <= now + delta)
            for label, delta in _DUE_BUCKETS
        }
        return DueSummary(rotations, counts, len(current.activate), len(current.deactivate))

    async def stale_hosts(
        self,
        keys: Sequence[AnyKey],
        hosts: list[Host],
        now: datetime,
        facts: dict[str, dict[str, Any]] | None = None,
    ) -> list[str]:
        """Hosts not seen for longer than the shortest max staleness of the keys they hold.

        Keys share one targets object per distinct targets (as read from the store), so each
        host is matched against the distinct targets, not against every key: 100,000 keys of
        a fleet have a few hundred.
        """
        if facts is None:
            facts = await self.host_facts()
        shortest: dict[int, tuple[Targets, timedelta]] = {}
        for k in keys:
            seen = shortest.get(id(k.targets))
            limit = k.policy.max_staleness
            if seen is not None and seen[0] is k.targets:
                limit = min(limit, seen[1])
            shortest[id(k.targets)] = (k.targets, limit)
        stale = []
        for host in hosts:
            if host.revoked:
                continue
            limits = [limit for t, limit in shortest.values() if host_matches(t, host)]
            limit = min(limits, default=DEFAULT_STALENESS)
            seen = facts.get(host.id, {}).get("last_seen_at") or host.enrolled_at
            if seen is None or now - seen > limit:
                stale.append(host.id)
        return stale

    async def host_infos(self, hosts: list[Host]) -> list[api.HostInfo]:
        """Hosts as the wire shows them, with the keys that target each and whether it is stale."""
        now = self._clock()
        keys = list((await self._lifecycle.current_keys()).values())
        facts = await self.host_facts([h.id for h in hosts])
        stale = set(await self.stale_hosts(keys, hosts, now, facts))
        return [host_info(h, facts.get(h.id, {}), stale=h.id in stale, keys=keys) for h in hosts]

    async def fleet_status(
        self, key: str | None, limit: int | None, after: str | None = None
    ) -> api.FleetStatusReply:
        """Per key: host x version x status x age, converged %, failures and drift first.

        One key, or one page of every key named after ``after``: keys are added until the page
        holds :data:`~ckms.protocol.admin.FLEET_ROWS_MAX` host rows or
        :data:`~ckms.protocol.admin.FLEET_KEYS_MAX` keys, so a reply stays bounded however many
        hosts and keys there are. ``limit`` None (in-process readers only) keeps every row.
        """
        now = self._clock()
        lc = self._lifecycle
        facts = await self.host_facts()
        hosts = {h.id: h for h in await self._hosts.list()}
        if key is not None:
            fleet = await self._key_fleet(await lc.get(key), now, facts, hosts, limit)
            return api.FleetStatusReply(keys=(fleet,))
        out: list[api.KeyFleet] = []
        rows = 0
        cursor = after
        while True:
            batch = await lc.page(cursor, api.FLEET_KEYS_MAX)
            for k in batch:
                fleet = await self._key_fleet(k, now, facts, hosts, limit)
                shown = len(fleet.hosts)
                full = len(out) == api.FLEET_KEYS_MAX or rows + shown > api.FLEET_ROWS_MAX
                if out and full and limit is not None:
                    return api.FleetStatusReply(keys=tuple(out), next=out[-1].key)
                out.append(fleet)
                rows += shown
            if len(batch) < api.FLEET_KEYS_MAX:
                return api.FleetStatusReply(keys=tuple(out))
            cursor = batch[-1].name

    async def _key_fleet(
        self,
        k: AnyKey,
        now: datetime,
        facts: dict[str, dict[str, Any]],
        hosts: dict[str, Host],
        limit: int | None,
    ) -> api.KeyFleet:
        rows = []
        for s in await key_fleet_status(self._store, self._lifecycle, self._hosts, k.name):
            report = facts.get(s.host, {}).get("reported")
            rows.append(
                _fleet_host(s, now, drift=s.converged and _drifts(k, hosts[s.host], s, report))
            )
        rows.sort(key=lambda h: (not h.failed, not h.drift, h.converged, h.host))
        converged = sum(1 for h in rows if h.converged)
        shown = rows if limit is None else rows[:limit]
        rollout = None
        if self._rollouts is not None and k.rollout is not None and k.rollout.live:
            rollout = (await self._rollouts.view(k)).info()
        return api.KeyFleet(
            key=k.name,
            primary_version=k.primary_version,
            wanted_versions=tuple(sorted(v.version for v in distributable_versions(k))),
            targeted=len(rows),
            converged=converged,
            failed=sum(1 for h in rows if h.failed),
            drift=sum(1 for h in rows if h.drift),
            converged_pct=round(100.0 * converged / len(rows), 1) if rows else 100.0,
            hosts=tuple(shown),
            truncated=len(rows) - len(shown),
            rollout=rollout,
        )


def _drifts(key: AnyKey, host: Host, status: HostKeyStatus, report: dict[str, Any] | None) -> bool:
    """Drift: the acks say the host is current, but a heartbeat sent after its last ack says it
    holds something else (a heartbeat from before a rotation is not drift)."""
    if report is None:
        return False
    if status.updated_at is not None and parse_time(report["at"]) <= status.updated_at:
        return False
    held = ((i.get("key"), i["version"], i["digest"]) for i in report["installed"])
    return drifts(key, host, held)


def _fleet_host(s: HostKeyStatus, now: datetime, *, drift: bool) -> api.FleetHost:
    age = None if s.updated_at is None else round((now - s.updated_at).total_seconds(), 3)
    return api.FleetHost(
        host=s.host,
        versions=s.versions,
        converged=s.converged,
        failed=s.failed,
        drift=drift,
        digests_ok=s.digests_ok,
        updated_at=s.updated_at,
        age_s=age,
        latency_ms=s.latency_ms,
        error=s.error,
    )
