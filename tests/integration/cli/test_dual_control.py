"""Dual control through the real CLI: a request instead of the operation, a second person
approves, the requester cannot, an expired request is refused, and all of it is audited."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.cli._errors import ExitCode
from ckms.controller.models import KeyState
from ckms.controller.service import Controller
from tests.support.cli import MovableClock, Operators, audit_records
from tests.support.controller import running_controller

pytestmark = pytest.mark.kafka


async def deactivated_key(controller: Controller) -> None:
    """A key whose version 1 can be destroyed (destroy is under dual control by default)."""
    lc = controller.lifecycle
    await lc.create("pay/db", "aes-256", actor="test-setup")
    await lc.rotate("pay/db", actor="test-setup")
    await lc.revoke("pay/db", "superseded", version=1, actor="test-setup")


def request_id(stderr: str) -> str:
    match = re.search(r"request (r-[0-9a-f]+)", stderr)
    assert match, stderr
    return match.group(1)


@pytest.mark.requirement("PCI-3.7.6")
async def test_destroy_needs_a_second_person(controller: Controller, ops: Operators) -> None:
    await deactivated_key(controller)
    asked = await ops.ckms("key", "destroy", "pay/db", "-v", "1", "--yes", who="alice")
    assert asked.rc == ExitCode.APPROVAL_REQUIRED, asked.stderr
    assert len(asked.stderr.strip().splitlines()) == 1
    rid = request_id(asked.stderr)
    key = await controller.lifecycle.get("pay/db")
    assert key.version(1).state is KeyState.DEACTIVATED  # nothing ran yet

    listed = await ops.ckms("request", "list", "--json", who="carol")
    (pending,) = listed.json()["requests"]
    assert (pending["id"], pending["operation"], pending["requester"], pending["state"]) == (
        rid,
        "key.destroy",
        "alice",
        "pending",
    )

    own = await ops.ckms("approve", rid, who="alice")
    assert own.rc == ExitCode.FAILED
    assert "a different admin or custodian must approve" in own.stderr
    assert (await controller.lifecycle.get("pay/db")).version(1).state is KeyState.DEACTIVATED

    approved = await ops.ckms("request", "approve", rid, "--json", who="carol")
    assert approved.rc == 0, approved.stderr
    assert approved.json()["request"]["state"] == "executed"
    key = await controller.lifecycle.get("pay/db")
    assert key.version(1).state is KeyState.DESTROYED and not key.version(1).has_material
    history = await controller.lifecycle.history("pay/db")
    assert history[-1]["operation"] == "destroy" and history[-1]["actor"] == "alice+carol"

    again = await ops.ckms("approve", rid, who="bob")
    assert again.rc == ExitCode.FAILED and "is executed, not pending" in again.stderr

    trail = [
        (r.actor, r.action, r.outcome)
        for r in await audit_records(controller)
        if r.actor.startswith(("alice", "carol", "bob"))
    ]
    assert trail == [
        ("alice", "request.create", "ok"),
        ("alice", "rpc.request.approve", "refused"),
        ("carol", "request.approve", "ok"),
        ("alice+carol", "key.destroy", "ok"),
        ("alice+carol", "request.execute", "ok"),
    ]


async def test_a_policy_change_and_an_operator_change_wait_for_approval(
    controller: Controller, ops: Operators
) -> None:
    await controller.lifecycle.create("pay/db", "aes-256", actor="test-setup")
    asked = await ops.ckms("key", "policy", "pay/db", "--cryptoperiod", "90d", who="alice")
    assert asked.rc == ExitCode.APPROVAL_REQUIRED, asked.stderr
    assert (await controller.lifecycle.get("pay/db")).policy.cryptoperiod == timedelta(days=365)
    done = await ops.ckms("approve", request_id(asked.stderr), who="bob")
    assert done.rc == 0, done.stderr
    assert (await controller.lifecycle.get("pay/db")).policy.cryptoperiod == timedelta(days=90)

    removal = await ops.ckms("operator", "remove", "erin", who="bob")
    assert removal.rc == ExitCode.APPROVAL_REQUIRED
    assert not (await controller.admin.operators.get("erin")).disabled
    rid = request_id(removal.stderr)
    # The subject of a pending removal keeps working until it is approved.
    assert (await ops.ckms("key", "list", who="erin")).rc == 0
    assert (await ops.ckms("approve", rid, who="carol")).rc == 0
    assert (await controller.admin.operators.get("erin")).disabled
    locked_out = await ops.ckms("key", "list", who="erin")
    assert locked_out.rc == ExitCode.FAILED and "refused the key" in locked_out.stderr


async def test_an_expired_request_is_refused(
    controller: Controller, ops: Operators, clock: MovableClock
) -> None:
    await deactivated_key(controller)
    asked = await ops.ckms("key", "destroy", "pay/db", "-v", "1", "--yes", who="alice")
    rid = request_id(asked.stderr)
    clock.advance(timedelta(hours=24, seconds=1))

    late = await ops.ckms("approve", rid, who="bob")
    assert late.rc == ExitCode.FAILED
    assert f"request {rid} expired" in late.stderr
    assert (await controller.lifecycle.get("pay/db")).version(1).state is KeyState.DEACTIVATED
    assert (await controller.admin.requests.get(rid)).state == "expired"
    refused = [
        r
        for r in await audit_records(controller)
        if r.action == "request.approve" and r.outcome == "refused"
    ]
    assert [(r.actor, r.details["request"], r.details["error"]) for r in refused] == [
        ("bob", rid, "expired")
    ]
    listed = await ops.ckms("request", "list", "--all", "--json", who="bob")
    assert [(r["id"], r["state"]) for r in listed.json()["requests"]] == [(rid, "expired")]


async def test_a_rejected_request_never_runs(controller: Controller, ops: Operators) -> None:
    await deactivated_key(controller)
    asked = await ops.ckms("key", "destroy", "pay/db", "-v", "1", "--yes", who="alice")
    rid = request_id(asked.stderr)
    rejected = await ops.ckms("request", "reject", rid, "--reason", "not yet", who="carol")
    assert rejected.rc == 0, rejected.stderr
    late = await ops.ckms("approve", rid, who="bob")
    assert late.rc == ExitCode.FAILED and "is rejected, not pending" in late.stderr
    assert (await controller.lifecycle.get("pay/db")).version(1).state is KeyState.DEACTIVATED


async def test_a_targets_or_install_change_waits_for_approval_unless_policy_lowers_it(
    controller: Controller, ops: Operators
) -> None:
    lc = controller.lifecycle
    await lc.create("pay/db", "aes-256", actor="test-setup")
    asked = await ops.ckms(
        "key", "targets", "pay/db", "--target", "role=db", "--path", "/etc/ckms/keys/x.key",
        who="alice",
    )  # fmt: skip
    assert asked.rc == ExitCode.APPROVAL_REQUIRED, asked.stderr
    rid = request_id(asked.stderr)
    key = await lc.get("pay/db")
    assert key.targets.describe() == [] and key.install.path != "/etc/ckms/keys/x.key"

    # An operator may not even ask for it (like destroy).
    refused = await ops.ckms("key", "targets", "pay/db", "--target", "role=db", who="dave")
    assert refused.rc == ExitCode.FAILED and "dual control" in refused.stderr

    approved = await ops.ckms("request", "approve", rid, "--json", who="carol")
    assert approved.rc == 0, approved.stderr
    key = await lc.get("pay/db")
    assert key.targets.describe() == ["role=db"] and key.install.path == "/etc/ckms/keys/x.key"

    # A key whose policy leaves targets out of its approvals is retargeted at once.
    await lc.create("pay/api", "aes-256", actor="test-setup")
    lowered = await ops.ckms(
        "key", "policy", "pay/api", "--approvals", "destroy,policy", who="alice"
    )
    assert lowered.rc == ExitCode.APPROVAL_REQUIRED  # lowering it is a policy change: approved
    assert (await ops.ckms("approve", request_id(lowered.stderr), who="carol")).rc == 0
    direct = await ops.ckms("key", "targets", "pay/api", "--target", "role=api", who="alice")
    assert direct.rc == 0, direct.stderr
    assert (await lc.get("pay/api")).targets.describe() == ["role=api"]


@pytest.mark.requirement("PCI-3.7.6")
async def test_ca_rotation_retirement_and_backups_need_a_second_person_when_configured(
    tmp_path: Path,
    controller_kafka: KafkaLink,
    unique_topic: Callable[[str], str],
    clock: MovableClock,
) -> None:
    """A controller whose settings put the CA and backups under dual control (`approvals =
    ["ca", "backup"]`): `ca rotate`, `ca retire` and `backup` become requests another admin
    approves; the approval runs them as requester+approver, and the backup it made is
    fetched by its id."""
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("acks"),
        clock=clock,
        approvals=["ca", "backup"],
    ) as c:
        ops = Operators(c, tmp_path)
        await ops.add("alice", "admin")
        await ops.add("bob", "admin")
        for command in (("ca", "rotate"), ("ca", "retire")):
            asked = await ops.ckms(*command, who="alice")
            assert asked.rc == ExitCode.APPROVAL_REQUIRED, asked.stderr
            state = await c.ca.state()
            assert (len(state.generations), len(state.trusted)) == (
                (1, 1) if command[1] == "rotate" else (2, 2)
            )
            approved = await ops.ckms("approve", request_id(asked.stderr), who="bob")
            assert approved.rc == 0, approved.stderr
        state = await c.ca.state()
        assert (len(state.generations), len(state.trusted)) == (2, 1)
        actions = {r.action: r.actor for r in await audit_records(c)}
        assert actions["ca.rotate"] == actions["ca.retire"] == "alice+bob"

        out = tmp_path / "backup.db"
        asked = await ops.ckms("backup", "-o", str(out), who="alice")
        assert asked.rc == ExitCode.APPROVAL_REQUIRED, asked.stderr
        assert not out.exists()
        approved = await ops.ckms("approve", request_id(asked.stderr), "--json", who="bob")
        assert approved.rc == 0, approved.stderr
        backup_id = approved.json()["result"]["id"]
        fetched = await ops.ckms("backup", "-o", str(out), "--id", backup_id, who="alice")
        assert fetched.rc == 0, fetched.stderr
        assert out.read_bytes().startswith(b"SQLite format 3")
