"""The rollout driver: watches every running rollout's gate and moves it (controller side).

After every batch of acks (and every ``interval`` for deadlines and staleness) each running
rollout's current stage is judged (:func:`~ckms.controller.rollout_plan.judge_stage`):

- a host of the stage acknowledged ``failed`` since it went out → **halt** (nothing more goes
  out, the old version stays primary everywhere, the failing hosts are named);
- the gate holds → the next stage goes out (**advance**), or after the last one the version is
  activated (**complete**: one signed ``key.state_changed`` every host applies);
- the deadline passed first → **expire**: the version stays PreActive and the hosts holding it
  up are named in ``ckms status``, ``fleet status`` and ``rollout status``.

Every move is one transaction of the lifecycle (:meth:`Lifecycle.move_rollout`) with its event
and audit record, as actor ``rollout``. Operators resume and abort through the same method. A
rollout row that fails its MAC check stops that key's rollout (logged, nothing released).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from ckms._aio import stop_if_cancelled, wait_event
from ckms.controller import _repo, rowmac
from ckms.controller.hosts import HostRegistry
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import Key, Rollout
from ckms.controller.replies import rollout_info
from ckms.controller.rollout_plan import AckRow, GateVerdict, judge_stage
from ckms.controller.sealing import Vault
from ckms.controller.targets import match_hosts
from ckms.controller.transitions import RolloutOp, awaits_rollout
from ckms.errors import CKMSError, InvalidTransitionError, NotFoundError
from ckms.protocol import RolloutState
from ckms.protocol import admin as api
from ckms.store import Clock, Reader, Store, Transaction, parse_time, utc_now

__all__ = ["ACTOR", "RolloutDriver", "RolloutView"]

log = logging.getLogger(__name__)

ACTOR: Final = "rollout"

_NAMED: Final = 20
"""Hosts named in a reason (the audit record lists every released host)."""


@dataclass(frozen=True)
class RolloutView:
    """A rollout with its current gate: what ``rollout status`` and the fleet view show."""

    key: str
    rollout: Rollout
    verdict: GateVerdict | None
    """The gate of the stage out now (None once the rollout ended)."""
    primary_version: int | None

    def info(self) -> api.RolloutInfo:
        """As the admin RPC shows it."""
        return rollout_info(self.key, self.rollout, self.verdict, self.primary_version)


def _names(hosts: Sequence[str]) -> str:
    shown = ", ".join(hosts[:_NAMED])
    return shown + (f" and {len(hosts) - _NAMED} more" if len(hosts) > _NAMED else "")


Confirm = Callable[[Transaction, Key, Rollout], Awaitable[None]]
"""Called by :meth:`Lifecycle.move_rollout` inside its transaction, before it moves."""


class _GateChanged(InvalidTransitionError):
    """Raised when the gate judged inside the moving transaction differs from the first look."""


def _decide(
    rollout: Rollout, verdict: GateVerdict, now: datetime
) -> tuple[RolloutOp, str, dict[str, object]] | None:
    """The move the gate calls for (halt, advance/complete, expire), with its reason and the
    audit record's extra details; None: nothing yet."""
    stage = f"stage {rollout.stage} of {len(rollout.stages)}"
    extra: dict[str, object] = {
        "acked": len(verdict.acked),
        "counted": verdict.counted,
        "hosts": verdict.hosts,
    }
    if verdict.halts:
        # The hosts' own reasons go to the audit record and fleet status, not into the
        # rollout's reason: that is published in a signed event, and a host's text is not
        # the controller's to sign.
        errors = {h: verdict.errors[h] for h in verdict.failed if h in verdict.errors}
        return (
            RolloutOp.HALT,
            f"{stage} failed on {_names(verdict.failed)}",
            extra | {"failed": list(verdict.failed), "errors": errors},
        )
    if verdict.holds:
        op = RolloutOp.COMPLETE if rollout.final_stage else RolloutOp.ADVANCE
        why = f"{stage} gate {rollout.gate} held: {len(verdict.acked)} of {verdict.counted} hosts"
        if verdict.uncounted:
            why += f" (not counted, stale past max staleness: {_names(verdict.uncounted)})"
        if verdict.failed:
            why += f" (failed, within the budget of {verdict.budget}: {_names(verdict.failed)})"
            extra |= {"holdouts": list(verdict.failed)}
        return op, why, extra
    if now >= rollout.deadline_at:
        why = f"deadline passed at {stage}; held up by {_names(verdict.waiting)}"
        return RolloutOp.EXPIRE, why, extra | {"waiting": list(verdict.waiting)}
    return None


