"""Many keys through the real CLI: onboarding from a file, and a listing that pages past the
reply bound (20,000 keys are about 4.4 MB of summaries, above the 4 MiB a reply may carry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckms.controller.service import Controller
from ckms.store import outbox
from tests.support.cli import Operators, audit_records

pytestmark = pytest.mark.kafka

COUNT = 20_000


async def test_twenty_thousand_keys_created_from_a_file_and_listed_whole(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    names = [f"team{i % 40:02}/key-{i:05}" for i in range(COUNT)]
    spec = tmp_path / "keys.json"
    spec.write_text(json.dumps([{"name": n, "type": "hmac-sha256"} for n in names]))
    created = await ops.ckms(
        "key", "create", "--from-file", str(spec), "--json", who="dave", timeout_s=600
    )
    assert created.rc == 0, created.stderr
    assert sorted(created.json()["created"]) == sorted(names)

    listed = await ops.ckms("key", "list", "--json", who="erin", timeout_s=300)
    assert listed.rc == 0, listed.stderr
    keys = listed.json()["keys"]
    assert [k["name"] for k in keys] == sorted(names)  # each once, in order, none missing
    assert all(k["primary_version"] == 1 and k["type"] == "hmac-sha256" for k in keys)

    # Each key audited and evented like a single create.
    records = [r for r in await audit_records(controller) if r.action == "key.create"]
    assert sorted(r.object for r in records) == sorted(f"key:{n}" for n in names)
    assert all(r.actor == "dave" and r.outcome == "ok" for r in records)
    events = await outbox.all_events(controller.store)
    assert sum(1 for e in events if e.type == "key.created") == COUNT


async def test_a_batch_is_refused_whole(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    await controller.lifecycle.create("team/taken", "aes-256", actor="test-setup")
    spec = tmp_path / "keys.json"
    spec.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "team/new", "type": "aes-256"},
                    {"name": "team/taken", "type": "aes-256"},
                ]
            }
        )
    )
    refused = await ops.ckms("key", "create", "--from-file", str(spec), who="dave")
    assert refused.rc != 0 and "team/taken" in refused.stderr
    assert [k.name for k in await controller.lifecycle.list_keys()] == ["team/taken"]

    gated = tmp_path / "gated.json"
    gated.write_text(
        json.dumps(
            [{"name": "team/dual", "type": "aes-256", "policy": {"approvals_required": ["create"]}}]
        )
    )
    refused = await ops.ckms("key", "create", "--from-file", str(gated), who="alice")
    assert refused.rc != 0 and "dual control" in refused.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "team/ok", "type": "aes-256"}, {"name": "Bad"}]))
    refused = await ops.ckms("key", "create", "--from-file", str(bad), who="dave")
    assert refused.rc != 0 and "key 2" in refused.stderr
    assert [k.name for k in await controller.lifecycle.list_keys()] == ["team/taken"]
