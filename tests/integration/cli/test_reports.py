"""``ckms report inventory|compliance`` from the live system, checked against it: which hosts
(real agents) hold which version, dual-control requesters and approvers, origin, findings, the
audit head the report verified; HTML escapes what people typed; who may read reports."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from ckms.cli._errors import ExitCode
from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from ckms.protocol import InstallSpec, Targets
from ckms.protocol import admin as api
from ckms.store import audit as audit_log
from tests.support.cli import Operators
from tests.support.fleet import enroll_agent, running_agent, wait_until

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}
MARKUP = '<script>alert("x")</script> & <b>bold</b>'


async def converged(c: Controller, key: str, hosts: set[str]) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return {s.host for s in status if s.converged} >= hosts


@pytest.mark.requirement("PCI-3.6.1.1")
async def test_reports_match_the_live_state_and_escape_markup(
    controller: Controller, ops: Operators, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = controller
    configs = [await enroll_agent(c, tmp_path, h, WEB) for h in ("web-1", "web-2")]
    await c.lifecycle.create(
        "pay/db",
        "aes-256",
        targets=Targets(selectors=(WEB,)),
        install=InstallSpec(path="/keys/{purpose}", format="raw"),
        actor="alice",
    )
    key_file = tmp_path / "sign.pem"
    key_file.write_bytes(base64.b64encode(os.urandom(32)))
    run = await ops.ckms("key", "import", "pay/mac", "--type", "hmac-sha256", "--file",
                         str(key_file), "--file-format", "base64", "--approvals", "none",
                         who="alice")  # fmt: skip
    assert run.rc == 0, run.stderr
    async with running_agent(configs[0]), running_agent(configs[1]):
        await wait_until(lambda: converged(c, "pay/db", {"web-1", "web-2"}), what="installed")
    # Dual control: one policy change approved by carol, one rejected by bob with markup.
    for _ in range(2):
        run = await ops.ckms("key", "policy", "pay/db", "--grace", "10d", who="alice")
        assert run.rc == ExitCode.APPROVAL_REQUIRED, run.stderr
    first, second = sorted(await c.admin.requests.list(), key=lambda r: r.created_at)
    assert (await ops.ckms("approve", first.id, who="carol")).rc == 0
    rejected = await ops.ckms("request", "reject", second.id, "--reason", MARKUP, who="bob")
    assert rejected.rc == 0, rejected.stderr

    run = await ops.ckms("report", "inventory", "--json", who="erin")
    assert run.rc == 0, run.stderr
    report = run.json()
    assert report["report"] == "inventory"
    keys = {k["name"]: k for k in report["keys"]}
    assert sorted(keys) == sorted(k.name for k in await c.lifecycle.list_keys())
    db, mac = keys["pay/db"], keys["pay/mac"]
    assert c.store is not None
    installed = await c.store.fetchall(
        "SELECT host_id FROM fleet_state f JOIN keys k ON k.id = f.key_id "
        "WHERE k.name = 'pay/db' AND f.version = 1 AND f.status = 'installed' ORDER BY host_id"
    )
    assert db["versions"][0]["holders"] == [r["host_id"] for r in installed] == ["web-1", "web-2"]
    assert (db["hosts_targeted"], db["hosts_converged"]) == (2, 2)
    assert db["type"] == "aes-256" and db["purpose"] == "encryption"
    assert db["cryptoperiod_s"] == 365 * 86400 and db["overdue"] is False
    requests = {r["id"]: r for r in db["approvals"]}
    assert requests[first.id]["requester"] == "alice"
    assert [(d["decision"], d["by"]) for d in requests[first.id]["decisions"]] == [
        ("approve", "carol")
    ]
    assert requests[second.id]["state"] == "rejected"
    assert requests[second.id]["decisions"][0]["reason"] == MARKUP
    assert [v["origin"] for v in mac["versions"]] == ["imported"]
    assert mac["findings"] == ["destroy is not under dual control"]
    assert db["findings"] == []
    summary = report["summary"]
    assert summary["audit"]["ok"] and summary["keys"] == 2 and summary["hosts"] == 2
    records = await audit_log.load_records(c.store)
    assert records[summary["audit"]["size"] - 1].hash == summary["audit"]["head_hash"]
    checkpoints = await audit_log.load_checkpoints(c.store)
    assert summary["audit"]["checkpoint_head"] in {cp.head_hash for cp in checkpoints}
    assert [p["name"] for p in summary["custodians"]] == ["carol"]
    assert {p["name"] for p in summary["approvers"]} == {"alice", "bob", "carol"}
    assert report["totals"] == {
        "keys": 2, "keys_with_findings": 1, "rotations_overdue": 0, "findings": 1,
    }  # fmt: skip

    # HTML: what people typed is escaped, nothing can run.
    page = tmp_path / "inventory.html"
    run = await ops.ckms("report", "inventory", "--html", "-o", str(page), who="erin")
    assert run.rc == 0, run.stderr
    text = page.read_text()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
    assert "<script" not in text and "<b>" not in text
    assert "web-1, web-2" in text and "pay/mac" in text

    # Compliance lists only what needs attention, with the same totals.
    run = await ops.ckms("report", "compliance", "--json", who="dave")
    assert run.rc == 0, run.stderr
    compliance = run.json()
    assert [k["name"] for k in compliance["keys"]] == ["pay/mac"]
    assert compliance["totals"]["keys"] == 2

    # A page's holder names are bounded: past the bound they are cut, the count stays whole.
    monkeypatch.setattr(api, "REPORT_HOLDERS_MAX", 1)
    run = await ops.ckms("report", "inventory", "--json", who="erin")
    assert run.rc == 0, run.stderr
    cut = {k["name"]: k for k in run.json()["keys"]}
    assert len(cut["pay/db"]["versions"][0]["holders"]) == 1
    assert cut["pay/db"]["versions"][0]["holders_total"] == 2
    assert sorted(cut) == ["pay/db", "pay/mac"]
    run = await ops.ckms("report", "inventory", who="erin")
    assert run.rc == 0 and "(+1 more)" in run.stdout


async def test_who_may_read_reports(controller: Controller, ops: Operators) -> None:
    for who in ("alice", "dave", "erin"):
        run = await ops.ckms("report", "compliance", who=who)
        assert run.rc == 0, run.stderr
    run = await ops.ckms("report", "inventory", who="carol")
    assert run.rc == ExitCode.FAILED
    assert "role custodian may not call report.summary" in run.stderr
    assert (
        json.loads((await ops.ckms("report", "inventory", "--json", who="erin")).stdout)["keys"]
        == []
    )
