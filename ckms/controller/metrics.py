"""The controller's Prometheus metrics (``prometheus-client``), served on ``metrics_listen``.

Two kinds of values. Counters that the code already keeps in memory (SSH requests by route and
outcome, key operations by outcome, events published, acks applied or dropped, audit append
failures) are read at scrape time by a custom collector: no second bookkeeping. Gauges that need
the store (seal state, outbox backlog and publish lag, hosts by state, rotations due, per-key
convergence) come from a snapshot taken through the admin RPC's own read routes, as an auditor
would see them, at most every ``refresh_s`` (a scrape never costs more than one snapshot).
The commit → ack latency is a histogram observed once per host ack as the ack service
applies it.

Certificates: ckms has no certificate key type yet, so ``ckms_rotations_due`` (versions whose
rotation is due within 1/7/30 days) is the expiry signal today; a certificate type adds its own
``within`` series there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ckms.protocol import admin as api
from ckms.ssh import Principal
from ckms.store import audit as audit_log
from ckms.store import parse_time

if TYPE_CHECKING:
    from ckms.controller.service import Controller

__all__ = ["ACK_LATENCY_BUCKETS", "HOST_STATES", "ControllerMetrics"]

ACK_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
"""Commit → ack seconds: a healthy fleet acks within a second, a lagging one in minutes."""

HOST_STATES = ("ok", "pending", "drift", "stale", "failed", "revoked")
"""One state per host, the worst that applies (failed > stale > drift > pending > ok)."""

_READER = Principal("metrics", "auditor", "")
"""The snapshot reads as an auditor would: read routes only."""


class ControllerMetrics:
    """``await metrics.render()`` gives the exposition text; ``refresh()`` takes a snapshot."""

    def __init__(self, controller: Controller, *, refresh_s: float = 5.0) -> None:
        self._c = controller
        self._refresh_s = refresh_s
        self._taken = float("-inf")
        self.snapshot: dict[str, Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.ack_latency = Histogram(
            "ckms_ack_latency_seconds",
            "Seconds from an event's commit to each host's ack of it.",
            buckets=ACK_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    async def _call(self, method: str, params: dict[str, Any] | None, reply: type[Any]) -> Any:
        result = await self._c.rpc.call(_READER, method, params)
        raw = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
        return reply.model_validate(raw)

    async def refresh(self) -> None:
        """Take a new snapshot of the store-backed gauges."""
        status: api.StatusReply = await self._call("status", None, api.StatusReply)
        # In process, so every host row of every key (no reply bound to page under).
        fleet = await self._c.fleet.fleet_status(None, None)
        hosts = [
            h
            async for page in api.host_pages(
                lambda m, p, r: self._call(m, p.model_dump(mode="json"), r)
            )
            for h in page.hosts
        ]
        assert self._c.store is not None
        oldest = await self._c.store.fetchval(
            "SELECT MIN(created_at) FROM outbox WHERE sent_at IS NULL"
        )
        lag = 0.0
        if oldest:
            lag = max(0.0, (self._c.clock() - parse_time(str(oldest))).total_seconds())
        self.snapshot = {
            "status": status,
            "lag": lag,
            "hosts": host_states(fleet, hosts, set(status.stale_hosts)),
            "fleet": fleet.keys,
        }
        self._taken = time.monotonic()

    async def render(self) -> bytes:
        """The exposition text, with a snapshot at most ``refresh_s`` old."""
        if time.monotonic() - self._taken >= self._refresh_s:
            await self.refresh()
        return generate_latest(self.registry)


def host_states(
    fleet: api.FleetStatusReply, hosts: Sequence[api.HostInfo], stale: set[str]
) -> dict[str, int]:
    """Count hosts by their worst state (see :data:`HOST_STATES`)."""
    worst: dict[str, str] = {}
    rank = {state: i for i, state in enumerate(HOST_STATES)}

    def mark(host: str, state: str) -> None:
        if rank[state] > rank[worst.get(host, "ok")]:
            worst[host] = state

    for host in hosts:
        worst.setdefault(host.id, "ok")
        if host.revoked:
            worst[host.id] = "revoked"
        elif host.id in stale:
            mark(host.id, "stale")
    for key in fleet.keys:
        for row in key.hosts:
            if worst.get(row.host) == "revoked":
                continue
            if row.failed:
                mark(row.host, "failed")
            elif row.drift:
                mark(row.host, "drift")
            elif not row.converged:
                mark(row.host, "pending")
    counts = dict.fromkeys(HOST_STATES, 0)
    for state in worst.values():
        counts[state] += 1
    return counts


class _Collector(Collector):
    """Reads the in-memory counters and the latest snapshot at scrape time."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterable[Metric]:
        c = self._m._c
        requests = CounterMetricFamily(
            "ckms_ssh_requests",
            "SSH RPC requests served, by route and outcome.",
            labels=["route", "outcome"],
        )
        for (route, outcome), n in sorted(c.rpc.request_counts.items()):
            requests.add_metric([route, outcome], n)
        yield requests

        operations = CounterMetricFamily(
            "ckms_key_operations",
            "Key lifecycle operations (create, rotate, revoke, ...) by outcome.",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), n in sorted(c.lifecycle.outcomes.items()):
            operations.add_metric([operation, outcome], n)
        yield operations

        pub, acks = c.publisher.stats, c.acks.stats
        yield CounterMetricFamily(
            "ckms_events_published", "Events confirmed by Kafka.", value=pub.published
        )
        yield CounterMetricFamily(
            "ckms_publish_failures", "Failed attempts to publish the outbox.", value=pub.failures
        )
        yield CounterMetricFamily(
            "ckms_acks_applied", "Host acks applied to the fleet view.", value=acks.applied
        )
        dropped = CounterMetricFamily(
            "ckms_acks_dropped", "Host acks dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted((acks.dropped or {}).items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily(
            "ckms_audit_append_failures",
            "Audit records that could not be written (their operations failed).",
            value=audit_log.append_failures.count,
        )
        yield GaugeMetricFamily(
            "ckms_kafka_connected", "1 while the publisher reaches Kafka.", value=pub.connected
        )
        yield from self._snapshot()

    def _snapshot(self) -> Iterable[Metric]:
        snap = self._m.snapshot
        if not snap:
            return
        status: api.StatusReply = snap["status"]
        yield GaugeMetricFamily("ckms_sealed", "1 while the controller is sealed.", status.sealed)
        yield GaugeMetricFamily(
            "ckms_outbox_backlog_events",
            "Committed events not yet confirmed by Kafka.",
            status.kafka.backlog,
        )
        yield GaugeMetricFamily(
            "ckms_outbox_publish_lag_seconds",
            "Age of the oldest event not yet confirmed by Kafka (0 when none waits).",
            snap["lag"],
        )
        yield GaugeMetricFamily("ckms_keys", "Keys in the store.", status.keys)
        hosts = GaugeMetricFamily(
            "ckms_hosts", "Enrolled hosts by their worst state.", labels=["state"]
        )
        for state, n in snap["hosts"].items():
            hosts.add_metric([state], n)
        yield hosts
        due = GaugeMetricFamily(
            "ckms_rotations_due",
            "Key versions whose rotation is due within a horizon (cumulative).",
            labels=["within"],
        )
        for within in ("overdue", "1d", "7d", "30d"):
            due.add_metric([within], status.due_counts.get(within, 0))
        yield due
        yield GaugeMetricFamily(
            "ckms_approval_requests_pending",
            "Dual-control requests waiting for a second person.",
            status.pending_requests,
        )
        rollouts = GaugeMetricFamily(
            "ckms_rollouts",
            "Rollouts of rotated versions not ended, by state (halted and expired ones wait "
            "for an operator).",
            labels=["state"],
        )
        for state in ("running", "halted", "rolled-back", "expired"):
            rollouts.add_metric([state], sum(1 for r in status.rollouts if r.state == state))
        yield rollouts
        targeted = GaugeMetricFamily(
            "ckms_key_hosts_targeted", "Hosts a key targets.", labels=["key"]
        )
        converged = GaugeMetricFamily(
            "ckms_key_hosts_converged",
            "Targeted hosts that acknowledged every version they should hold.",
            labels=["key"],
        )
        for key in snap["fleet"]:
            targeted.add_metric([key.key], key.targeted)
            converged.add_metric([key.key], key.converged)
        yield targeted
        yield converged
