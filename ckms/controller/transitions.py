"""The per-version transition table (NIST SP 800-57 Part 1 §7, KMIP 2.1): pure, no I/O.

One table says which operation moves a version from which state to which; the lifecycle applies
it, the scheduler plans with it (:mod:`ckms.controller.duework`) and :mod:`ckms.controller.desired`
derives from it what a host should hold. Everything not in :data:`TRANSITIONS` is refused with
:class:`~ckms.errors.InvalidTransitionError` naming the operation and the current state.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from ckms.errors import InvalidTransitionError
from ckms.protocol import KeyState

__all__ = [
    "DISTRIBUTABLE_STATES",
    "LIVE_STATES",
    "TRANSITIONS",
    "Op",
    "allowed_operations",
    "can",
    "is_distributable",
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
