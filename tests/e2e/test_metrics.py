"""Prometheus metrics of a real controller and real agents, scraped over HTTP and parsed with
prometheus_client's own parser (and ``promtool check metrics`` where Debian's is installed)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ckms._kafka_security import KafkaLink
from ckms.cli._client import Connection
from ckms.controller.service import Controller
from ckms.errors import PermissionDeniedError, ProtocolError
from ckms.protocol import InstallSpec, Targets
from ckms.store import audit as audit_log
from ckms_agent.metrics import AgentMetrics
from tests.e2e.test_distribution import converged
from tests.support.cli import MovableClock, Operators
from tests.support.controller import running_controller
from tests.support.fleet import enroll_agent, running_agent, wait_until

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}
RAW = InstallSpec(path="/etc/ckms/{team}/{purpose}.key", format="raw")


async def http_get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    """One plain HTTP/1.1 request to 127.0.0.1:port; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by the client library's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def promtool_check(text: str) -> None:
    """``promtool check metrics``: Prometheus's own linter for names, types and help."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _outbox_sent(c: Controller) -> Callable[[], Awaitable[bool]]:
    async def sent() -> bool:
        return await c.publisher.backlog() == 0

    return sent


async def test_controller_metrics_move_with_a_rotation(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        metrics_listen="127.0.0.1:0",
    ) as c:
        assert c.metrics_endpoint is not None and c.metrics_endpoint.port
        port = c.metrics_endpoint.port
        hosts = {"web-1", "web-2"}
        configs = [await enroll_agent(c, tmp_path, h, WEB) for h in sorted(hosts)]
        async with running_agent(configs[0]), running_agent(configs[1]):
            await c.lifecycle.create(
                "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="a"
            )
            await wait_until(lambda: converged(c, "web/tls", hosts), what="first install")
            # Acks ride SSH: hosts may converge (sync, heartbeat drift) before Kafka has the
            # events; the published counters are compared once the outbox is empty.
            await wait_until(_outbox_sent(c), what="key.created published")
            c.metrics._taken = float("-inf")  # the snapshot is cached for a few seconds
            status, body = await http_get(port)
            assert status == 200
            before = samples(body.decode())
            await c.lifecycle.rotate("web/tls", actor="a")
            await wait_until(lambda: converged(c, "web/tls", hosts), what="rotation")
            await wait_until(lambda: _acked_all(c, 2, hosts), what="every ack applied")
            await wait_until(_outbox_sent(c), what="the rotation and its fleet.acked published")
            c.metrics._taken = float("-inf")
            status, body = await http_get(port)
        answered = await _acks_answering_events(c)
        text = body.decode()
        after = samples(text)

    rotate_ok = ("ckms_key_operations_total", (("operation", "rotate"), ("outcome", "ok")))
    assert before.get(rotate_ok, 0) == 0 and after[rotate_ok] == 1
    create_ok = ("ckms_key_operations_total", (("operation", "create"), ("outcome", "ok")))
    assert after[create_ok] == 1
    assert after[("ckms_events_published_total", ())] > before[("ckms_events_published_total", ())]
    # The histogram counts every ack that answered an event, one per host and version acked.
    count = after[("ckms_ack_latency_seconds_count", ())]
    assert count == answered and count >= before[("ckms_ack_latency_seconds_count", ())] + 2
    assert after[("ckms_ack_latency_seconds_bucket", (("le", "+Inf"),))] == count
    assert after[("ckms_hosts", (("state", "ok"),))] == 2
    assert after[("ckms_key_hosts_converged", (("key", "web/tls"),))] == 2
    assert after[("ckms_sealed", ())] == 0
    assert after[("ckms_outbox_backlog_events", ())] == 0
    sync_ok = ("ckms_ssh_requests_total", (("outcome", "ok"), ("route", "sync")))
    assert after[sync_ok] >= 2


async def _acked_all(c: Controller, version: int, hosts: set[str]) -> bool:
    assert c.store is not None
    rows = await c.store.fetchall(
        "SELECT host_id FROM fleet_state WHERE version = ? AND status = 'installed'", (version,)
    )
    return {r["host_id"] for r in rows} >= hosts


async def _acks_answering_events(c: Controller) -> int:
    """Acks the controller applied that name an event it published (the latency's base)."""
    assert c.store is not None
    published = {
        r["event_id"] for r in await c.store.fetchall("SELECT event_id FROM outbox")
    }
    records = await audit_log.load_records(c.store)
    return sum(
        1
        for r in records
        if r.action == "fleet.ack" and r.details.get("event_id") in published
    )


async def test_made_up_methods_do_not_grow_the_route_label(
    controller: Controller, tmp_path: Path
) -> None:
    """An attacker's method names land in one ``route="unknown"`` series, not one each."""
    ops = Operators(controller, tmp_path)
    await ops.add("audrey", "auditor")
    conn = Connection(
        controller=f"127.0.0.1:{controller.port}",
        identity=ops.people["audrey"].identity,
        user="audrey",
        fingerprint=controller.host_key_fingerprint,
    )
    async with conn.client() as rpc:
        for i in range(5):
            with pytest.raises(ProtocolError, match="unknown method"):
                await rpc.call(f"made.up{i}", None)
        with pytest.raises(PermissionDeniedError, match="may not call"):
            await rpc.call("key.rotate", {"name": "web/tls"})
    text = (await controller.metrics.render()).decode()
    routes = {
        dict(labels)["route"]
        for (name, labels) in samples(text)
        if name == "ckms_ssh_requests_total"
    }
    assert "unknown" in routes and not any(r.startswith("made.up") for r in routes)
    got = samples(text)
    assert got[("ckms_ssh_requests_total", (("outcome", "invalid"), ("route", "unknown")))] == 5
    assert got[("ckms_ssh_requests_total", (("outcome", "denied"), ("route", "key.rotate")))] == 1


async def test_agent_writes_a_textfile_and_serves_loopback(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "web-1", WEB)
    prom = tmp_path / "textfile" / "ckms_agent.prom"
    prom.parent.mkdir()  # node_exporter's collector directory
    env = {
        "CKMS_AGENT_METRICS_TEXTFILE": str(prom),
        "CKMS_AGENT_METRICS_LISTEN": "127.0.0.1:0",
        "CKMS_AGENT_METRICS_INTERVAL_S": "0.2",
    }
    async with running_agent(config, **env) as agent:
        await c.lifecycle.create(
            "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="a"
        )
        await wait_until(lambda: converged(c, "web/tls", {"web-1"}), what="install")

        def held() -> dict | None:
            if not prom.exists():
                return None
            got = samples(prom.read_text())
            return got if got.get(("ckms_agent_keys", (("status", "installed"),))) == 1 else None

        got = await wait_until(held, what="textfile shows the key")
        assert got[("ckms_agent_last_sync_timestamp_seconds", ())] > 0
        assert got[("ckms_agent_connected", ())] == 1
        assert prom.stat().st_mode & 0o777 == 0o644
        metrics = agent.metrics
        assert isinstance(metrics, AgentMetrics) and metrics.port
        status, body = await http_get(metrics.port)
        assert status == 200 and b"ckms_agent_keys" in body
        assert (await http_get(metrics.port, "/other"))[0] == 404
        assert (await http_get(metrics.port, method="POST"))[0] == 405
    # No temp file left once the agent stopped (while it runs, one exists during each rewrite,
    # every 0.2 s here: looking then raced the writer).
    assert not [p for p in prom.parent.iterdir() if p.name != prom.name]


async def test_promtool_accepts_every_metric(controller: Controller, tmp_path: Path) -> None:
    """Names, types and help pass ``promtool check metrics`` (Debian's prometheus package)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; make test does)")
    c = controller
    config = await enroll_agent(c, tmp_path, "web-1", WEB)
    async with running_agent(config) as agent:
        await c.lifecycle.create(
            "web/tls", "aes-256", targets=Targets(selectors=(WEB,)), install=RAW, actor="a"
        )
        await wait_until(lambda: converged(c, "web/tls", {"web-1"}), what="install")
        promtool_check((await c.metrics.render()).decode())
        promtool_check((await agent.metrics.render()).decode())


async def test_backlog_and_publish_lag_while_kafka_is_away(tmp_path: Path) -> None:
    """No broker: events wait in the outbox, and the lag grows with the controller's clock."""
    clock = MovableClock()
    async with running_controller(
        tmp_path / "controller", "127.0.0.1:1", "events", "acks", clock=clock
    ) as c:
        await c.lifecycle.create("web/tls", "aes-256", actor="a")
        clock.advance(timedelta(seconds=90))
        got = samples((await c.metrics.render()).decode())
    assert got[("ckms_outbox_backlog_events", ())] == 1
    assert got[("ckms_outbox_publish_lag_seconds", ())] >= 90
    assert got[("ckms_kafka_connected", ())] == 0
    assert got[("ckms_key_operations_total", (("operation", "create"), ("outcome", "ok")))] == 1
