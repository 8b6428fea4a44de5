"""The report's content against the live state: overdue rotations on the injected clock, the
findings, paging in name order, the audit head and checkpoint it verified."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ckms.controller.approvals import ApprovalBook
from ckms.controller.fleet import FleetView
from ckms.controller.hosts import HostRegistry
from ckms.controller.lifecycle import Lifecycle, NewKey
from ckms.controller.models import Policy
from ckms.controller.operators import OperatorRegistry
from ckms.controller.report import Reports
from ckms.controller.sealing import Vault
from ckms.protocol import admin as api
from ckms.store import Store
from ckms.store import audit as audit_log
from tests.unit.controller.conftest import FakeClock


@pytest.fixture
def reports(store: Store, vault: Vault, lifecycle: Lifecycle, clock: FakeClock) -> Reports:
    hosts = HostRegistry(store, vault, clock=clock)

    async def checkpoint() -> int | None:
        return (await vault.checkpoint_audit()).size

    return Reports(
        store=store,
        vault=vault,
        lifecycle=lifecycle,
        hosts=hosts,
        operators=OperatorRegistry(store, clock=clock),
        book=ApprovalBook(store, clock=clock),
        fleet=FleetView(store, lifecycle, hosts, clock=clock),
        checkpoint=checkpoint,
        clock=clock,
    )


async def every_key(reports: Reports, limit: int) -> list[api.ReportKeysReply]:
    pages, after = [], None
    while True:
        page = await reports.keys(after, limit)
        pages.append(page)
        if page.next is None:
            return pages
        after = page.next


@pytest.mark.requirement("PCI-3.6.1.1")
async def test_overdue_rotations_and_findings_follow_the_clock(
    reports: Reports, lifecycle: Lifecycle, clock: FakeClock
) -> None:
    await lifecycle.create("pay/db", "aes-256", actor="alice")
    await lifecycle.create("pay/sign", "ed25519", actor="alice")
    lax = Policy.model_validate(
        {**(await lifecycle.get("pay/db")).policy.model_dump(mode="json"), "approvals_required": []}
    )
    await lifecycle.set_policy("pay/db", lax, actor="alice")
    clock.advance(days=200)
    await lifecycle.rotate("pay/sign", actor="alice")

    (page,) = await every_key(reports, 10)
    db, sign = page.keys
    assert (db.name, db.type, db.purpose) == ("pay/db", "aes-256", "encryption")
    assert db.cryptoperiod_s == 365 * 86400 and not db.overdue and db.rotated_at is None
    assert db.findings == ("destroy is not under dual control",)
    assert sign.rotated_at == clock.now and sign.primary_version == 2
    assert [v.version for v in sign.versions] == [1, 2]
    assert sign.next_rotation_at == clock.now + timedelta(days=365)

    clock.advance(days=200)  # pay/db is now 400 days into a 365-day cryptoperiod
    (page,) = await every_key(reports, 10)
    db, sign = page.keys
    assert db.overdue and db.next_rotation_at is not None and db.next_rotation_at < clock.now
    assert db.findings[0].startswith("rotation overdue since ")
    assert not sign.overdue and sign.findings == ()
    summary = await reports.summary()
    assert summary.rotations_overdue == 1 and summary.keys == 2
    assert "1 rotation(s) overdue" in summary.findings


async def test_pages_cover_every_key_once_in_name_order(
    reports: Reports, lifecycle: Lifecycle
) -> None:
    names = [f"team{i:02d}/k" for i in range(25)]
    await lifecycle.create_many([NewKey(name=n, type="hmac-sha256") for n in names], actor="a")
    pages = await every_key(reports, 10)
    assert [len(p.keys) for p in pages] == [10, 10, 5]
    assert [k.name for p in pages for k in p.keys] == names


async def test_the_summary_names_the_head_and_checkpoint_it_verified(
    reports: Reports, lifecycle: Lifecycle, store: Store
) -> None:
    await lifecycle.create("pay/db", "aes-256", actor="alice")
    summary = await reports.summary()
    records = await audit_log.load_records(store)
    checkpoints = await audit_log.load_checkpoints(store)
    assert summary.audit.ok and summary.audit.size == len(records)
    assert summary.audit.head_hash == records[-1].hash
    assert summary.audit.checkpoint_size == checkpoints[-1].size == len(records)
    assert summary.audit.checkpoint_head == checkpoints[-1].head_hash
    assert summary.audit.checkpoints_verified == len(checkpoints)
    assert summary.custodians == ()  # shares without custodian operators
    assert any(f.startswith("no enabled custodian") for f in summary.findings)
