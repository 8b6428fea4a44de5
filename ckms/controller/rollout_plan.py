"""Which hosts a rollout stage reaches and whether its gate holds: pure, no I/O.

**Sample.** The hosts a key targets are put in one order that depends only on the key id, the
version and the host ids (SHA-256 of them), so a retry, a resume or a restarted controller picks
the same hosts; with a ``spread`` label (``zone``) the order takes one host of each label value
in turn, so even a small first stage covers as many zones as it has hosts. A stage of ``p``
percent releases the first ``ceil(p% of n)`` hosts of that order (at least one), plus every host
an earlier stage released (a host that joined meanwhile never pushes one out).

**Gate.** A stage's gate holds when no more hosts of the stage acknowledged ``failed`` since the
stage went out than its failure budget (``max_failures``, 0 by default: one failure halts; the
failed hosts within it are holdouts, named and not counted) and at least the threshold share
of the *counted* hosts acknowledged the version ``installed`` with its digest. A host that has
not acknowledged and was not seen for longer than the key's max staleness is not counted: its
agent drops the key by itself once it has been out of contact that long (fail closed), so it
cannot be left holding only the old version. Every other silent host holds the gate up, and is
named.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ckms.controller.models import Host, Key, KeyVersion, Rollout
from ckms.errors import ConfigError
from ckms.protocol import Gate, parse_stages

__all__ = [
    "AckRow",
    "GateVerdict",
    "RolloutRequest",
    "failure_budget",
    "judge_stage",
    "parse_max_failures",
    "sample_order",
    "stage_release",
    "stage_size",
]


@dataclass(frozen=True)
class RolloutRequest:
    """How a rotation should go out: stages (cumulative percents), the gate each must pass,
    the label to spread the sample over, and overrides of the key's policy (deadline, share of
    hosts). The default is one stage of every host: activate when converged."""

    stages: tuple[int, ...] = (100,)
    gate: Gate = Gate.INSTALLED
    spread: str | None = None
    deadline: timedelta | None = None
    threshold_pct: int | None = None
    max_failures: str | None = None
    """How many hosts of a stage may fail before it halts: ``N`` or ``P%`` (None: 0)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", parse_stages(self.stages))
        object.__setattr__(self, "max_failures", parse_max_failures(self.max_failures))
        if self.deadline is not None and self.deadline <= timedelta(0):
            raise ConfigError("a rollout deadline must be positive")
        if self.threshold_pct is not None and not 1 <= self.threshold_pct <= 100:
            raise ConfigError("a rollout threshold is a percent from 1 to 100")
        if self.spread is not None and (not self.spread or len(self.spread) > 63):
            raise ConfigError("spread names a host label (1 to 63 characters)")


_BUDGET = re.compile(r"^(\d{1,6})(%?)$")


def parse_max_failures(text: str | None) -> str | None:
    """A failure budget as given (``3``, ``5%``), checked; None stays None (budget 0)."""
    if text is None:
        return None
    m = _BUDGET.match(str(text).strip())
    if m is None or (m.group(2) and int(m.group(1)) > 100):
        raise ConfigError(
            f"a failure budget is a count of hosts (2) or a percent of a stage's hosts "
            f"(10%), not {text!r}"
        )
    return f"{int(m.group(1))}{m.group(2)}"


def failure_budget(max_failures: str | None, hosts: int) -> int:
    """How many of a stage's ``hosts`` may fail before it halts (a percent rounds down)."""
    if max_failures is None:
        return 0
    if max_failures.endswith("%"):
        return int(max_failures[:-1]) * hosts // 100
    return int(max_failures)


