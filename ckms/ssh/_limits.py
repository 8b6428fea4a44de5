"""Bounds on the SSH endpoint's unauthenticated surface: connection caps and refusal bursts.

Anyone can open a TCP connection and offer a key, and username ``enroll`` accepts any key, so
strangers cost the controller CPU (a handshake is ~4 ms per side, docs/architecture.md §8),
memory and audit space. Modelled on OpenSSH's ``MaxStartups``/``PerSourceMaxStartups`` and
``PerSourcePenalties``:

- at most ``max_connections`` connections in total, and per source address at most
  ``max_unauthenticated_per_source`` that have not (yet) authenticated with a known key
  (enrolling agents count here). Known keys are not capped per source, so a fleet behind one
  NAT address keeps its one connection per host;
- refusals of strangers (an unknown key, a refused enrollment) spend a per-source token bucket
  (``refusal_burst`` at once, refilled at ``refusal_rate_per_s``); a source with an empty bucket
  is *penalised*: its new connections are closed on arrival, before any key exchange, until a
  token is back;
- strangers (connections not yet authenticated with a known key) may hold at most
  ``max_unauthenticated_share`` of ``max_connections`` together (never fewer than one
  source's cap), so a spray from many addresses
  cannot lock known agents and operators out; IPv6 sources count per /64 (one host's share of
  a subnet is trivially many addresses), IPv4-mapped ones as their IPv4 address;
- refusals are not audited one by one (10,000 junk requests would be 10,000 records): each
  source's refusals and dropped connections are summed into one :class:`RefusalBurst`, reported
  when the source has been quiet for ``burst_quiet_s``, or every ``burst_max_s`` while it lasts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from ckms.store import Clock, utc_now

__all__ = ["ConnectionLimits", "RefusalBurst", "SourceGuard", "source_of"]

log = logging.getLogger(__name__)

OVERFLOW_SOURCE = "*"
"""Where sources beyond ``max_sources`` are counted together (a spray of addresses)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The endpoint's caps; the defaults suit one controller serving ~10,000 agents."""

    max_connections: int = 16384
    max_unauthenticated_per_source: int = 16
    refusal_burst: int = 20
    refusal_rate_per_s: float = 0.5
    burst_quiet_s: float = 10.0
    burst_max_s: float = 60.0
    max_sources: int = 4096
    max_unauthenticated_share: float = 0.25


