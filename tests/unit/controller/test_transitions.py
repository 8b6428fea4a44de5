"""The per-version transition table: every state and every operation, through the API."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ckms.controller import _repo
from ckms.controller.lifecycle import TRANSITIONS, Lifecycle, Op, allowed_operations
from ckms.controller.models import KeyState, RevocationReason
from ckms.controller.policy import default_policy
from ckms.crypto import KeyType
from ckms.errors import InvalidTransitionError
from ckms.store import Store, outbox
from ckms.store import audit as audit_log

# NIST SP 800-57 §7 / KMIP 2.1, written out independently of the implementation's table.
EXPECTED: dict[str, dict[str, str]] = {
    "PreActive": {"activate": "Active", "compromise": "Compromised", "destroy": "Destroyed"},
    "Active": {
        "suspend": "Suspended",
        "deactivate": "Deactivated",
        "revoke": "Deactivated",
        "compromise": "Compromised",
    },
    "Suspended": {
        "resume": "Active",
        "deactivate": "Deactivated",
        "revoke": "Deactivated",
        "compromise": "Compromised",
    },
    "Deactivated": {"compromise": "Compromised", "destroy": "Destroyed"},
    "Compromised": {"destroy": "DestroyedCompromised"},
    "Destroyed": {"compromise": "DestroyedCompromised"},
    "DestroyedCompromised": {},
}
STATES = list(EXPECTED)
OPS = ["activate", "suspend", "resume", "deactivate", "revoke", "compromise", "destroy"]
NAME = "team/matrix"


@pytest.mark.requirement("SP800-57-7")
def test_table_matches_design() -> None:
    table = {(str(s), str(op)): str(t) for (s, op), t in TRANSITIONS.items()}
    expected = {(s, op): t for s, row in EXPECTED.items() for op, t in row.items()}
    assert table == expected
    assert {str(s) for s in KeyState} == set(STATES)
    assert {str(op) for op in Op} == set(OPS)
    assert Op.DESTROY not in allowed_operations(KeyState.ACTIVE)


async def _make_version_in(lc: Lifecycle, state: str) -> None:
    """Create NAME with version 1 in ``state``, using only lifecycle operations."""
    delayed = state in ("PreActive", "Destroyed")
    policy = default_policy(KeyType.AES_256)
    if delayed:
        policy = policy.model_copy(update={"activation_delay": timedelta(days=1)})
    await lc.create(NAME, KeyType.AES_256, actor="setup", policy=policy)
    steps: dict[str, list[tuple[str, Any]]] = {
        "PreActive": [],
        "Active": [],
        "Suspended": [("suspend", None)],
        "Deactivated": [("deactivate", None)],
        "Compromised": [("compromise", None)],
        "Destroyed": [("destroy", None)],
        "DestroyedCompromised": [("compromise", None), ("destroy", None)],
    }
    for op, _ in steps[state]:
        await _apply(lc, op, actor="setup")
    assert (await lc.get(NAME)).version(1).state == state


async def _apply(lc: Lifecycle, op: str, *, actor: str) -> Any:
    reason = f"because {op}"
    if op == "revoke":
        return await lc.revoke(
            NAME, RevocationReason.CESSATION_OF_OPERATION, actor=actor, version=1, message=reason
        )
    if op == "compromise":
        return await lc.revoke(
            NAME, RevocationReason.KEY_COMPROMISE, actor=actor, version=1, message=reason
        )
    method = getattr(lc, op)
    return await method(NAME, 1, actor=actor, reason=reason)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.requirement("SP800-57-7")
async def test_transition_matrix(lifecycle: Lifecycle, store: Store, state: str, op: str) -> None:
    await _make_version_in(lifecycle, state)
    events_before = len(await outbox.all_events(store))
    audit_before = len(await audit_log.load_records(store))
    target = EXPECTED[state].get(op)

    if target is None:
        with pytest.raises(InvalidTransitionError) as info:
            await _apply(lifecycle, op, actor="carol")
        message = str(info.value)
        assert state in message
        assert ("revoke" if op == "compromise" else op) in message
        assert NAME in message
        assert (await lifecycle.get(NAME)).version(1).state == state
        assert len(await outbox.all_events(store)) == events_before
        records = await audit_log.load_records(store, start=audit_before)
        assert [(r.outcome, r.actor) for r in records] == [("refused", "carol")]
        return

    await _apply(lifecycle, op, actor="carol")
    key = await lifecycle.get(NAME)
    assert key.version(1).state == target
    # One event and one audit record, for exactly this change.
    events = (await outbox.all_events(store))[events_before:]
    assert len(events) == 1
    assert events[0].data["from"] == state
    assert events[0].data["to"] == target
    records = await audit_log.load_records(store, start=audit_before)
    assert len(records) == 1
    assert records[0].outcome == "ok"
    assert records[0].actor == "carol"
    assert records[0].details["from"] == state
    assert records[0].details["to"] == target
    # The version's history records UTC time, actor and reason.
    async with store.read() as r:
        history = await _repo.transitions(r, NAME)
    last = history[-1]
    assert (last["from_state"], last["to_state"], last["actor"]) == (state, target, "carol")
    assert last["at"].endswith("Z")
    assert f"because {op}" in last["reason"]


@pytest.mark.parametrize("reason", list(RevocationReason))
@pytest.mark.requirement("KMIP-2.1-REVOCATION-REASONS")
async def test_revocation_reason_decides_the_state(
    lifecycle: Lifecycle, reason: RevocationReason
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="setup")
    [v] = await lifecycle.revoke(NAME, reason, actor="carol", version=1)
    compromise = reason in (RevocationReason.KEY_COMPROMISE, RevocationReason.CA_COMPROMISE)
    assert v.state == (KeyState.COMPROMISED if compromise else KeyState.DEACTIVATED)
    assert v.revocation_reason == reason
    assert (v.compromised_at is not None) == compromise


@pytest.mark.requirement("SP800-57-7")
async def test_active_to_destroyed_is_refused_with_a_hint(lifecycle: Lifecycle) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="setup")
    with pytest.raises(InvalidTransitionError, match="it is Active; deactivate or revoke it first"):
        await lifecycle.destroy(NAME, 1, actor="carol")
