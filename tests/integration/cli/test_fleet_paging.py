"""A fleet larger than one page through the real CLI: ``host list`` and ``fleet status`` follow
every page and ``--json`` prints each host (each key) once, in order, none missing, while every
reply stays one bounded page."""

from __future__ import annotations

import pytest

from ckms.controller.service import Controller
from ckms.protocol import Targets
from ckms.protocol import admin as api
from ckms.ssh import Principal
from tests.support.cli import Operators, enroll_host

pytestmark = pytest.mark.kafka

COUNT = 2 * api.HOST_PAGE_DEFAULT + 3  # three pages, the last one short


async def test_host_list_pages_through_the_whole_fleet(
    controller: Controller, ops: Operators
) -> None:
    names = [f"web-{i:04}" for i in range(COUNT)]
    for name in names:
        await enroll_host(controller, name, {"zone": f"z{len(name) % 3}"})
    await controller.hosts.revoke(names[7], actor="test-setup")

    listed = await ops.ckms("host", "list", "--json", who="erin", timeout_s=300)
    assert listed.rc == 0, listed.stderr
    hosts = listed.json()["hosts"]
    assert [h["id"] for h in hosts] == names  # each once, in order, none missing
    assert [h["id"] for h in hosts if h["revoked"]] == [names[7]]

    # Each reply is one page, however many hosts: the fleet never approaches the reply bound.
    auditor = Principal("erin", "auditor", "")
    first = await controller.rpc.call(auditor, "host.list", {"limit": 10})
    assert len(first.hosts) == 10 and first.next == names[9]

    table = await ops.ckms("host", "list", who="erin", timeout_s=300)
    assert table.rc == 0, table.stderr
    assert names[0] in table.stdout and names[-1] in table.stdout


async def test_fleet_status_pages_keys_under_a_row_budget(
    controller: Controller, ops: Operators
) -> None:
    hosts = [f"db-{i:04}" for i in range(api.HOST_PAGE_DEFAULT * 2 + 3)]
    for name in hosts:
        await enroll_host(controller, name, {"role": "db"})
    every = Targets(selectors=({"role": "db"},))
    keys = [f"db/k{i}" for i in range(7)]  # 7 x 1,000 shown rows: two pages under 5,000
    for name in keys:
        await controller.lifecycle.create(name, "aes-256", targets=every, actor="test-setup")

    auditor = Principal("erin", "auditor", "")
    first = await controller.rpc.call(auditor, "fleet.status", {})
    assert sum(len(k.hosts) for k in first.keys) <= api.FLEET_ROWS_MAX
    assert first.next == first.keys[-1].key and len(first.keys) < len(keys)

    listed = await ops.ckms("fleet", "status", "--json", who="erin", timeout_s=300)
    assert listed.rc == 0, listed.stderr
    fleets = listed.json()["keys"]
    assert [k["key"] for k in fleets] == keys
    assert all(k["targeted"] == len(hosts) and k["truncated"] == len(hosts) - 1000 for k in fleets)

    refused = await ops.ckms("fleet", "status", "--limit", "5001", who="erin")
    assert refused.rc != 0
