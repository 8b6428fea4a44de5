"""Roles are enforced on the controller: each role x a representative command, allowed and
refused, through the real ``ckms`` CLI; every refusal is in the audit log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckms.cli._errors import ExitCode
from ckms.controller.service import Controller
from ckms.crypto import signing_key_openssh
from tests.support.cli import Operators, Person, audit_records, enroll_host

pytestmark = pytest.mark.kafka


async def refusals(controller: Controller, actor: str) -> list[str]:
    """The actions refused to ``actor``, per the audit log."""
    return [
        r.action
        for r in await audit_records(controller)
        if r.actor == actor and r.outcome == "refused"
    ]


async def test_auditor_reads_but_changes_nothing(controller: Controller, ops: Operators) -> None:
    await controller.lifecycle.create("app/k", "aes-256", actor="test-setup")
    listed = await ops.ckms("key", "list", "--json", who="erin")
    assert listed.rc == 0, listed.stderr
    assert [k["name"] for k in listed.json()["keys"]] == ["app/k"]
    verified = await ops.ckms("audit", "verify", who="erin")
    assert verified.rc == 0, verified.stderr

    refused = await ops.ckms("key", "rotate", "app/k", who="erin")
    assert refused.rc == ExitCode.FAILED
    assert refused.stderr.strip().splitlines() == [
        "ckms: PermissionDeniedError: role auditor may not call key.rotate"
    ]
    assert (await controller.lifecycle.get("app/k")).latest_version == 1
    assert await refusals(controller, "erin") == ["rpc.key.rotate"]


async def test_operator_runs_the_lifecycle_but_not_dual_control_or_operators(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    await controller.lifecycle.create("app/k", "aes-256", actor="test-setup")
    rotated = await ops.ckms("key", "rotate", "app/k", "--json", who="dave")
    assert rotated.rc == 0, rotated.stderr
    assert rotated.json()["versions"] == [2]

    # Destroy is under dual control by default: an operator may not even request it.
    await controller.lifecycle.revoke("app/k", "superseded", version=1, actor="test-setup")
    destroy = await ops.ckms("key", "destroy", "app/k", "-v", "1", "--yes", who="dave")
    assert destroy.rc == ExitCode.FAILED
    assert "dual control" in destroy.stderr and "ask an admin" in destroy.stderr
    assert await controller.admin.requests.list() == []

    _, public = ops.make_key("mallory")
    (tmp_path / "mallory.pub").write_text(public)
    add = await ops.ckms(
        "operator", "add", "mallory", "--role", "admin", "--key", str(tmp_path / "mallory.pub"),
        who="dave",
    )  # fmt: skip
    assert add.rc == ExitCode.FAILED
    assert "role operator may not call operator.add" in add.stderr
    # Both refusals are audited: the route's (operator.add) and the handler's (key.destroy).
    assert await refusals(controller, "dave") == ["rpc.key.destroy", "rpc.operator.add"]


async def test_custodian_unseals_and_approves_but_does_not_read_keys(
    controller: Controller, ops: Operators
) -> None:
    status = await ops.ckms("status", "--json", who="carol")
    assert status.rc == 0, status.stderr
    assert status.json()["sealed"] is False
    pending = await ops.ckms("request", "list", "--json", who="carol")
    assert pending.rc == 0 and pending.json() == {"requests": []}

    refused = await ops.ckms("key", "list", who="carol")
    assert refused.rc == ExitCode.FAILED
    assert "role custodian may not call key.list" in refused.stderr

    sealed = await ops.ckms("seal", who="carol")
    assert sealed.rc == 0, sealed.stderr
    assert controller.vault.sealed
    status = await ops.ckms("status", who="carol")
    assert status.rc == ExitCode.SEALED  # status exits 4 while sealed
    assert await refusals(controller, "carol") == ["rpc.key.list"]


async def test_admin_manages_operators_and_hosts(controller: Controller, ops: Operators) -> None:
    listed = await ops.ckms("operator", "list", "--json", who="alice")
    assert listed.rc == 0, listed.stderr
    roles = {o["name"]: o["role"] for o in listed.json()["operators"]}
    assert roles == {
        "alice": "admin",
        "bob": "admin",
        "carol": "custodian",
        "dave": "operator",
        "erin": "auditor",
    }
    enrolled = await ops.ckms("host", "enroll", "web-1", "--label", "env=prod", who="alice")
    assert enrolled.rc == 0, enrolled.stderr
    assert await refusals(controller, "alice") == []


async def test_an_agent_key_never_calls_admin_methods(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    signing = await enroll_host(controller, "web-1", {"env": "prod"})
    identity = tmp_path / "agent-identity"
    identity.write_bytes(signing_key_openssh(signing))
    os.chmod(identity, 0o600)
    agent = Person("web-1", "agent", identity, "")
    for args in (("key", "list"), ("status",), ("host", "enroll", "evil-1")):
        run = await ops.ckms(*args, who=agent)
        assert run.rc == ExitCode.FAILED, (args, run.stdout)
        assert "role agent may not call" in run.stderr
    assert await refusals(controller, "host:web-1") == [
        "rpc.key.list",
        "rpc.status",
        "rpc.host.enroll",
    ]