class RolloutDriver:
    """``run()`` moves running rollouts until cancelled; ``step()`` does one round (tests)."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        lifecycle: Lifecycle,
        hosts: HostRegistry,
        *,
        clock: Clock = utc_now,
        interval: timedelta = timedelta(seconds=5),
    ) -> None:
        self._store = store
        self._vault = vault
        self._lifecycle = lifecycle
        self._hosts = hosts
        self._clock = clock
        self._interval = interval
        self._wake = asyncio.Event()
        self.moves: dict[str, int] = {}
        """Moves made by the driver, by operation (metrics)."""

    def wake(self) -> None:
        """Judge the running rollouts soon (acks were applied)."""
        self._wake.set()

    async def run(self) -> None:
        """Step after every wake-up or interval, until cancelled."""
        while True:
            await wait_event(self._wake, self._interval.total_seconds())
            self._wake.clear()
            stop_if_cancelled()
            try:
                await self.step()
            except CKMSError as exc:
                log.error("rollout driver: %s", exc)

    async def step(self) -> list[tuple[str, RolloutOp]]:
        """Judge every running rollout once and move those whose gate decided; return moves."""
        if self._vault.sealed:
            return []
        async with self._store.read() as r:
            names = await _repo.live_rollout_keys(r)
        moved: list[tuple[str, RolloutOp]] = []
        for name in names:
            try:
                op = await self._step_key(name)
            except CKMSError as exc:
                log.error("rollout of %s not moved: %s", name, exc)
                continue
            if op is not None:
                moved.append((name, op))
                self.moves[str(op)] = self.moves.get(str(op), 0) + 1
        return moved

    async def _step_key(self, name: str) -> RolloutOp | None:
        key = await self._lifecycle.get(name)
        rollout = key.rollout
        if rollout is None or rollout.state is not RolloutState.RUNNING:
            return None
        # What was judged: a resume or abort meanwhile (a new stage start) refuses the move.
        expect = (rollout.version, rollout.stage, rollout.stage_started_at)
        version = key.version(rollout.version)
        if not awaits_rollout(version.state, version.activation_at):
            await self._move(name, RolloutOp.CANCEL, f"version is {version.state}", expect)
            return RolloutOp.CANCEL
        for _ in range(3):  # a look outside any write, then the same judgment inside it
            decision = _decide(rollout, await self.verdict(key, rollout), self._clock())
            if decision is None:
                return None
            op, why, extra = decision

            async def confirm(tx: Transaction, key: Key, rollout: Rollout, op: RolloutOp = op):
                # Judged again from the rows as the moving transaction sees them: an ack
                # applied since the first look decides, never one left out.
                again = _decide(rollout, await self.verdict(key, rollout, tx), self._clock())
                if again is None or again[0] is not op:
                    raise _GateChanged(f"the gate of the rollout of {key.name} changed meanwhile")

            try:
                await self._move(name, op, why, expect, extra, confirm=confirm)
            except _GateChanged:
                continue
            return op
        return None

    async def _move(
        self,
        name: str,
        op: RolloutOp,
        reason: str,
        expect: tuple[int, int, datetime],
        extra: dict[str, object] | None = None,
        *,
        confirm: Confirm | None = None,
    ) -> None:
        await self._lifecycle.move_rollout(
            name,
            op,
            actor=ACTOR,
            reason=reason[:1000],
            expect=expect,
            extra=extra,
            confirm=confirm,
        )
        log.info("rollout of %s: %s (%s)", name, op, reason[:200])

    async def verdict(
        self, key: Key, rollout: Rollout, r: Reader | Transaction | None = None
    ) -> GateVerdict:
        """The gate of the rollout's stage out now, from the fleet view's rows (as ``r`` sees
        them, when given: the transaction that moves the stage)."""
        if r is None:
            async with self._store.read() as reader:
                return await self.verdict(key, rollout, reader)
        targeted = match_hosts(key.targets, await _repo.list_hosts(r))
        rows = await r.fetchall(
            "SELECT host_id, key_id, version, status, digest, updated_at, error, mac "
            "FROM fleet_state WHERE key_id = ? AND version = ?",
            (key.id, rollout.version),
        )
        row_key = r.row_key
        acks: dict[str, AckRow] = {}
        for row in rows:
            # A forged row raises (the driver moves nothing); one without a MAC is no
            # 'installed' for the gate, while a failure counts whatever (fail closed).
            if not rowmac.fleet_row_trusted(row_key, row) and row["status"] != "failed":
                continue
            acks[row["host_id"]] = AckRow(
                status=str(row["status"]),
                digest=row["digest"],
                updated_at=parse_time(row["updated_at"]),
                error=row["error"],
            )
        seen = await r.fetchall("SELECT id, last_seen_at, seen_mac FROM hosts")
        # A contact time without its MAC is taken as now: the host is counted (never made
        # stale, and so left out of the gate, by an edit of the file).
        now = self._clock()
        last_seen: dict[str, datetime | None] = {
            h["id"]: parse_time(h["last_seen_at"]) if rowmac.seen_trusted(row_key, h) else now
            for h in seen
        }
        version = key.version(rollout.version)
        return judge_stage(key, version, rollout, targeted, acks, last_seen, self._clock())

    async def view(self, key: Key) -> RolloutView:
        """The key's rollout with its gate now (NotFoundError when it never had one)."""
        rollout = key.rollout
        if rollout is None:
            raise NotFoundError(f"key {key.name} has no rollout")
        verdict = await self.verdict(key, rollout) if rollout.live else None
        return RolloutView(key.name, rollout, verdict, key.primary_version)

    async def views(self) -> list[RolloutView]:
        """Every rollout not ended (running, halted, rolled back, expired), by key name."""
        async with self._store.read() as r:
            names = await _repo.rollout_keys(r)
        out = []
        for name in names:
            try:
                out.append(await self.view(await self._lifecycle.get(name)))
            except CKMSError as exc:
                log.error("rollout of %s cannot be shown: %s", name, exc)
        return out

    async def resume(
        self,
        name: str,
        *,
        actor: str,
        reason: str | None = None,
        deadline: timedelta | None = None,
        version: int | None = None,
        max_failures: str | None = None,
    ) -> Rollout:
        """Go on with a halted, rolled-back or expired rollout (the stage goes out again);
        ``version`` refuses it unless that version is the one rolling out; ``max_failures``
        sets the failure budget from now on (say, the hosts it halted on, to go on past them)."""
        moved = await self._lifecycle.move_rollout(
            name,
            RolloutOp.RESUME,
            actor=actor,
            reason=reason,
            deadline=deadline,
            of_version=version,
            max_failures=max_failures,
        )
        self.wake()
        return moved

    async def abort(self, name: str, *, actor: str, reason: str | None = None) -> Rollout:
        """Withdraw the stage in progress: its hosts drop the version; the old stays primary."""
        return await self._lifecycle.move_rollout(name, RolloutOp.ABORT, actor=actor, reason=reason)