def _rank(seed: str, item: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{item}".encode()).digest()


def sample_order(seed: str, hosts: Iterable[Host], spread: str | None = None) -> list[str]:
    """Every host id in the rollout's order (see the module docstring)."""
    groups: dict[str, list[str]] = {}
    for host in hosts:
        label = host.labels.get(spread, "") if spread else ""
        groups.setdefault(label, []).append(host.id)
    ordered = [
        sorted(ids, key=lambda h: _rank(seed, h))
        for _, ids in sorted(groups.items(), key=lambda g: _rank(seed, "group:" + g[0]))
    ]
    out: list[str] = []
    for turn in range(max((len(g) for g in ordered), default=0)):
        out.extend(g[turn] for g in ordered if turn < len(g))
    return out


def stage_size(percent: int, hosts: int) -> int:
    """How many of ``hosts`` a stage of ``percent`` reaches (at least one when there are any)."""
    if hosts == 0:
        return 0
    return min(hosts, max(1, math.ceil(percent * hosts / 100)))


def seed_of(key: Key, version: int) -> str:
    """The sample's seed: the key's id (never reused) and the version."""
    return f"{key.id}:{version}"


def stage_release(
    key: Key,
    version: int,
    stages: Sequence[int],
    stage: int,
    targeted: Sequence[Host],
    *,
    spread: str | None,
    before: frozenset[str] = frozenset(),
) -> frozenset[str] | None:
    """The hosts that may hold ``version`` once ``stage`` (1-based) is out; None for the last
    stage (every targeted host, including hosts enrolled later)."""
    if stage >= len(stages):
        return None
    order = sample_order(seed_of(key, version), targeted, spread)
    return frozenset(order[: stage_size(stages[stage - 1], len(order))]) | before


@dataclass(frozen=True)
class AckRow:
    """What one host last acknowledged for the version (a ``fleet_state`` row)."""

    status: str
    digest: str | None
    updated_at: datetime
    error: str | None = None


@dataclass(frozen=True)
class GateVerdict:
    """A stage's gate at one instant: does it hold, and who holds it up or failed it."""

    holds: bool
    hosts: int
    acked: tuple[str, ...]
    waiting: tuple[str, ...]
    failed: tuple[str, ...]
    uncounted: tuple[str, ...]
    errors: Mapping[str, str]
    halts: bool = False
    """More hosts failed than the stage's failure budget: the rollout halts."""
    budget: int = 0

    @property
    def counted(self) -> int:
        """Hosts whose acknowledgement the gate waits for (failed hosts within the budget and
        stale ones are not)."""
        return self.hosts - len(self.uncounted) - (0 if self.halts else len(self.failed))


def stage_hosts(rollout: Rollout, targeted: Sequence[Host]) -> list[Host]:
    """The targeted hosts of the stage out now (every targeted host at the last stage)."""
    return [h for h in targeted if rollout.releases(h.id)]


def judge_stage(
    key: Key,
    version: KeyVersion,
    rollout: Rollout,
    targeted: Sequence[Host],
    acks: Mapping[str, AckRow],
    last_seen: Mapping[str, datetime | None],
    now: datetime,
) -> GateVerdict:
    """The gate of the stage out now (see the module docstring)."""
    hosts = stage_hosts(rollout, targeted)
    acked: list[str] = []
    waiting: list[str] = []
    failed: list[str] = []
    uncounted: list[str] = []
    errors: dict[str, str] = {}
    for host in hosts:
        row = acks.get(host.id)
        if (
            row is not None
            and row.status == "failed"
            and row.updated_at >= rollout.stage_started_at
        ):
            failed.append(host.id)
            if row.error:
                errors[host.id] = row.error
        elif row is not None and row.status == "installed" and row.digest == version.digest:
            acked.append(host.id)
        else:
            seen = last_seen.get(host.id) or host.enrolled_at
            if seen is not None and now - seen > key.policy.max_staleness:
                uncounted.append(host.id)
            else:
                waiting.append(host.id)
    budget = failure_budget(rollout.max_failures, len(hosts))
    halts = len(failed) > budget
    # Failed hosts within the budget are holdouts: named, not counted for the threshold.
    counted = len(hosts) - len(uncounted) - len(failed)
    enough = len(acked) * 100 >= rollout.threshold_pct * counted
    return GateVerdict(
        holds=not halts and enough,
        halts=halts,
        budget=budget,
        hosts=len(hosts),
        acked=tuple(sorted(acked)),
        waiting=tuple(sorted(waiting)),
        failed=tuple(sorted(failed)),
        uncounted=tuple(sorted(uncounted)),
        errors=errors,
    )