def source_of(address: str) -> str:
    """The source a peer address counts against: itself (IPv4), or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class RefusalBurst:
    """What one source was refused in one burst: counts by kind, and connections dropped."""

    source: str
    first_at: datetime
    last_at: datetime
    refused: dict[str, int]
    dropped: int

    @property
    def count(self) -> int:
        """Every refusal and dropped connection of the burst."""
        return sum(self.refused.values()) + self.dropped


BurstHook = Callable[[RefusalBurst], Awaitable[None]]


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Burst:
    first_at: datetime
    started: float
    last: float
    refused: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    timer: asyncio.TimerHandle | None = None


class SourceGuard:
    """Counts connections and refusals per source address and decides who is turned away."""

    def __init__(
        self,
        limits: ConnectionLimits,
        *,
        on_burst: BurstHook | None = None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._on_burst = on_burst
        self._clock = clock
        self._mono = monotonic
        self._unauthenticated: Counter[str] = Counter()
        self._strangers = 0
        self._buckets: dict[str, _Bucket] = {}
        self._bursts: dict[str, _Burst] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- connections ------------------------------------------------------------------------

    def admit(self, source: str, *, open_connections: int) -> str | None:
        """Count a new connection from ``source``, or return why it is turned away."""
        if open_connections >= self.limits.max_connections:
            reason = f"{open_connections} connections open (max_connections)"
        elif self._strangers >= self.stranger_slots:
            reason = f"{self._strangers} unauthenticated connections (max_unauthenticated_share)"
        elif self.penalised(source):
            reason = "penalised for refused attempts"
        elif self._unauthenticated[source] >= self.limits.max_unauthenticated_per_source:
            reason = "too many unauthenticated connections (max_unauthenticated_per_source)"
        else:
            self._unauthenticated[source] += 1
            self._strangers += 1
            return None
        self._note(source, dropped=True)
        return reason

    @property
    def stranger_slots(self) -> int:
        """How many unauthenticated connections may be open at once, from all sources."""
        share = int(self.limits.max_connections * self.limits.max_unauthenticated_share)
        return max(self.limits.max_unauthenticated_per_source, share)

    def authenticated(self, source: str) -> None:
        """A connection from ``source`` authenticated with a known key: no longer capped."""
        self._release(source)

    def closed(self, source: str) -> None:
        """An admitted connection that never authenticated with a known key has closed."""
        self._release(source)

    def _release(self, source: str) -> None:
        self._strangers -= 1
        self._unauthenticated[source] -= 1
        if self._unauthenticated[source] <= 0:
            del self._unauthenticated[source]

    # -- refusals ---------------------------------------------------------------------------

    def refused(self, source: str, kind: str) -> None:
        """A stranger from ``source`` was refused (``kind``: ``auth`` or ``rpc.<method>``)."""
        bucket = self._bucket(source, create=True)
        assert bucket is not None
        bucket.tokens = max(0.0, bucket.tokens - 1.0)
        self._note(source, kind=kind)

    def charge(self, source: str) -> None:
        """Spend one token of ``source``'s bucket for a refusal reported elsewhere (a known
        host's, audited on its own until the bucket is empty)."""
        bucket = self._bucket(source, create=True)
        assert bucket is not None
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def penalised(self, source: str) -> bool:
        """True while ``source`` has spent its refusal burst and not earned a token back."""
        bucket = self._bucket(source, create=False)
        return bucket is not None and bucket.tokens < 1.0

    def _key(self, source: str) -> str:
        if source in self._buckets or len(self._buckets) < self.limits.max_sources:
            return source
        self._sweep()
        return source if len(self._buckets) < self.limits.max_sources else OVERFLOW_SOURCE

    def _bucket(self, source: str, *, create: bool) -> _Bucket | None:
        now = self._mono()
        key = self._key(source)
        bucket = self._buckets.get(key)
        if bucket is None:
            if not create:
                return None
            bucket = self._buckets[key] = _Bucket(float(self.limits.refusal_burst), now)
        bucket.tokens = min(
            float(self.limits.refusal_burst),
            bucket.tokens + (now - bucket.at) * self.limits.refusal_rate_per_s,
        )
        bucket.at = now
        return bucket

    def _sweep(self) -> None:
        """Forget sources whose bucket has refilled: they are as good as new."""
        now, limits = self._mono(), self.limits
        for key, bucket in list(self._buckets.items()):
            if (
                bucket.tokens + (now - bucket.at) * limits.refusal_rate_per_s
                >= limits.refusal_burst
            ):
                del self._buckets[key]

    # -- bursts -----------------------------------------------------------------------------

    def _note(self, source: str, *, kind: str | None = None, dropped: bool = False) -> None:
        key = self._key(source) if source not in self._bursts else source
        now = self._mono()
        burst = self._bursts.get(key)
        if burst is None:
            burst = self._bursts[key] = _Burst(first_at=self._clock(), started=now, last=now)
            self._schedule(key, burst, self.limits.burst_quiet_s)
        burst.last = now
        if kind is not None:
            burst.refused[kind] += 1
        if dropped:
            burst.dropped += 1
        if now - burst.started >= self.limits.burst_max_s:
            self._emit(key)

    def _schedule(self, key: str, burst: _Burst, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): bursts are written by flush()
            return
        burst.timer = loop.call_later(max(delay, 0.0), self._check, key)

    def _check(self, key: str) -> None:
        burst = self._bursts.get(key)
        if burst is None:
            return
        quiet_for = self._mono() - burst.last
        if quiet_for >= self.limits.burst_quiet_s:
            self._emit(key)
        else:
            self._schedule(key, burst, self.limits.burst_quiet_s - quiet_for)

    def _emit(self, key: str) -> None:
        burst = self._bursts.pop(key)
        if burst.timer is not None:
            burst.timer.cancel()
        report = RefusalBurst(
            source=key,
            first_at=burst.first_at,
            last_at=self._clock(),
            refused=dict(burst.refused),
            dropped=burst.dropped,
        )
        log.warning(
            "refused %d attempts from %s (%s; %d connections dropped)",
            report.count,
            key,
            ", ".join(f"{k} {n}" for k, n in sorted(report.refused.items())) or "none",
            report.dropped,
        )
        if self._on_burst is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            task = loop.create_task(self._report(report))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _report(self, report: RefusalBurst) -> None:
        assert self._on_burst is not None
        try:
            await self._on_burst(report)
        except Exception:
            log.exception("could not record refused attempts from %s", report.source)

    async def flush(self) -> None:
        """Report every open burst now and wait until each report is written."""
        for key in list(self._bursts):
            self._emit(key)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
