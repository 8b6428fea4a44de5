"""The scheduler: applies due rotations, activations and deactivations; checkpoints the audit log.

Every tick asks :func:`~ckms.controller.duework.due_work` what is due at the injected clock's
*now* and applies it through the :class:`~ckms.controller.lifecycle.Lifecycle` as actor
``scheduler`` (so each change is audited and announced like an operator's). One failing item is
logged and retried on the next tick; it never stops the others. The loop sleeps until the next
due time or the tick interval, whichever is sooner; tests call :meth:`Scheduler.tick` after
moving their clock instead of waiting.

While sealed, nothing is done (every lifecycle change needs the vault). After every tick that
changed something, and at least every ``checkpoint_interval``, the audit log gets a signed
checkpoint through the audit anchor, so truncation of the log is detectable up to the last one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ckms.controller.duework import due_work, fill_next_due
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.sealing import Vault
from ckms.errors import CKMSError
from ckms.store import Clock, Store, utc_now

log = logging.getLogger(__name__)

ACTOR = "scheduler"


@dataclass
class TickReport:
    """What one tick did."""

    rotated: list[str] = field(default_factory=list)
    activated: list[tuple[str, int]] = field(default_factory=list)
    deactivated: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checkpointed: bool = False
    next_at: datetime | None = None

    @property
    def changed(self) -> bool:
        """True when the tick changed any key."""
        return bool(self.rotated or self.activated or self.deactivated)


class Scheduler:
    """``run()`` ticks until cancelled; ``tick()`` does one round (for tests and ``ckms``)."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        lifecycle: Lifecycle,
        *,
        clock: Clock = utc_now,
        interval: timedelta = timedelta(seconds=30),
        checkpoint_interval: timedelta = timedelta(minutes=5),
    ) -> None:
        self._store = store
        self._vault = vault
        self._lifecycle = lifecycle
        self._clock = clock
        self._interval = interval
        self._checkpoint_interval = checkpoint_interval
        self._last_checkpoint: datetime | None = None

    async def tick(self) -> TickReport:
        """Apply everything due now, then checkpoint the audit log when it is time."""
        report = TickReport()
        await fill_next_due(self._store)
        if self._vault.sealed:
            return report
        now = self._clock()
        work = await due_work(self._store, now)
        report.next_at = work.next_at
        # Activations first: a pre-distributed version due now becomes primary before any
        # rotation check, and deactivations last, after the new primary is in place.
        for item in work.activate:
            await self._apply(
                report,
                f"activate {item.key} v{item.version}",
                self._lifecycle.activate(
                    item.key, item.version, actor=ACTOR, reason="activation time reached"
                ),
                lambda i=item: report.activated.append((i.key, i.version)),
            )
        for item in work.rotate:
            await self._apply(
                report,
                f"rotate {item.key}",
                self._lifecycle.rotate(item.key, actor=ACTOR, reason="cryptoperiod ended"),
                lambda i=item: report.rotated.append(i.key),
            )
        for item in work.deactivate:
            await self._apply(
                report,
                f"deactivate {item.key} v{item.version}",
                self._lifecycle.deactivate(
                    item.key, item.version, actor=ACTOR, reason="grace period ended"
                ),
                lambda i=item: report.deactivated.append((i.key, i.version)),
            )
        due_checkpoint = (
            self._last_checkpoint is None
            or now - self._last_checkpoint >= self._checkpoint_interval
        )
        # Nothing is signed before the anchor was read back (see ckms.controller.anchor).
        if (report.changed or due_checkpoint) and self._vault.anchor.loaded:
            try:
                await self._vault.checkpoint_audit()
                self._last_checkpoint = now
                report.checkpointed = True
            except CKMSError as exc:
                report.errors.append(f"checkpoint: {exc}")
                log.error("could not checkpoint the audit log: %s", exc)
        if report.changed:
            log.info(
                "scheduler: rotated=%s activated=%s deactivated=%s",
                report.rotated,
                report.activated,
                report.deactivated,
            )
        return report

    async def _apply(
        self, report: TickReport, what: str, change: Awaitable[object], done: Callable[[], None]
    ) -> None:
        try:
            await change
        except CKMSError as exc:
            report.errors.append(f"{what}: {exc}")
            log.error("scheduler could not %s: %s", what, exc)
        else:
            done()

    async def run(self) -> None:
        """Tick until cancelled, sleeping until the next due time or the interval."""
        while True:
            report = await self.tick()
            delay = self._interval.total_seconds()
            if report.next_at is not None:
                until_due = (report.next_at - self._clock()).total_seconds()
                delay = max(0.0, min(delay, until_due))
            await asyncio.sleep(max(delay, 0.05))
