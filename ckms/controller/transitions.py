"""The per-version transition table (NIST SP 800-57 Part 1 §7, KMIP 2.1): pure, no I/O.

One table says which operation moves a version from which state to which; the lifecycle applies
it, the scheduler plans with it (:mod:`ckms.controller.duework`) and :mod:`ckms.controller.desired`
derives from it what a host should hold. Everything not in :data:`TRANSITIONS` is refused with
:class:`~ckms.errors.InvalidTransitionError` naming the operation and the current state.

A second, smaller table (:data:`ROLLOUT_TRANSITIONS`) says how a rollout of a PreActive
version moves (:class:`~ckms.controller.models.Rollout`); a version waiting for its rollout
(:func:`awaits_rollout`) is activated by the rollout's completion, never by a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from ckms.errors import InvalidTransitionError
from ckms.protocol import KeyState, RolloutState

__all__ = [
    "DISTRIBUTABLE_STATES",
    "LIVE_STATES",
    "ROLLOUT_TRANSITIONS",
    "TRANSITIONS",
    "Op",
    "RolloutOp",
    "allowed_operations",
    "awaits_rollout",
    "can",
    "is_distributable",
    "next_rollout_state",
    "next_state",
    "op_label",
    "revoked_for",
]


class Op(StrEnum):
    """Per-version lifecycle operations (the columns of the transition table)."""

    ACTIVATE = "activate"
    SUSPEND = "suspend"
    RESUME = "resume"
    DEACTIVATE = "deactivate"
    REVOKE = "revoke"  # revoke with a non-compromise reason
    COMPROMISE = "compromise"  # revoke with keyCompromise or cACompromise
    DESTROY = "destroy"


_S = KeyState
TRANSITIONS: Final[Mapping[tuple[KeyState, Op], KeyState]] = MappingProxyType(
    {
        (_S.PRE_ACTIVE, Op.ACTIVATE): _S.ACTIVE,
        (_S.ACTIVE, Op.SUSPEND): _S.SUSPENDED,
        (_S.SUSPENDED, Op.RESUME): _S.ACTIVE,
        (_S.ACTIVE, Op.DEACTIVATE): _S.DEACTIVATED,
        (_S.SUSPENDED, Op.DEACTIVATE): _S.DEACTIVATED,
        (_S.ACTIVE, Op.REVOKE): _S.DEACTIVATED,
        (_S.SUSPENDED, Op.REVOKE): _S.DEACTIVATED,
        (_S.PRE_ACTIVE, Op.COMPROMISE): _S.COMPROMISED,
        (_S.ACTIVE, Op.COMPROMISE): _S.COMPROMISED,
        (_S.SUSPENDED, Op.COMPROMISE): _S.COMPROMISED,
        (_S.DEACTIVATED, Op.COMPROMISE): _S.COMPROMISED,
        (_S.DESTROYED, Op.COMPROMISE): _S.DESTROYED_COMPROMISED,
        (_S.PRE_ACTIVE, Op.DESTROY): _S.DESTROYED,
        (_S.DEACTIVATED, Op.DESTROY): _S.DESTROYED,
        (_S.COMPROMISED, Op.DESTROY): _S.DESTROYED_COMPROMISED,
    }
)
"""Per version: (state, operation) → new state. Everything not listed is refused."""

DISTRIBUTABLE_STATES: Final = frozenset({KeyState.PRE_ACTIVE, KeyState.ACTIVE})
"""States whose material agents may fetch and keep installed: PreActive versions are
pre-distributed so activation only flips the primary; every other state is removed from hosts."""

LIVE_STATES: Final = frozenset({KeyState.PRE_ACTIVE, KeyState.ACTIVE, KeyState.SUSPENDED})
"""States of a version not yet out of use: a newer primary supersedes these (and only these)."""

_OP_LABEL: Final = {Op.REVOKE: "revoke", Op.COMPROMISE: "revoke as compromised"}
_HINT: Final = {
    (_S.ACTIVE, Op.DESTROY): "; deactivate or revoke it first",
    (_S.SUSPENDED, Op.DESTROY): "; deactivate or revoke it first",
}


def op_label(op: Op) -> str:
    """How an operation reads in a refusal (``revoke as compromised`` for a compromise)."""
    return _OP_LABEL.get(op, str(op))


def next_state(
    state: KeyState, op: Op, *, key: str = "key", version: int | None = None
) -> KeyState:
    """Return the state ``op`` leads to from ``state``, or raise InvalidTransitionError."""
    try:
        return TRANSITIONS[(state, op)]
    except KeyError:
        what = f"{key} version {version}" if version is not None else key
        raise InvalidTransitionError(
            f"cannot {op_label(op)} {what}: it is {state}{_HINT.get((state, op), '')}"
        ) from None


def can(state: KeyState, op: Op) -> bool:
    """True when the table allows ``op`` from ``state``."""
    return (state, op) in TRANSITIONS


def allowed_operations(state: KeyState) -> frozenset[Op]:
    """Return the operations the table allows from ``state``."""
    return frozenset(op for (s, op) in TRANSITIONS if s is state)


def is_distributable(state: KeyState, *, has_material: bool) -> bool:
    """True when a version in ``state`` may be sent to and kept on its target hosts."""
    return has_material and state in DISTRIBUTABLE_STATES


def revoked_for(state: KeyState, op: Op) -> bool:
    """True when a version in ``state`` is already out of use for a revocation ``op``.

    A whole-key revocation skips these: a compromise skips versions already compromised, any
    other revocation skips every version no longer live.
    """
    if op is Op.COMPROMISE:
        return state in (KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED)
    return state not in LIVE_STATES


def awaits_rollout(state: KeyState, activation_at: object) -> bool:
    """True for a version that a rollout activates: PreActive with no activation time.

    Create and rotate always give a time-activated version its activation time (and the
    version's row MAC covers it), so a version without one was rotated into a rollout; which
    hosts may hold it is the rollout's to say (:func:`ckms.controller.desired.desired_versions`).
    """
    return state is KeyState.PRE_ACTIVE and activation_at is None


class RolloutOp(StrEnum):
    """What moves a rollout (the columns of :data:`ROLLOUT_TRANSITIONS`)."""

    ADVANCE = "advance"  # the gate held: the next stage goes out
    COMPLETE = "complete"  # the last gate held: the version is activated
    HALT = "halt"  # a host of the stage failed
    EXPIRE = "expire"  # the deadline passed before the gate held
    ABORT = "abort"  # an operator withdraws the stage in progress
    RESUME = "resume"  # an operator goes on (after a fix, or with a new deadline)
    CANCEL = "cancel"  # the version left PreActive some other way


_R = RolloutState
ROLLOUT_TRANSITIONS: Final[Mapping[tuple[RolloutState, RolloutOp], RolloutState]] = (
    MappingProxyType(
        {
            (_R.RUNNING, RolloutOp.ADVANCE): _R.RUNNING,
            (_R.RUNNING, RolloutOp.COMPLETE): _R.COMPLETED,
            (_R.RUNNING, RolloutOp.HALT): _R.HALTED,
            (_R.RUNNING, RolloutOp.EXPIRE): _R.EXPIRED,
            (_R.RUNNING, RolloutOp.ABORT): _R.ROLLED_BACK,
            (_R.HALTED, RolloutOp.ABORT): _R.ROLLED_BACK,
            (_R.EXPIRED, RolloutOp.ABORT): _R.ROLLED_BACK,
            (_R.HALTED, RolloutOp.RESUME): _R.RUNNING,
            (_R.EXPIRED, RolloutOp.RESUME): _R.RUNNING,
            (_R.ROLLED_BACK, RolloutOp.RESUME): _R.RUNNING,
            (_R.RUNNING, RolloutOp.CANCEL): _R.CANCELLED,
            (_R.HALTED, RolloutOp.CANCEL): _R.CANCELLED,
            (_R.EXPIRED, RolloutOp.CANCEL): _R.CANCELLED,
            (_R.ROLLED_BACK, RolloutOp.CANCEL): _R.CANCELLED,
        }
    )
)
"""Per rollout: (state, operation) → new state. Everything not listed is refused."""


def next_rollout_state(state: RolloutState, op: RolloutOp, *, key: str = "key") -> RolloutState:
    """Return the state ``op`` leads a rollout to, or raise InvalidTransitionError."""
    try:
        return ROLLOUT_TRANSITIONS[(state, op)]
    except KeyError:
        raise InvalidTransitionError(
            f"cannot {op} the rollout of {key}: it is {state}"
        ) from None
