"""Jittered exponential backoff, so a fleet that lost its controller never reconnects in step.

One formula for every retry loop in ckms: agent reconnects and reconciles, and the Kafka relays
and consumers of controller and agent.

Each delay doubles from ``min_s`` up to ``max_s`` and is then scaled by a random factor in
[0.5, 1.0] ("equal jitter"): never below half the step, never a busy loop, and 10,000 agents
that lost the controller at the same instant spread their reconnects over the interval.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """``delay = backoff.next()`` after each failure; ``reset()`` after a success."""

    def __init__(
        self, min_s: float, max_s: float, *, rng: Callable[[], float] = random.random
    ) -> None:
        if min_s <= 0 or max_s < min_s:
            raise ValueError("backoff needs 0 < min_s <= max_s")
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng
        self._failures = 0

    def next(self) -> float:
        """The delay before the next attempt (grows with each call until reset)."""
        step = min(self.max_s, self.min_s * (2 ** min(self._failures, 32)))
        self._failures += 1
        return max(self.min_s / 2, step * (0.5 + 0.5 * self._rng()))

    def reset(self) -> None:
        """Start again from the minimum delay."""
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures since the last reset."""
        return self._failures
