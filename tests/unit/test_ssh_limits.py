"""The SSH endpoint's bounds on strangers, with the clocks moved by hand (no sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime

from ckms.ssh import ConnectionLimits, RefusalBurst
from ckms.ssh._limits import OVERFLOW_SOURCE, SourceGuard


class Clocks:
    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return datetime.fromtimestamp(1_800_000_000 + self.t, UTC)


def guard(**limits: float) -> tuple[SourceGuard, Clocks, list[RefusalBurst]]:
    clocks = Clocks()
    reports: list[RefusalBurst] = []

    async def record(burst: RefusalBurst) -> None:
        reports.append(burst)

    g = SourceGuard(
        ConnectionLimits(**limits),  # type: ignore[arg-type]
        on_burst=record,
        clock=clocks.wall,
        monotonic=clocks.mono,
    )
    return g, clocks, reports


async def test_a_spent_refusal_budget_drops_new_connections_until_it_refills() -> None:
    g, clocks, reports = guard(refusal_burst=3, refusal_rate_per_s=1.0)
    for _ in range(3):
        assert g.admit("10.0.0.9", open_connections=0) is None
        g.refused("10.0.0.9", "rpc.enroll")
        g.closed("10.0.0.9")
    assert g.penalised("10.0.0.9")
    assert "penalised" in (g.admit("10.0.0.9", open_connections=0) or "")
    assert g.admit("10.0.0.10", open_connections=0) is None  # other sources are not affected
    clocks.t += 1.0
    assert not g.penalised("10.0.0.9")
    await g.flush()
    by_source = {r.source: r for r in reports}
    assert by_source["10.0.0.9"].refused == {"rpc.enroll": 3}
    assert by_source["10.0.0.9"].dropped == 1 and by_source["10.0.0.9"].count == 4


async def test_caps_on_unauthenticated_connections_and_in_total() -> None:
    g, _clocks, _reports = guard(max_unauthenticated_per_source=2, max_connections=5)
    assert g.admit("a", open_connections=0) is None
    assert g.admit("a", open_connections=1) is None
    assert "unauthenticated" in (g.admit("a", open_connections=2) or "")
    g.authenticated("a")  # a known key: no longer counted against the source
    assert g.admit("a", open_connections=2) is None
    assert "max_connections" in (g.admit("b", open_connections=5) or "")


async def test_one_report_per_burst_with_counts_and_long_bursts_split() -> None:
    g, clocks, reports = guard(refusal_burst=10_000, burst_max_s=60.0)
    for _ in range(5000):
        g.refused("192.0.2.1", "auth")
        clocks.t += 0.01  # 50 s
    assert reports == [] and len(g._bursts) == 1
    for _ in range(2000):
        g.refused("192.0.2.1", "auth")
        clocks.t += 0.01  # past 60 s: the first report is due
    await g.flush()
    assert len(reports) == 2
    assert sum(r.count for r in reports) == 7000
    assert reports[0].first_at < reports[0].last_at <= reports[1].first_at


async def test_a_spray_of_sources_is_tracked_in_bounded_memory() -> None:
    g, _clocks, reports = guard(max_sources=100, refusal_rate_per_s=0.001)
    for i in range(5000):
        g.refused(f"2001:db8::{i:x}", "auth")
    assert len(g._buckets) <= 101 and len(g._bursts) <= 101
    await g.flush()
    assert sum(r.count for r in reports) == 5000
    assert any(r.source == OVERFLOW_SOURCE for r in reports)


async def test_strangers_from_many_addresses_leave_room_for_known_keys() -> None:
    """A spray of addresses fills at most its share of max_connections."""
    g, _clocks, _reports = guard(
        max_connections=40, max_unauthenticated_share=0.25, max_unauthenticated_per_source=2
    )
    admitted = sum(g.admit(f"10.1.0.{i}", open_connections=i) is None for i in range(30))
    assert admitted == 10
    assert "max_unauthenticated_share" in (g.admit("10.2.0.1", open_connections=30) or "")
    g.authenticated("10.1.0.0")  # a known key logged in: its slot goes back to the strangers
    assert g.admit("10.2.0.1", open_connections=30) is None


def test_ipv6_sources_count_per_64_and_mapped_ipv4_as_itself() -> None:
    from ckms.ssh._limits import source_of

    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("192.0.2.7") == "192.0.2.7"
