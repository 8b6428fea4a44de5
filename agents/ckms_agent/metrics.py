"""The agent's Prometheus metrics: a textfile for node_exporter, optionally loopback ``/metrics``.

Hosts get no new listening port by default: with ``metrics_textfile`` set, the agent rewrites
that ``.prom`` file every ``metrics_interval_s`` (and after each sync) for node_exporter's
textfile collector, atomically (temp file in the same directory, fsync, rename), so the
collector never reads half a file. ``metrics_listen`` (loopback only) also serves the same text
over HTTP. Values come from the running agent and its state DB; files are hashed, never read
out, and nothing here names key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ckms._exposition import MetricsEndpoint, parse_listen
from ckms_agent.plan import is_stale

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ckms_agent.daemon import Agent

__all__ = ["KEY_STATUSES", "AgentMetrics", "write_textfile"]

log = logging.getLogger(__name__)

KEY_STATUSES = ("installed", "stale", "drifted")
"""One status per held key, the worst that applies (drifted > stale > installed)."""


def write_textfile(path: Path, text: bytes) -> None:
    """Replace ``path`` atomically (mode 0644: node_exporter runs as another user)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Families:
    """The families read for one page, as a prometheus_client collector."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class AgentMetrics:
    """Gathers the agent's metrics; ``run()`` keeps the textfile and the endpoint going."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.last_sync: float | None = None
        self.event_lag_s: float | None = None
        self._endpoint: MetricsEndpoint | None = None
        self._wake = asyncio.Event()
        self._warned = False

    @property
    def port(self) -> int | None:
        """The loopback port once serving (None without ``metrics_listen``)."""
        return self._endpoint.port if self._endpoint is not None else None

    def synced(self, at: float) -> None:
        """Note a completed sync (and refresh the textfile soon)."""
        self.last_sync = at
        self._wake.set()

    def event(self, lag_s: float) -> None:
        """Note the lag of an event this host acted on (its commit to now)."""
        self.event_lag_s = max(0.0, lag_s)

    async def families(self) -> list[Metric]:
        """Every metric family, read now."""
        # prometheus_client loads on the first page: an agent without metrics never needs it.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent = self._agent
        now = agent._clock()
        held = await agent.state.keys()
        last = await agent.state.last_contact()
        default = agent.config.default_max_staleness_s
        statuses = dict.fromkeys(KEY_STATUSES, 0)
        versions = 0
        for record in held.values():
            versions += len(record.versions)
            if not agent._installer.files_match(record.files):
                statuses["drifted"] += 1
            elif is_stale(record, last_contact=last, now=now, default=default):
                statuses["stale"] += 1
            else:
                statuses["installed"] += 1
        keys = GaugeMetricFamily("ckms_agent_keys", "Keys held, by status.", labels=["status"])
        for status, n in statuses.items():
            keys.add_metric([status], n)
        out: list[Metric] = [
            keys,
            GaugeMetricFamily("ckms_agent_versions_held", "Key versions on this host.", versions),
            GaugeMetricFamily(
                "ckms_agent_connected", "1 while connected to the controller.", agent.connected
            ),
            GaugeMetricFamily(
                "ckms_agent_last_sync_timestamp_seconds",
                "Unix time of the last completed sync with the controller (0: none yet).",
                self.last_sync or 0.0,
            ),
            GaugeMetricFamily(
                "ckms_agent_last_contact_timestamp_seconds",
                "Unix time of the last contact with the controller (0: never).",
                last or 0.0,
            ),
            GaugeMetricFamily(
                "ckms_agent_contact_age_seconds",
                "Seconds since the last contact with the controller (staleness; -1: never).",
                -1.0 if last is None else max(0.0, now - last),
            ),
            GaugeMetricFamily(
                "ckms_agent_event_lag_seconds",
                "Seconds from the commit of the last event acted on to its handling here.",
                self.event_lag_s or 0.0,
            ),
            GaugeMetricFamily(
                "ckms_agent_pending_acks",
                "Acks written but not yet confirmed sent.",
                await agent.state.pending_ack_count(),
            ),
            CounterMetricFamily(
                "ckms_agent_install_failures",
                "Changes that failed to install (bad material, refused hooks).",
                value=agent.ops.install_failures,
            ),
            CounterMetricFamily(
                "ckms_agent_reconciles",
                "Completed syncs with the controller.",
                value=agent.reconciles,
            ),
        ]
        events = CounterMetricFamily(
            "ckms_agent_events", "Events read, by outcome.", labels=["outcome"]
        )
        for outcome, n in sorted(agent.event_stats.items()):
            events.add_metric([outcome], n)
        out.append(events)
        return out

    async def render(self) -> bytes:
        """The exposition text."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(await self.families()))
        return generate_latest(registry)

    async def _write(self, path: Path) -> None:
        text = await self.render()
        try:
            await asyncio.to_thread(write_textfile, path, text)
            self._warned = False
        except OSError as exc:
            if not self._warned:  # once per outage, not every interval
                log.warning("cannot write metrics textfile %s: %s", path, exc.strerror or exc)
                self._warned = True

    async def run(self) -> None:
        """Serve and write until cancelled (the agent's task group runs this)."""
        cfg = self._agent.config
        if cfg.metrics_listen is not None:
            host, port = parse_listen(cfg.metrics_listen, loopback_only=True)
            self._endpoint = MetricsEndpoint(self.render, host, port)
            await self._endpoint.start()
        try:
            while True:
                self._wake.clear()
                if cfg.metrics_textfile is not None:
                    await self._write(cfg.metrics_textfile)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.metrics_interval_s)
        finally:
            if self._endpoint is not None:
                await self._endpoint.close()
