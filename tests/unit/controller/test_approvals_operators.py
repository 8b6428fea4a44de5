"""Dual-control request rows and operators on a real in-memory store with a fake clock."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from ckms.controller.approvals import ApprovalBook
from ckms.controller.operators import OperatorRegistry
from ckms.errors import (
    AlreadyExistsError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    PolicyError,
)
from ckms.ssh import generate_ssh_key, public_key_text
from ckms.store import Store
from ckms.store import audit as audit_log

if TYPE_CHECKING:
    from conftest import FakeClock


def a_key() -> str:
    return public_key_text(generate_ssh_key()) + " someone@example"


@pytest.fixture
def book(store: Store, clock: FakeClock) -> ApprovalBook:
    return ApprovalBook(store, clock=clock)


async def make(book: ApprovalBook) -> str:
    request = await book.create(
        "key.destroy",
        {"name": "pay/db", "version": 1},
        requester="alice",
        object="key:pay/db",
        role="admin",
    )
    return request.id


@pytest.mark.requirement("PCI-3.7.6")
async def test_a_request_is_approved_once_by_someone_else(book: ApprovalBook) -> None:
    rid = await make(book)
    with pytest.raises(PermissionDeniedError, match="a different admin or custodian"):
        await book.claim(rid, approver="alice", role="admin")
    claimed = await book.claim(rid, approver="bob", role="admin")
    assert claimed.state == "approved"
    with pytest.raises(PolicyError, match="approved, not pending"):
        await book.claim(rid, approver="carol", role="custodian")
    done = await book.finish(rid, actor="alice+bob")
    assert done.state == "executed"
    assert [(d["by"], d["decision"], d["outcome"]) for d in done.decisions] == [
        ("bob", "approve", "executed")
    ]


async def test_a_failed_execution_leaves_the_request_pending(book: ApprovalBook) -> None:
    rid = await make(book)
    await book.claim(rid, approver="bob", role="admin")
    back = await book.finish(rid, actor="alice+bob", error="InvalidTransitionError: it is Active")
    assert back.state == "pending"
    assert back.decisions[-1]["outcome"] == "failed"
    assert (await book.claim(rid, approver="carol", role="custodian")).state == "approved"


async def test_an_expired_request_is_refused_and_marked(
    book: ApprovalBook, clock: FakeClock, store: Store
) -> None:
    rid = await make(book)
    clock.advance(hours=23, minutes=59)
    assert await book.count_pending() == 1
    clock.advance(minutes=1)
    assert await book.count_pending() == 0
    with pytest.raises(PolicyError, match=f"request {rid} expired"):
        await book.claim(rid, approver="bob", role="admin")
    assert (await book.get(rid)).state == "expired"
    last = (await audit_log.load_records(store))[-1]
    assert (last.actor, last.action, last.outcome, last.details["error"]) == (
        "bob",
        "request.approve",
        "refused",
        "expired",
    )


async def test_reject_and_withdraw(book: ApprovalBook) -> None:
    rid = await make(book)
    withdrawn = await book.reject(rid, by="alice", role="admin", reason="typo")
    assert withdrawn.state == "rejected" and withdrawn.decisions[-1]["decision"] == "withdraw"
    with pytest.raises(PolicyError):
        await book.claim(rid, approver="bob", role="admin")
    with pytest.raises(NotFoundError):
        await book.get("r-unknown")


async def test_operators_are_added_removed_and_the_last_admin_stays(
    store: Store, clock: FakeClock
) -> None:
    ops = OperatorRegistry(store, clock=clock)
    alice_key = a_key()
    await ops.add("alice", "admin", alice_key, actor="init")
    assert await ops.other_approvers("alice") == 0
    with pytest.raises(AlreadyExistsError, match="already belongs to operator alice"):
        await ops.add("mallory", "auditor", alice_key, actor="alice")
    with pytest.raises(ConfigError):
        await ops.add("bob", "root", a_key(), actor="alice")
    with pytest.raises(ConfigError):
        await ops.add("enroll", "admin", a_key(), actor="alice")
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        await ops.add("bob", "admin", "ssh-ed25519 garbage", actor="alice")
    with pytest.raises(PolicyError, match="last admin"):
        await ops.remove("alice", actor="alice")

    await ops.add("carol", "custodian", a_key(), actor="alice")
    assert await ops.other_approvers("alice") == 1
    removed = await ops.remove("carol", actor="alice")
    assert removed.disabled and await ops.other_approvers("alice") == 0
    with pytest.raises(NotFoundError):
        await ops.get("carol", enabled_only=True)
    back = await ops.add("carol", "auditor", a_key(), actor="alice")
    assert (back.role, back.disabled) == ("auditor", False)
    actions = [r.action for r in await audit_log.load_records(store)]
    assert actions[-4:] == ["operator.add", "operator.add", "operator.remove", "operator.add"]
    assert timedelta(0) == clock.now - back.created_at
