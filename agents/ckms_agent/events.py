"""What a verified event means for this host (pure: the daemon acts, this module decides).

Events arrive already verified (signature by the pinned controller key, envelope version,
replay) by :class:`ckms.consumer.Subscriber`. Here each is mapped to one action:

- ``key.created`` / ``key.rotated`` / ``key.targets_changed`` for a key whose targets match
  this host, or that it holds; ``key.state_changed`` for a key it holds or the controller last
  listed for it; ``key.policy_changed`` for a key it holds; ``key.rollout`` for a key it holds,
  that the controller last listed for it or whose targets match it → **reconcile** that key
  (``sync`` + ``fetch``; the digest named in the event is checked too; whether a rollout stage
  includes this host is the sync reply's to say). A ``key.rollout`` that leaves the rollout
  running (a stage went out or was resumed) asks anew (``retry``): a change of that key that
  failed is tried again at once, and the version, if held, is acknowledged again;
- ``key.revoked`` / ``key.destroyed`` for a key it holds → **remove versions** locally at once,
  from the signed event alone, even if the controller is unreachable;
- ``ca.rotated`` → **refresh trust**: sync now, so the new trust bundle (and certificates from
  the new CA, when the old one is retired) arrive;
- ``host.revoked`` naming this host and its identity key (``signer_key_id``; events from before
  that field are taken by name) → **host revoked**: drop every key and stop. A revocation of
  an earlier identity under the same name (a host re-enrolled since) is ignored;
- anything else (other hosts, keys that are none of this host's business) → **ignore**.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from enum import StrEnum

from ckms.protocol import (
    CaRotated,
    Envelope,
    EventType,
    HostRevoked,
    KeyCreated,
    KeyDestroyed,
    KeyPolicyChanged,
    KeyRevoked,
    KeyRollout,
    KeyRotated,
    KeyStateChanged,
    KeyTargetsChanged,
    RolloutState,
)

RELEVANT_TYPES = frozenset(
    {
        EventType.KEY_CREATED,
        EventType.KEY_ROTATED,
        EventType.KEY_STATE_CHANGED,
        EventType.KEY_TARGETS_CHANGED,
        EventType.KEY_POLICY_CHANGED,
        EventType.KEY_ROLLOUT,
        EventType.KEY_REVOKED,
        EventType.KEY_DESTROYED,
        EventType.HOST_REVOKED,
        EventType.CA_ROTATED,
    }
)
"""The event types an agent subscribes to; the Subscriber skips the others without parsing."""


class EventAction(StrEnum):
    """What the daemon does with one event."""

    IGNORE = "ignore"
    RECONCILE = "reconcile"
    REMOVE_VERSIONS = "remove-versions"
    HOST_REVOKED = "host-revoked"
    REFRESH_TRUST = "refresh-trust"


@dataclass(frozen=True)
class Decision:
    """The action for one event, with what the daemon needs to carry it out."""

    action: EventAction
    key: str | None = None
    versions: tuple[int, ...] = ()
    digests: Mapping[int, str] = field(default_factory=dict)
    primary_version: int | None = None
    retry: bool = False
    """The controller asks anew for the key's rollout version (a stage went out or was
    resumed): a failed change is not held off, and a held version is acknowledged again (the
    gate of a resumed stage waits for acks sent since it went out again)."""


IGNORE = Decision(EventAction.IGNORE)


def classify(
    event: Envelope,
    *,
    host_id: str,
    labels: Mapping[str, str],
    held: Set[str],
    desired: Set[str] = frozenset(),
    signer_key_id: str | None = None,
) -> Decision:
    """Decide what ``event`` means for this host (``held``: keys it holds; ``desired``: keys the
    controller listed for it in the last sync; ``signer_key_id``: its own identity key's id)."""
    data = event.data
    if isinstance(data, KeyCreated | KeyRotated):
        if data.key in held or data.targets.matches(host_id, dict(labels)):
            return Decision(
                EventAction.RECONCILE,
                data.key,
                (data.version,),
                {data.version: data.digest},
            )
        return IGNORE
    if isinstance(data, KeyTargetsChanged | KeyRollout):
        if not (data.key in held or data.targets.matches(host_id, dict(labels))):
            return IGNORE
        if isinstance(data, KeyRollout) and data.state is RolloutState.RUNNING:
            return Decision(EventAction.RECONCILE, data.key, (data.version,), retry=True)
        return Decision(EventAction.RECONCILE, data.key)
    if isinstance(data, KeyStateChanged):
        if data.key in held or data.key in desired:
            return Decision(EventAction.RECONCILE, data.key)
        return IGNORE
    if isinstance(data, KeyPolicyChanged):
        return Decision(EventAction.RECONCILE, data.key) if data.key in held else IGNORE
    if isinstance(data, KeyRevoked | KeyDestroyed):
        if data.key not in held and data.key not in desired:
            return IGNORE
        # Not held yet but desired: a first install may be in flight; the version is noted as
        # revoked (tombstoned) so that install cannot put it on disk.
        return Decision(
            EventAction.REMOVE_VERSIONS, data.key, (data.version,), primary_version=data.primary
        )
    if isinstance(data, CaRotated):
        return Decision(EventAction.REFRESH_TRUST)
    if isinstance(data, HostRevoked) and data.host == host_id:
        if data.signer_key_id is not None and data.signer_key_id != signer_key_id:
            return IGNORE  # the revocation of a predecessor with this name, not of this host
        return Decision(EventAction.HOST_REVOKED)
    return IGNORE
