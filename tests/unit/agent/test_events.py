"""Which verified events concern this host, and what the agent does with each."""

from __future__ import annotations

from datetime import UTC, datetime

from ckms.crypto import generate_signing_key, signing_public_key
from ckms.protocol import (
    EventType,
    HostRevoked,
    InstallSpec,
    KeyCreated,
    KeyDestroyed,
    KeyPolicyChanged,
    KeyRevoked,
    KeyRollout,
    KeyRotated,
    KeyStateChanged,
    KeyTargetsChanged,
    RolloutState,
    Targets,
    encode_event,
    trust_keys,
    verify_message,
)
from ckms_agent.backoff import Backoff
from ckms_agent.events import RELEVANT_TYPES, EventAction, classify

SIGNER = generate_signing_key()
TRUST = trust_keys([signing_public_key(SIGNER)])
LABELS = {"env": "test", "role": "web"}
WEB = Targets(selectors=({"env": "test", "role": "web"},))
DB = Targets(selectors=({"env": "test", "role": "db"},))
SPEC = InstallSpec(path="/keys/{name}.key")
DIGEST = "sha256:" + "a" * 64


def envelope(etype: EventType, data):
    msg = encode_event(etype, data, seq=1, signing_key=SIGNER, at=datetime.now(UTC))
    return verify_message(msg.value, list(msg.headers), TRUST)


def decide(etype: EventType, data, *, held=frozenset(), desired=frozenset()):
    return classify(
        envelope(etype, data), host_id="web-1", labels=LABELS, held=held, desired=desired
    )


def rotated(targets: Targets) -> KeyRotated:
    return KeyRotated(
        key="a/b",
        key_id="k1",
        type="aes-256",
        version=3,
        primary=3,
        state="Active",
        digest=DIGEST,
        targets=targets,
        install=SPEC,
    )


def test_rotation_for_this_host_reconciles_with_the_named_digest() -> None:
    d = decide(EventType.KEY_ROTATED, rotated(WEB))
    assert (d.action, d.key, d.versions, dict(d.digests)) == (
        EventAction.RECONCILE,
        "a/b",
        (3,),
        {3: DIGEST},
    )
    assert decide(EventType.KEY_ROTATED, rotated(DB)).action is EventAction.IGNORE
    # Held but no longer targeted: still reconciled (the sync will remove it).
    assert decide(EventType.KEY_ROTATED, rotated(DB), held={"a/b"}).action is EventAction.RECONCILE
    by_id = Targets(hosts=("web-1",), env="test")
    assert decide(EventType.KEY_ROTATED, rotated(by_id)).action is EventAction.RECONCILE


def test_revocations_remove_held_versions_from_the_event() -> None:
    revoked = KeyRevoked(
        key="a/b",
        key_id="k1",
        version=3,
        from_state="Active",
        to_state="Compromised",
        reason="keyCompromise",
        compromise=True,
        primary=4,
    )
    d = decide(EventType.KEY_REVOKED, revoked, held={"a/b"})
    assert (d.action, d.versions, d.primary_version) == (EventAction.REMOVE_VERSIONS, (3,), 4)
    assert decide(EventType.KEY_REVOKED, revoked).action is EventAction.IGNORE
    # Desired but not held yet (a first install may be in flight): still noted as revoked.
    d = decide(EventType.KEY_REVOKED, revoked, desired={"a/b"})
    assert (d.action, d.versions) == (EventAction.REMOVE_VERSIONS, (3,))
    destroyed = KeyDestroyed(
        key="a/b",
        key_id="k1",
        version=1,
        from_state="Deactivated",
        to_state="Destroyed",
        digest=DIGEST,
    )
    d = decide(EventType.KEY_DESTROYED, destroyed, held={"a/b"})
    assert (d.action, d.versions) == (EventAction.REMOVE_VERSIONS, (1,))


POLICY = {
    "cryptoperiod": 86400,
    "grace": 3600,
    "activation_delay": 0,
    "max_staleness": 60,
    "approvals_required": ["destroy"],
}
"""A key's policy as events carry it (a typed model: whole seconds, sorted operations)."""


