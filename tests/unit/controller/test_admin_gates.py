"""The admin RPC's key routes and dual control share one table: what a route gates is what an
approval runs, as the requester, and a refused parameter never becomes a stored request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.controller.transitions import RolloutOp
from ckms.crypto import KeyType
from ckms.errors import (
    ApprovalRequiredError,
    ConfigError,
    InvalidTransitionError,
    PermissionDeniedError,
)
from ckms.protocol import admin as api
from ckms.ssh import Principal, generate_ssh_key, public_key_text

if TYPE_CHECKING:
    from conftest import FakeClock

ALICE = Principal("alice", "admin", "SHA256:alice")
BOB = Principal("bob", "admin", "SHA256:bob")
OLIVER = Principal("oliver", "operator", "SHA256:oliver")


@pytest.fixture
async def controller(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Controller]:
    c = Controller(ControllerSettings(home=tmp_path / "ctl", listen_port=0), clock=clock)
    await c.open()
    assert c.store is not None
    await init_controller(c.store, passphrase="a long enough passphrase", clock=clock)
    await c.vault.unseal_with_passphrase("a long enough passphrase")
    for name, role in (("alice", "admin"), ("bob", "admin"), ("oliver", "operator")):
        await c.operators.add(name, role, public_key_text(generate_ssh_key()), actor="init")
    try:
        yield c
    finally:
        await c.close()


async def test_an_empty_policy_change_is_refused_before_any_request_is_stored(
    controller: Controller,
) -> None:
    await controller.lifecycle.create("app/db", KeyType.AES_256, actor="alice")
    with pytest.raises(ConfigError, match="name at least one policy field"):
        await controller.rpc.call(ALICE, "key.policy", {"name": "app/db", "policy": {}})
    assert await controller.dual_control.book.list(include_done=True) == []


async def test_a_gated_route_stores_a_request_and_the_approval_runs_the_same_change(
    controller: Controller,
) -> None:
    c = controller
    key = await c.lifecycle.create("app/db", KeyType.AES_256, actor="alice")
    gated = key.policy.model_copy(update={"approvals_required": frozenset({"rotate", "destroy"})})
    await c.lifecycle.set_policy("app/db", gated, actor="alice")
    params = {"name": "app/db", "reason": "scheduled"}
    with pytest.raises(PermissionDeniedError, match="needs dual control"):
        await c.rpc.call(OLIVER, "key.rotate", params)
    with pytest.raises(ApprovalRequiredError) as asked:
        await c.rpc.call(ALICE, "key.rotate", params)
    assert (await c.lifecycle.get("app/db")).latest_version == 1  # nothing ran yet
    request_id = asked.value.request_id
    assert request_id is not None
    with pytest.raises(PermissionDeniedError, match="different admin or custodian"):
        await c.admin.request_approve(ALICE, api.RequestRef(id=request_id))
    reply = await c.admin.request_approve(BOB, api.RequestRef(id=request_id))
    assert reply.request.state == "executed"
    after = await c.lifecycle.get("app/db")
    assert after.latest_version == 2
    assert after.version(2).created_by == "alice+bob"
    # A version operation goes through the same table.
    await c.lifecycle.deactivate("app/db", 1, actor="alice")
    with pytest.raises(ApprovalRequiredError):
        await c.rpc.call(ALICE, "key.destroy", {"name": "app/db", "version": 1})
    assert (await c.lifecycle.get("app/db")).version(1).has_material


async def test_activating_a_version_that_waits_for_its_rollout_passes_the_rotate_dual_control(
    controller: Controller,
) -> None:
    """Resuming a rollout passes a rotation's dual control (it releases the version further);
    activating the waiting version by hand releases it to every host and makes it primary, so
    it must pass the same control, not only the activation's (attack: a policy gating rotate
    but not activate let a lone operator skip the stages an approved rotation set)."""
    c = controller
    key = await c.lifecycle.create("app/db", KeyType.AES_256, actor="alice")
    gated = key.policy.model_copy(update={"approvals_required": frozenset({"rotate"})})
    await c.lifecycle.set_policy("app/db", gated, actor="alice")
    await c.lifecycle.rotate("app/db", actor="alice+bob", activate_when="converged")
    params = {"name": "app/db", "version": 2}
    with pytest.raises(PermissionDeniedError, match="needs dual control"):
        await c.rpc.call(OLIVER, "key.activate", params)
    with pytest.raises(ApprovalRequiredError) as asked:
        await c.rpc.call(ALICE, "key.activate", params)
    after = await c.lifecycle.get("app/db")
    assert after.primary_version == 1
    assert after.rollout is not None and after.rollout.live
    request_id = asked.value.request_id
    assert request_id is not None
    await c.admin.request_approve(BOB, api.RequestRef(id=request_id))
    assert (await c.lifecycle.get("app/db")).primary_version == 2
    # A version activated on a delay (no rollout) still needs only the activation's control.
    await c.lifecycle.rotate("app/db", actor="alice+bob", activate_when="delay")
    delayed = await c.lifecycle.get("app/db")
    if delayed.version(3).state == "pre-active":
        await c.rpc.call(OLIVER, "key.activate", {"name": "app/db", "version": 3})


async def test_an_approved_resume_resumes_only_the_rollout_it_was_asked_for(
    controller: Controller,
) -> None:
    """A resume request names the rollout's version when it is stored: approved after that
    rollout ended and another (of a later version) halted, it resumes nothing (attack: an old
    pending request, approved at face value, released a version nobody asked to resume)."""
    c = controller
    key = await c.lifecycle.create("app/db", KeyType.AES_256, actor="alice")
    gated = key.policy.model_copy(update={"approvals_required": frozenset({"rotate"})})
    await c.lifecycle.set_policy("app/db", gated, actor="alice")
    await c.lifecycle.rotate("app/db", actor="alice+bob", activate_when="converged")
    await c.lifecycle.move_rollout("app/db", RolloutOp.HALT, actor="rollout", reason="v2 failed")
    with pytest.raises(ApprovalRequiredError) as asked:
        await c.rpc.call(ALICE, "rollout.resume", {"name": "app/db"})
    request_id = asked.value.request_id
    assert request_id is not None
    # v2 is withdrawn (its rollout cancelled), v3 rolls out and halts.
    await c.lifecycle.revoke("app/db", "keyCompromise", actor="alice", version=2)
    await c.lifecycle.rotate("app/db", actor="alice+bob", activate_when="converged")
    await c.lifecycle.move_rollout("app/db", RolloutOp.HALT, actor="rollout", reason="v3 failed")
    with pytest.raises(InvalidTransitionError, match="version 2"):
        await c.admin.request_approve(BOB, api.RequestRef(id=request_id))
    rollout = (await c.lifecycle.get("app/db")).rollout
    assert rollout is not None
    assert (rollout.version, rollout.state) == (3, "halted")
