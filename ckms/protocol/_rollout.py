"""How a new version reaches the fleet before it becomes primary: wire rules of a rollout.

A rotation that waits for the fleet (``--activate-when converged``) or goes out in stages
(``--stages 5%,25%,100% --gate healthy``) is a *rollout*: the new version is PreActive while it
is handed to the hosts of one stage after the other, and becomes primary only when the last
stage's gate holds. The rules here are shared by the CLI (which refuses bad arguments before it
connects), the admin RPC and the events, so every side reads a stage list the same way.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Final

from ckms.errors import ConfigError

__all__ = [
    "MAX_STAGES",
    "ActivateWhen",
    "Gate",
    "RolloutState",
    "format_stages",
    "parse_gate",
    "parse_stages",
]

MAX_STAGES: Final = 10
"""Stages one rollout may have (the last is always 100%)."""


class ActivateWhen(StrEnum):
    """When a rotated version becomes primary."""

    DELAY = "delay"
    """After the policy's activation delay (zero: at once): the fixed wait of old."""
    CONVERGED = "converged"
    """When every targeted host that may still hold the key acknowledged the new version."""


class Gate(StrEnum):
    """What must hold for a stage before the next one starts (and, after the last, activation)."""

    INSTALLED = "installed"
    """Every host of the stage acknowledged the version ``installed`` with the right digest."""
    HEALTHY = "healthy"
    """As ``installed``, and the key's install spec names a health check: an agent acknowledges
    ``installed`` only after that check passed (a failed check puts the old files back and
    acknowledges ``failed``)."""


class RolloutState(StrEnum):
    """Where a rollout stands (the transitions: ``ckms.controller.transitions``)."""

    RUNNING = "running"
    """A stage is out; its gate is being watched."""
    HALTED = "halted"
    """A host of the stage failed: nothing more goes out; the old version stays primary."""
    ROLLED_BACK = "rolled-back"
    """An operator withdrew the stage in progress: its hosts drop the new version."""
    EXPIRED = "expired"
    """The deadline passed before the gate held: the version stays PreActive."""
    COMPLETED = "completed"
    """The last gate held and the version became primary (one signed activation)."""
    CANCELLED = "cancelled"
    """The version left PreActive some other way (activated by hand, revoked, destroyed)."""


def parse_gate(text: str) -> Gate:
    """The gate named ``text``, or ConfigError listing the gates there are."""
    try:
        return Gate(text.strip())
    except ValueError:
        raise ConfigError(
            f"unknown gate {text!r}; use one of {', '.join(g.value for g in Gate)}"
        ) from None


def parse_stages(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"5%,25%,100%"`` (or a list of percents) as cumulative percents, checked.

    Each stage is the share of the targeted hosts that holds the new version once the stage is
    out (stage 2 at 25% includes the 5% of stage 1). Percents are whole numbers above 0 and at
    most 100, strictly increasing, and the last is 100 (a rollout that never reaches every host
    would never activate).
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ConfigError(f"invalid stages {text!r}: give percents like 5%,25%,100%")
        values: list[int] = []
        for part in parts:
            digits = part.removesuffix("%").strip()
            if not digits.isdigit():
                raise ConfigError(
                    f"invalid stage {part!r} in {text!r}: each stage is a whole percent like 25%"
                )
            values.append(int(digits))
    else:
        values = [int(v) for v in text]
        if any(isinstance(v, bool) for v in text):
            raise ConfigError("stages are whole percents")
    shown = format_stages(values) if values else "(none)"
    if not values:
        raise ConfigError("a rollout needs at least one stage")
    if len(values) > MAX_STAGES:
        raise ConfigError(f"stages {shown}: at most {MAX_STAGES} stages")
    for v in values:
        if v <= 0 or v > 100:
            raise ConfigError(f"stages {shown}: {v}% is not a share of hosts (1% to 100%)")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigError(
            f"stages {shown}: each stage must reach more hosts than the one before "
            "(percents are cumulative and strictly increasing)"
        )
    if values[-1] != 100:
        raise ConfigError(f"stages {shown}: the last stage must be 100% (every targeted host)")
    return tuple(values)


def format_stages(stages: list[int] | tuple[int, ...]) -> str:
    """``(5, 25, 100)`` as ``5%,25%,100%``."""
    return ",".join(f"{s}%" for s in stages)