def test_state_targets_and_policy_changes() -> None:
    state = KeyStateChanged(
        key="a/b", key_id="k1", version=2, from_state="PreActive", to_state="Active", primary=2
    )
    assert decide(EventType.KEY_STATE_CHANGED, state).action is EventAction.IGNORE
    assert (
        decide(EventType.KEY_STATE_CHANGED, state, desired={"a/b"}).action is EventAction.RECONCILE
    )
    targets = KeyTargetsChanged(key="a/b", key_id="k1", targets=WEB, install=SPEC)
    assert decide(EventType.KEY_TARGETS_CHANGED, targets).action is EventAction.RECONCILE
    away = KeyTargetsChanged(key="a/b", key_id="k1", targets=DB, install=SPEC)
    assert decide(EventType.KEY_TARGETS_CHANGED, away, held={"a/b"}).action is EventAction.RECONCILE
    assert decide(EventType.KEY_TARGETS_CHANGED, away).action is EventAction.IGNORE
    policy = KeyPolicyChanged(key="a/b", key_id="k1", policy=POLICY)
    assert (
        decide(EventType.KEY_POLICY_CHANGED, policy, held={"a/b"}).action is EventAction.RECONCILE
    )
    assert decide(EventType.KEY_POLICY_CHANGED, policy).action is EventAction.IGNORE


def test_a_rollout_that_runs_again_asks_the_host_anew_for_its_version() -> None:
    """A stage that goes out or is resumed asks anew (a failed change is tried again at once,
    a held version is acknowledged again); a halt or a roll-back only reconciles."""

    def rollout(state: RolloutState) -> KeyRollout:
        return KeyRollout(
            key="a/b",
            key_id="k1",
            version=2,
            state=state,
            stage=2,
            stages=(20, 100),
            gate="healthy",
            released=3,
            targets=WEB,
        )

    resumed = decide(EventType.KEY_ROLLOUT, rollout(RolloutState.RUNNING))
    assert (resumed.action, resumed.versions, resumed.retry) == (
        EventAction.RECONCILE,
        (2,),
        True,
    )
    for state in (RolloutState.HALTED, RolloutState.ROLLED_BACK, RolloutState.EXPIRED):
        d = decide(EventType.KEY_ROLLOUT, rollout(state), held={"a/b"})
        assert (d.action, d.versions, d.retry) == (EventAction.RECONCILE, (), False)
    away = rollout(RolloutState.RUNNING).model_copy(update={"targets": DB})
    assert decide(EventType.KEY_ROLLOUT, away).action is EventAction.IGNORE


def test_host_revocation_only_for_this_host() -> None:
    assert decide(EventType.HOST_REVOKED, HostRevoked(host="web-1")).action is (
        EventAction.HOST_REVOKED
    )
    assert decide(EventType.HOST_REVOKED, HostRevoked(host="web-2")).action is EventAction.IGNORE


def test_a_revocation_of_another_identity_under_this_name_is_ignored() -> None:
    """A host re-enrolled under its old name has a new key: its predecessor's revocation is not
    for it; one naming its own key is."""
    mine, old = "ed25519:mine", "ed25519:predecessor"

    def action(kid: str) -> EventAction:
        event = envelope(EventType.HOST_REVOKED, HostRevoked(host="web-1", signer_key_id=kid))
        return classify(event, host_id="web-1", labels={}, held=set(), signer_key_id=mine).action

    assert action(old) is EventAction.IGNORE
    assert action(mine) is EventAction.HOST_REVOKED
    assert EventType.ACK not in RELEVANT_TYPES


def test_a_created_key_for_this_host_is_fetched_with_its_first_digest() -> None:
    created = KeyCreated(
        key="a/b",
        key_id="k1",
        type="aes-256",
        usage=("encrypt",),
        version=1,
        state="Active",
        digest=DIGEST,
        primary=1,
        policy=POLICY,
        targets=WEB,
        install=SPEC,
    )
    d = decide(EventType.KEY_CREATED, created)
    assert (d.action, d.versions, dict(d.digests)) == (EventAction.RECONCILE, (1,), {1: DIGEST})
    other = created.model_copy(update={"targets": DB})
    assert decide(EventType.KEY_CREATED, other).action is EventAction.IGNORE


def test_backoff_grows_with_jitter_up_to_the_cap_and_resets() -> None:
    low = Backoff(0.5, 30, rng=lambda: 0.0)
    high = Backoff(0.5, 30, rng=lambda: 1.0)
    lows = [low.next() for _ in range(10)]
    highs = [high.next() for _ in range(10)]
    assert highs[:4] == [0.5, 1.0, 2.0, 4.0] and highs[-1] == 30
    assert lows[:3] == [0.25, 0.5, 1.0] and lows[-1] == 15
    assert all(x > 0 for x in lows)
    high.reset()
    assert high.next() == 0.5 and high.failures == 1
