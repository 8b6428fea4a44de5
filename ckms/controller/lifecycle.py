"""The key lifecycle: create, rotate, activate, suspend, resume, deactivate, revoke, destroy.

Per-version states follow the transition table of :mod:`ckms.controller.transitions` exactly;
any other transition raises :class:`~ckms.errors.InvalidTransitionError` naming the operation
and the current state.

Every change runs in **one** store transaction together with its audit record(s) and outbox
event(s): all are stored or none is. If the audit record cannot be written the operation fails
(fail closed). A refused operation (bad state, unknown key, policy, sealed) is audited with
outcome ``refused`` in a transaction of its own, then re-raised.

Primary version: the version that protects new data. A version becomes primary when it enters
Active (create, rotate without activation delay, activate, resume) if it has not been superseded
and is newer than the current primary; every older version not yet superseded is then marked
``superseded_at`` and stays installed for processing until its grace ends (then it is due to
deactivate). A primary that leaves Active (suspend, revoke) leaves the key without a primary
until another version becomes Active: ckms never silently falls back to a superseded version.

All mutations need an unsealed controller (material is generated and sealed, audit identifiers
are HMAC'd, and the events cannot be signed for publication while sealed anyway). Dual control
(``policy.approvals_required``) is enforced by the caller (the admin RPC) before it calls here.

Outbox events are the typed models of :mod:`ckms.protocol` (``data`` never holds material;
times are RFC 3339 UTC): ``key.created`` (:class:`~ckms.protocol.KeyCreated`), ``key.rotated``,
``key.state_changed`` (activate, suspend, resume, deactivate), ``key.revoked``,
``key.destroyed``, ``key.policy_changed`` and ``key.targets_changed``.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, TypeVar

from ckms import _gc
from ckms.controller import _repo
from ckms.controller.ca import entitled_names, revoke_certificates
from ckms.controller.duework import next_due
from ckms.controller.keyview import KeyView
from ckms.controller.models import (
    Host,
    InstallSpec,
    Key,
    KeyState,
    KeyVersion,
    Origin,
    Policy,
    RevocationReason,
    Rollout,
    Targets,
    Usage,
    validate_key_name,
)
from ckms.controller.policy import check_policy, check_usage, default_policy
from ckms.controller.rollout_plan import RolloutRequest, parse_max_failures, stage_release
from ckms.controller.sealing import Vault
from ckms.controller.targets import env_blocked, match_hosts

# DISTRIBUTABLE_STATES, TRANSITIONS and allowed_operations live in the transition table's module;
# they stay importable from here for callers that knew them here.
from ckms.controller.transitions import DISTRIBUTABLE_STATES as DISTRIBUTABLE_STATES
from ckms.controller.transitions import (
    LIVE_STATES,
    Op,
    RolloutOp,
    awaits_rollout,
    next_rollout_state,
    next_state,
    op_label,
    revoked_for,
)
from ckms.controller.transitions import TRANSITIONS as TRANSITIONS
from ckms.controller.transitions import allowed_operations as allowed_operations
from ckms.crypto import (
    ImportFormat,
    KeyType,
    allowed_formats,
    check_secret_spec,
    generate,
    import_material,
    validate_material,
)
from ckms.errors import (
    AlreadyExistsError,
    CKMSError,
    ConfigError,
    InvalidTransitionError,
    NotFoundError,
    PolicyError,
    SealedError,
    StoreError,
)
from ckms.protocol import (
    ActivateWhen,
    EventPolicy,
    Gate,
    KeyCreated,
    KeyDestroyed,
    KeyPolicyChanged,
    KeyRevoked,
    KeyRollout,
    KeyRotated,
    KeyStateChanged,
    KeyTargetsChanged,
    RolloutState,
    default_install,
)
from ckms.protocol._events import EventData
from ckms.store import (
    Clock,
    Store,
    Transaction,
    format_time,
    new_id,
    outbox,
    require_utc,
    utc_now,
)
from ckms.store import audit as audit_log

__all__ = ["CREATE_BATCH", "Lifecycle", "NewKey"]


@dataclass(frozen=True)
class NewKey:
    """One key to create: what :meth:`Lifecycle.create` takes (None: the type's default)."""

    name: str
    type: KeyType | str
    usage: Iterable[Usage | str] | None = None
    policy: Policy | None = None
    targets: Targets | None = None
    install: InstallSpec | None = None
    secret_length: int | None = None
    secret_alphabet: str | None = None


CREATE_BATCH: Final = 500
"""Keys per transaction in :meth:`Lifecycle.create_many`."""


log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REASON_LENGTH: Final = 1000

_BUILD_SLICE: Final = 100
"""Key models built between two yields to the event loop when the key view is (re)loaded."""

_CREATE_SLICE: Final = 10
"""New keys built between two yields to the event loop (each costs ~0.1 ms: rows, MACs, event).
At 25 a slice was the longest step of onboarding 100,000 keys on a busy machine (up to 15 ms of
CPU, where a yield costs a few µs)."""

_LOAD_SLICE: Final = 1000
"""Keys read per snapshot when the key view is loaded whole (the rows of 100,000 keys at once
cost hundreds of MB, and their creation alone stalled the loop)."""

_REFRESH_ALL_ABOVE: Final = 5000
"""Changed keys above which the key view is reloaded whole instead of key by key."""


_REFUSALS = (
    InvalidTransitionError,
    NotFoundError,
    AlreadyExistsError,
    PolicyError,
    ConfigError,
    SealedError,
)


# One (frozen) default policy and install spec per type and usage: onboarding 100,000 keys
# builds them once, and the keys share them (stored, cached and evented alike).
_default_policy = functools.lru_cache(maxsize=256)(default_policy)
_default_install = functools.lru_cache(maxsize=64)(default_install)


def _check_text(value: str | None, what: str, *, required: bool = False) -> str | None:
    if value is None or value == "":
        if required:
            raise ConfigError(f"{what} must not be empty")
        return None
    if not isinstance(value, str) or len(value) > MAX_REASON_LENGTH or "\x00" in value:
        raise ConfigError(f"{what} must be text of at most {MAX_REASON_LENGTH} characters")
    return value


def _t(when: datetime | None) -> str | None:
    return None if when is None else format_time(when)


def _event_policy(policy: Policy) -> EventPolicy:
    """A policy as events carry it (the activation fields only for a converging policy)."""
    dumped = policy.model_dump(mode="json")
    if policy.activate_when is not ActivateWhen.CONVERGED:
        for name in ("activate_when", "activation_deadline", "activation_threshold_pct"):
            dumped.pop(name)
    return EventPolicy.model_validate(dumped)


class Lifecycle:
    """Runs key lifecycle operations on the store, with audit and outbox, on an injected clock."""

    def __init__(self, store: Store, vault: Vault, *, clock: Clock = utc_now) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._current: tuple[int, MappingProxyType[str, KeyView]] | None = None
        self._names: dict[str, str] = {}
        """Key id → name of the keys in ``_current`` (a changed id names the entry to replace)."""
        self._refresh = asyncio.Lock()
        self._ordered: list[str] = []
        """The names in ``_current``, sorted (``key.list`` pages through them)."""
        self.outcomes: dict[tuple[str, str], int] = {}
        """Operations by (operation, outcome: ok, refused, error), e.g. ``("rotate", "ok")``."""

    # -- reads -----------------------------------------------------------------------------

    async def current_keys(self, *, fresh: bool = False) -> Mapping[str, KeyView]:
        """Every key by name, from memory, refreshed for the keys committed changes touched.

        The agent requests (sync, fetch) read every key on every request; keys change seldom.
        The store says which key ids changed since the view was filled
        (:meth:`~ckms.store.Store.changed_since`), and only those are read again: a key change
        costs that key, not a reload of every key. When the store cannot say (a commit by
        another connection, a long gap) everything is reloaded, building the models in slices
        so the event loop is never held for the whole set. ``fresh``: look for other
        replicas' commits now, not at the next poll (:meth:`~ckms.store.Store.generation`).
        """
        generation = await self._store.generation("keys", fresh=fresh)
        current = self._current
        if current is not None and current[0] == generation:
            return current[1]
        async with self._refresh:
            generation = await self._store.generation("keys")
            current = self._current
            if current is not None and current[0] == generation:
                return current[1]
            ids = None if current is None else self._store.changed_since("keys", current[0])
            if current is None or ids is None or len(ids) > _REFRESH_ALL_ABOVE:
                by_name = await self._load_all()
                ordered = list(by_name)  # read by name: already in order
            else:
                async with self._store.read() as r:
                    fresh = await _repo.key_views_by_ids(r, ids)
                # The proxy's copy() is the dict's own (0.3 ms at 100,000 keys); dict(proxy)
                # walked it key by key (14 ms, holding the loop on every key change).
                by_name = current[1].copy()
                ordered = self._ordered
                before = {self._names[i] for i in ids if i in self._names}
                if before != {k.name for k in fresh}:  # a key added or gone: names re-sorted
                    ordered = list(ordered)
                    for name in before:
                        del ordered[bisect.bisect_left(ordered, name)]
                    for key in fresh:
                        bisect.insort(ordered, key.name)
                for key_id in ids:
                    gone = self._names.pop(key_id, None)
                    if gone is not None:
                        by_name.pop(gone, None)
                for key in fresh:
                    by_name[key.name] = key
                    self._names[key.id] = key.name
            self._ordered = ordered
            self._current = (generation, MappingProxyType(by_name))
            return self._current[1]

    async def page(self, after: str | None, limit: int) -> list[KeyView]:
        """Up to ``limit`` keys named after ``after`` (from the first when None), by name.

        Served from the key view (rows already checked when read, refreshed per changed key):
        a page costs its own keys, not a read and check of them from the store each time.
        """
        await self.current_keys()
        assert self._current is not None
        # Read together (no await between): the names and the view they were sorted from.
        view, ordered = self._current[1], self._ordered
        start = 0 if after is None else bisect.bisect_right(ordered, after)
        return [view[name] for name in ordered[start : start + limit]]

    async def _load_all(self) -> dict[str, KeyView]:
        """Every key, read a slice at a time and built into view entries between yields.

        Each slice is its own snapshot: the generation was taken before the first, so a key
        committed meanwhile is read again by the next refresh (its id is among the changed).
        Slices are read one after the other, not the next while this one is built: building
        Python rows on the store's thread needs the GIL too, and taking it from the loop held
        the loop up for more than the overlap saved (measured at 50,000 keys).
        """
        by_name: dict[str, KeyView] = {}
        names: dict[str, str] = {}
        # No collection while the view grows: each full pass would walk everything built so
        # far (pauses of tens to hundreds of ms at 100,000 keys).
        with _gc.paused():
            after: str | None = None
            builder: _repo.ViewBuilder | None = None
            while True:
                async with self._store.read() as r:
                    chunk = await _repo.key_rows_after(r, after, _LOAD_SLICE)
                    builder = builder or _repo.ViewBuilder(r.row_key)
                for i, (row, versions, rollout) in enumerate(chunk, 1):
                    key = builder.key(row, versions, rollout)
                    by_name[key.name] = key
                    names[key.id] = key.name  # here, not in one pass over every key at the end
                    if i % _BUILD_SLICE == 0:
                        await asyncio.sleep(0)  # let requests run between slices
                if len(chunk) < _LOAD_SLICE:
                    break
                after = chunk[-1][0]["name"]
                await asyncio.sleep(0)
            del chunk
            self._names = names
            # The view is most of the controller's live objects and lives until the next full
            # reload. Left to the collector, every full collection would walk all of it, on
            # whichever request triggers it. Frozen, it is skipped; it holds no reference
            # cycles, so entries later replaced are still freed by their reference counts.
            _gc.freeze()
        return by_name

    async def get(self, name: str) -> Key:
        """Return a key with its versions, or raise NotFoundError."""
        async with self._store.read() as r:
            return await _repo.load_key(r, name)

    async def list_keys(self) -> list[Key]:
        """Return every key, by name."""
        async with self._store.read() as r:
            return await _repo.list_keys(r)

    async def history(self, name: str) -> list[dict[str, Any]]:
        """Return every state transition of a key's versions (time, actor, reason), oldest first."""
        async with self._store.read() as r:
            await _repo.load_key(r, name)
            return await _repo.transitions(r, name)

    async def hosts_for(self, name: str) -> list[Host]:
        """Return the enrolled, non-revoked hosts the key's targets select."""
        async with self._store.read() as r:
            key = await _repo.load_key(r, name)
            return match_hosts(key.targets, await _repo.list_hosts(r))

    # -- plumbing --------------------------------------------------------------------------

    def _now(self) -> datetime:
        return require_utc(self._clock())

    async def _guarded(
        self,
        action: str,
        name: str,
        actor: str,
        details: dict[str, Any],
        run: Callable[[datetime], Awaitable[T]],
    ) -> T:
        """Run an operation; audit a refusal (own transaction) before re-raising it.

        Every outcome is also counted in :attr:`outcomes` (the controller's metrics).
        """
        now = self._now()
        outcome = "error"
        try:
            _check_text(actor, "actor", required=True)
            result = await run(now)
            outcome = "ok"
            return result
        except _REFUSALS as exc:
            outcome = "refused"
            await self._audit_refusal(action, name, actor, details, exc, now)
            raise
        finally:
            counted = (action.removeprefix("key."), outcome)
            self.outcomes[counted] = self.outcomes.get(counted, 0) + 1

    async def _audit_refusal(
        self,
        action: str,
        name: str,
        actor: str,
        details: dict[str, Any],
        exc: CKMSError,
        now: datetime,
    ) -> None:
        shown = name if isinstance(name, str) and len(name) <= 200 else "<invalid>"
        who = actor if isinstance(actor, str) and actor else "<unknown>"
        try:
            async with self._store.write() as tx:
                await audit_log.append(
                    tx,
                    now=now,
                    actor=who[:200],
                    action=action,
                    object=f"key:{shown}",
                    outcome="refused",
                    details={**details, "error": type(exc).__name__, "message": str(exc)},
                )
        except StoreError:
            log.exception("could not audit a refused %s on %s", action, shown)

    async def _emit(
        self,
        tx: Transaction,
        *,
        now: datetime,
        actor: str,
        action: str,
        key: Key,
        event: EventData,
        details: dict[str, Any],
    ) -> None:
        """Write the outbox event and the audit record of one change, in its transaction, and
        the key's next due time as the change leaves it (the scheduler's index)."""
        changed = await _repo.load_key(tx, key.name)
        await _repo.set_next_due(tx, changed.id, next_due(changed))
        stored = await outbox.add_event(tx, partition_key=key.name, data=event, now=now)
        await audit_log.append(
            tx,
            now=now,
            actor=actor,
            action=action,
            object=f"key:{key.name}",
            details={**details, "event_id": stored.event_id, "event_seq": stored.seq},
        )

    async def _set_primary_after(
        self, tx: Transaction, key: Key, version: int, new_state: KeyState, now: datetime
    ) -> int | None:
        """Apply the primary rule after ``version`` entered ``new_state``; return the primary."""
        primary = key.primary_version
        if new_state is KeyState.ACTIVE:
            entered = key.version(version)
            if entered.superseded_at is None and (primary is None or version > primary):
                live = sorted(str(s) for s in LIVE_STATES)
                marks = ", ".join("?" * len(live))
                older = await tx.fetchall(
                    "SELECT version FROM key_versions WHERE key_id = ? AND version < ? "  # noqa: S608
                    f"AND superseded_at IS NULL AND state IN ({marks})",
                    (key.id, version, *live),
                )
                for row in older:  # one by one: each version's MAC covers superseded_at
                    await _repo.update_version(tx, key.id, int(row["version"]), superseded_at=now)
                primary = version
        elif primary == version:
            primary = None
        if primary != key.primary_version:
            await _repo.update_key(tx, key.id, now=now, primary_version=primary)
        return primary

    async def _transition(
        self,
        tx: Transaction,
        key: Key,
        version: int,
        op: Op,
        *,
        now: datetime,
        actor: str,
        reason: str | None,
        revocation: RevocationReason | None = None,
        rollout_completes: bool = False,
    ) -> Key:
        """Move one version through the table, with history, event and audit; return the new key."""
        current = key.version(version)
        target = next_state(current.state, op, key=key.name, version=version)
        changes: dict[str, Any] = {"state": target, "state_changed_at": now}
        if target is KeyState.ACTIVE and current.activated_at is None:
            changes["activated_at"] = now
        if target is KeyState.DEACTIVATED:
            changes["deactivated_at"] = now
        if target in (KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED) and op is Op.COMPROMISE:
            changes["compromised_at"] = now
        if revocation is not None:
            changes["revocation_reason"] = str(revocation)
            changes["revocation_message"] = reason
        if op is Op.DESTROY:
            # Wipe the material, keep the metadata (digest, times, reasons) for the record.
            changes["destroyed_at"] = now
            changes["sealed_material"] = None
        await _repo.update_version(tx, key.id, version, **changes)
        history_reason = str(revocation) if revocation is not None else reason
        if revocation is not None and reason:
            history_reason = f"{revocation}: {reason}"
        await _repo.insert_transition(
            tx,
            key_id=key.id,
            version=version,
            from_state=current.state,
            to_state=target,
            operation=str(op),
            now=now,
            actor=actor,
            reason=history_reason,
        )
        primary = await self._set_primary_after(tx, key, version, target, now)
        rollout = key.rollout
        if (
            rollout is not None
            and rollout.live
            and rollout.version == version
            and not rollout_completes
        ):
            # Activated by hand, revoked or destroyed: the rollout no longer decides anything.
            await self._put_rollout(
                tx,
                key,
                rollout,
                RolloutOp.CANCEL,
                now=now,
                actor=actor,
                reason=f"version {version} was {op_label(op)}d ({target})",
            )
        common: dict[str, Any] = {
            "key": key.name,
            "key_id": key.id,
            "version": version,
            "from_state": current.state,
            "to_state": target,
            "primary": primary,
        }
        event: EventData
        details: dict[str, Any] = {
            "version": version,
            "from": str(current.state),
            "to": str(target),
            "primary": primary,
            "reason": reason,
        }
        if op in (Op.REVOKE, Op.COMPROMISE):
            assert revocation is not None
            serials: tuple[str, ...] = ()
            if key.type is KeyType.TLS_CERT:
                # The hosts' certificates of this version stop being renewed (the version is
                # no longer distributable) and are listed in the event and on the CRL.
                serials = await revoke_certificates(
                    tx, now=now, reason=revocation, key_id=key.id, version=version
                )
                details["serials"] = list(serials)
            event = KeyRevoked(
                **common,
                reason=revocation,
                compromise=revocation.is_compromise,
                serials=serials,
            )
            details["revocation_reason"] = str(revocation)
        elif op is Op.DESTROY:
            event = KeyDestroyed(**common, digest=current.digest)
            details["digest_hmac"] = self._vault.identifier(current.digest)
        else:
            serials = ()
            taken_out = _CERT_REASONS.get(op)
            if key.type is KeyType.TLS_CERT and taken_out is not None:
                # Out of use, like a revocation: renewal stops (the version is no longer
                # distributable), and the certificates already out must not stay valid either.
                serials = await revoke_certificates(
                    tx, now=now, reason=taken_out, key_id=key.id, version=version
                )
                details["serials"] = list(serials)
            event = KeyStateChanged(**common, reason=reason, serials=serials)
        action = "key.revoke" if op is Op.COMPROMISE else f"key.{op}"
        await self._emit(
            tx, now=now, actor=actor, action=action, key=key, event=event, details=details
        )
        log.info(
            "key %s version %d: %s -> %s by %s", key.name, version, current.state, target, actor
        )
        return await _repo.load_key(tx, key.name)

    async def _version_op(
        self, op: Op, name: str, version: int, *, actor: str, reason: str | None
    ) -> KeyVersion:
        details = {"version": version, "reason": reason}
        action = f"key.{op}"

        async def run(now: datetime) -> KeyVersion:
            why = _check_text(reason, "reason")
            self._vault.require_unsealed(f"{op} {name}")
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                key = await self._transition(tx, key, version, op, now=now, actor=actor, reason=why)
            return key.version(version)

        return await self._guarded(action, name, actor, details, run)

    # -- create and rotate -----------------------------------------------------------------

    async def create(
        self,
        name: str,
        key_type: KeyType | str,
        *,
        actor: str,
        usage: Iterable[Usage | str] | None = None,
        policy: Policy | None = None,
        targets: Targets | None = None,
        install: InstallSpec | None = None,
        secret_length: int | None = None,
        secret_alphabet: str | None = None,
        material: bytes | None = None,
    ) -> Key:
        """Create a key with version 1 (Active, or PreActive when the policy delays activation).

        ``material``: canonical material an operator imported (:meth:`read_import`) instead of
        generated; the version is marked ``origin=imported`` and audited as ``key.import``.
        """
        imported = material is not None
        action = "key.import" if imported else "key.create"
        details: dict[str, Any] = {"type": str(key_type)}
        if imported:
            details["origin"] = "imported"
        spec = NewKey(
            name=name,
            type=key_type,
            usage=usage,
            policy=policy,
            targets=targets,
            install=install,
            secret_length=secret_length,
            secret_alphabet=secret_alphabet,
        )

        async def run(now: datetime) -> Key:
            key = self._new_key(spec, now=now, actor=actor)
            self._vault.require_unsealed(f"create key {name}")
            async with self._store.read() as r:
                if await _repo.find_key(r, name) is not None:
                    raise AlreadyExistsError(f"a key named {name!r} already exists")
            (created,) = await self._create_batch(
                [key], now=now, actor=actor, imported=None if material is None else [material]
            )
            log.info(
                "%s key %s (%s) by %s", "imported" if imported else "created", name, key.type, actor
            )
            return created

        return await self._guarded(action, name, actor, details, run)

    async def read_import(
        self,
        name: str,
        key_type: KeyType | str,
        usage: Iterable[Usage | str] | None,
        data: bytes,
        fmt: ImportFormat | str,
        *,
        actor: str,
    ) -> bytes:
        """Check an operator's file as material for a version of ``name`` and return its
        canonical encoding (:func:`ckms.crypto.import_material`, off the event loop).

        A refusal (wrong type, size, curve or usage; weak material) is audited as a refused
        ``key.import`` with the reason, which never holds the material.
        """

        async def run(now: datetime) -> bytes:
            try:
                kt = KeyType(key_type)
            except ValueError:
                raise ConfigError(f"unsupported key type {str(key_type)[:32]!r}") from None
            mask = check_usage(kt, None if usage is None else frozenset(usage))  # type: ignore[arg-type]
            return await asyncio.to_thread(
                import_material, kt, data, fmt, usage=[str(u) for u in mask]
            )

        return await self._guarded(
            "key.import", name, actor, {"type": str(key_type), "format": str(fmt)}, run
        )

    async def create_many(
        self, specs: Sequence[NewKey], *, actor: str, batch: int = CREATE_BATCH
    ) -> list[str]:
        """Create many keys at once (onboarding a team): each exactly as :meth:`create` does,
        sealed, audited and evented, but ``batch`` keys per transaction and per trip to the
        material generator, so the fsync and the thread hops are shared.

        Every spec is checked (names unique, types, usage, policy, install, not already
        existing) before anything is written; a refusal names the spec and creates nothing. A
        batch is all or nothing; the batches before a failed one stay created. Returns the
        names created, in order (not their models: onboarding 100,000 keys must not hold them).
        """
        names = [s.name for s in specs]
        details: dict[str, Any] = {"keys": len(specs)}
        shown = names[0] if len(names) == 1 else f"{len(names)} keys"

        async def run(now: datetime) -> list[str]:
            if not specs:
                return []
            # Checked whole first (a refusal creates nothing), but the models are not kept:
            # 100,000 of them alive at once would make each full garbage collection (which
            # walks every live object, holding the loop) longer than the loop may stall.
            # (A request's worth, one batch, is kept: checking it twice would cost for nothing.)
            seen: set[str] = set()
            checked: list[Key] = []
            with _gc.paused():  # a collection would walk the models checked so far
                for i, spec in enumerate(specs):
                    key = self._new_numbered(i, spec, now=now, actor=actor, seen=seen)
                    if len(specs) <= batch:
                        checked.append(key)
                    if i % _BUILD_SLICE == _BUILD_SLICE - 1:
                        await asyncio.sleep(0)  # checking 100,000 specs must not hold the loop
            del seen
            self._vault.require_unsealed(f"create {shown}")
            async with self._store.read() as r:
                existing = await _repo.existing_names(r, names)
            if existing:
                raise AlreadyExistsError(
                    f"{len(existing)} of these keys already exist: {', '.join(existing[:5])}"
                    + (" ..." if len(existing) > 5 else "")
                )
            created: list[str] = []
            for start in range(0, len(specs), batch):
                chunk: list[Key] = list(checked)  # one batch only: the models checked above
                if not chunk:
                    for i, spec in enumerate(specs[start : start + batch], start):
                        chunk.append(self._new_numbered(i, spec, now=now, actor=actor))
                        if i % _CREATE_SLICE == _CREATE_SLICE - 1:
                            await asyncio.sleep(0)
                created += [k.name for k in await self._create_batch(chunk, now=now, actor=actor)]
                del chunk
            log.info("created %d keys by %s", len(created), actor)
            return created

        return await self._guarded("key.create", shown, actor, details, run)

    def _new_numbered(
        self, i: int, spec: NewKey, *, now: datetime, actor: str, seen: set[str] | None = None
    ) -> Key:
        """:meth:`_new_key` for the ``i``-th spec of a batch, errors naming it; a name already
        in ``seen`` is refused, and added otherwise."""
        try:
            key = self._new_key(spec, now=now, actor=actor)
        except (ConfigError, PolicyError) as exc:
            raise type(exc)(f"key {i + 1} ({spec.name!r}): {exc}") from None
        if seen is not None:
            if key.name in seen:
                raise ConfigError(f"key {i + 1}: {key.name!r} is named twice")
            seen.add(key.name)
        return key

    def _new_key(self, spec: NewKey, *, now: datetime, actor: str) -> Key:
        """The checked model of a key to create (ConfigError/PolicyError naming what is wrong)."""
        validate_key_name(spec.name)
        try:
            kt = KeyType(spec.type)
        except ValueError:
            raise ConfigError(f"unsupported key type {spec.type!r}") from None
        mask = check_usage(kt, None if spec.usage is None else frozenset(spec.usage))  # type: ignore[arg-type]
        pol = spec.policy if spec.policy is not None else _default_policy(kt, mask)
        check_policy(kt, mask, pol)
        install = spec.install if spec.install is not None else _default_install(kt)
        _check_install(kt, install)
        if kt is not KeyType.SECRET and (
            spec.secret_length is not None or spec.secret_alphabet is not None
        ):
            raise ConfigError("secret_length and secret_alphabet apply only to type 'secret'")
        if kt is KeyType.SECRET:
            check_secret_spec(spec.secret_length, spec.secret_alphabet)  # before any write
        return Key(
            id=new_id(),
            name=spec.name,
            type=kt,
            usage=mask,
            policy=pol,
            targets=spec.targets if spec.targets is not None else Targets(),
            install=install,
            secret_length=spec.secret_length,
            secret_alphabet=spec.secret_alphabet,
            created_at=now,
            created_by=actor,
            updated_at=now,
        )

    async def _create_batch(
        self,
        keys: Sequence[Key],
        *,
        now: datetime,
        actor: str,
        imported: Sequence[bytes] | None = None,
    ) -> list[Key]:
        """Store new keys, each with version 1, its history, event and audit record, in one
        transaction and a handful of statements; return them as stored.

        Material is generated and sealed in a worker thread (RSA takes hundreds of ms) and
        never reaches the event loop; the rows are built between yields to the loop.
        ``imported``: each key's canonical material an operator brought, checked again for its
        type and sealed instead (its version ``origin=imported``, audited as ``key.import``).
        """
        sealed = await asyncio.to_thread(self._generate_sealed, keys, imported)
        # From here to the commit (a few hundred ms for a request's worth of keys) no garbage
        # collection: each full one would walk every row, model and event built so far while
        # holding the loop (stalls of 35 ms on an idle machine, hundreds on a busy one). They
        # hold no reference cycles; once stored they are freed by their reference counts, and
        # the next collection finds little left to walk. (Material generation, which can take
        # seconds for RSA keys, stays outside the pause.)
        with _gc.paused():
            return await self._store_batch(keys, sealed, now=now, actor=actor, imported=imported)

    async def _store_batch(
        self,
        keys: Sequence[Key],
        sealed: list[tuple[str, bytes]],
        *,
        now: datetime,
        actor: str,
        imported: Sequence[bytes] | None,
    ) -> list[Key]:
        """The rows, events and audit records of :meth:`_create_batch`'s keys, built between
        yields to the loop, then written in one transaction."""
        origin: Origin = "generated" if imported is None else "imported"
        action = "key.create" if imported is None else "key.import"
        delay_of: dict[Policy, tuple[timedelta, bool]] = {}
        event_policy: dict[Policy, EventPolicy] = {}
        rows = _repo.KeyInserts(self._store.row_key)
        stored: list[Key] = []
        events: list[outbox.Prepared] = []
        details: list[dict[str, Any]] = []
        for i, (key, (digest, material)) in enumerate(zip(keys, sealed, strict=True), 1):
            if key.policy not in delay_of:
                delay = key.policy.activation_delay
                delay_of[key.policy] = (delay, delay <= timedelta(0))
                event_policy[key.policy] = _event_policy(key.policy)
            delay, active = delay_of[key.policy]
            state = KeyState.ACTIVE if active else KeyState.PRE_ACTIVE
            first = KeyVersion(
                key=key.name,
                version=1,
                state=state,
                digest=digest,
                has_material=True,
                created_at=now,
                created_by=actor,
                state_changed_at=now,
                activation_at=now + delay,
                activated_at=now if active else None,
                origin=origin,
            )
            new = key.model_copy(
                update={"primary_version": 1 if active else None, "versions": (first,)}
            )
            stored.append(new)
            rows.add(
                _repo.NewKeyRows(
                    new,
                    material,
                    next_due(new),
                    operation="create" if imported is None else "import",
                )
            )
            event = KeyCreated(
                key=key.name,
                key_id=key.id,
                type=str(key.type),
                usage=tuple(key.usage_list),
                version=1,
                state=state,
                digest=digest,
                activation_at=_t(first.activation_at),
                primary=new.primary_version,
                policy=event_policy[key.policy],
                targets=key.targets,
                install=key.install,
            )
            events.append(outbox.prepare(key.name, event))
            details.append(
                {
                    "origin": origin,
                    "type": str(key.type),
                    "usage": key.usage_list,
                    "version": 1,
                    "state": str(state),
                    "digest_hmac": self._vault.identifier(digest),
                    "targets": key.targets.describe(),
                }
            )
            if i % _CREATE_SLICE == 0:
                await asyncio.sleep(0)
        del sealed
        names = [k.name for k in keys]
        async with self._store.write() as tx:
            existing = await _repo.existing_names(tx, names)
            if existing:
                raise AlreadyExistsError(f"a key named {existing[0]!r} already exists")
            guarded = [k.targets for k in keys if k.targets.hosts]
            if guarded:
                hosts = await _repo.list_hosts(tx)
                for targets in guarded:
                    self._check_env_guard(targets, hosts)
            await _repo.insert_new_keys(tx, rows)
            stored_events = await outbox.add_events(tx, events, now=now)
            await audit_log.append_many(
                tx,
                [
                    audit_log.Entry(
                        actor=actor,
                        action=action,
                        object=f"key:{name}",
                        details={**detail, "event_id": event_id, "event_seq": seq},
                    )
                    for name, detail, (seq, event_id) in zip(
                        names, details, stored_events, strict=True
                    )
                ],
                now=now,
            )
        return stored

    def _generate_sealed(
        self, keys: Sequence[Key], imported: Sequence[bytes] | None = None
    ) -> list[tuple[str, bytes]]:
        """(digest, sealed material) of new material for each of ``keys`` (in a worker thread:
        the material itself never leaves this function), or of the ``imported`` material,
        each checked again (the full check, RSA included) for its key's type."""
        out: list[tuple[str, bytes]] = []
        for i, key in enumerate(keys):
            if imported is None:
                material = generate(
                    key.type, length=key.secret_length, alphabet=key.secret_alphabet
                )
            else:
                material = imported[i]
                try:
                    validate_material(key.type, material)
                except Exception:
                    raise ConfigError(f"imported material is not a valid {key.type} key") from None
            out.append(
                (
                    self._vault.digest(material),
                    self._vault.seal_material(key.name, 1, str(key.type), key.usage_list, material),
                )
            )
            del material
        return out

    async def rotate(
        self,
        name: str,
        *,
        actor: str,
        reason: str | None = None,
        material: bytes | None = None,
        activate_when: ActivateWhen | str | None = None,
        rollout: RolloutRequest | None = None,
    ) -> KeyVersion:
        """Add a version: Active and primary now, PreActive until the activation delay ends, or
        PreActive until its rollout completes (``activate_when`` converged, the policy's
        default when None, or ``rollout`` stages): see :meth:`move_rollout`.

        The new version's material is generated, whatever the origin of the ones before,
        unless ``material`` (canonical, from :meth:`read_import`) gives it: then it is
        ``origin=imported``.
        """
        imported = material is not None
        details: dict[str, Any] = {"reason": reason}
        if activate_when is not None:
            details["activate_when"] = str(activate_when)
        if rollout is not None:
            details["stages"] = list(rollout.stages)
            details["gate"] = str(rollout.gate)

        async def run(now: datetime) -> KeyVersion:
            why = _check_text(reason, "reason")
            try:
                when = None if activate_when is None else ActivateWhen(activate_when)
            except ValueError:
                raise ConfigError(
                    f"unknown activation {activate_when!r}; use one of "
                    f"{', '.join(a.value for a in ActivateWhen)}"
                ) from None
            if when is ActivateWhen.DELAY and rollout is not None:
                raise ConfigError("stages activate when the last stage converges, not on a delay")
            self._vault.require_unsealed(f"rotate {name}")
            async with self._store.read() as r:
                before = await _repo.load_key(r, name)
            plan = rollout
            if plan is None and (when or before.policy.activate_when) is ActivateWhen.CONVERGED:
                plan = RolloutRequest()
            if plan is not None:
                _check_rollout(before, plan)
            if material is None:
                fresh = await _generate(before)
            else:
                fresh = await _checked_import(before.type, material)
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                if plan is not None:
                    _check_rollout(key, plan)
                version, primary = await self._add_version(
                    tx,
                    key,
                    fresh,
                    now=now,
                    actor=actor,
                    operation="rotate",
                    reason=why,
                    imported=imported,
                    held=plan is not None,
                )
                event = KeyRotated(
                    key=name,
                    key_id=key.id,
                    type=str(key.type),
                    version=version.version,
                    state=version.state,
                    digest=version.digest,
                    activation_at=_t(version.activation_at),
                    primary=primary,
                    previous_primary=key.primary_version,
                    targets=key.targets,
                    install=key.install,
                )
                del fresh
                await self._emit(
                    tx,
                    now=now,
                    actor=actor,
                    action="key.rotate",
                    key=key,
                    event=event,
                    details={
                        "version": version.version,
                        "state": str(version.state),
                        "primary": primary,
                        "previous_primary": key.primary_version,
                        "digest_hmac": self._vault.identifier(version.digest),
                        "reason": why,
                        "origin": version.origin,
                        "activation": "rollout" if plan is not None else "delay",
                    },
                )
                if plan is not None:
                    await self._start_rollout(tx, key, version.version, plan, now=now, actor=actor)
                after = await _repo.load_key(tx, name)
            log.info(
                "rotated key %s to version %d (%s) by %s",
                name,
                version.version,
                version.state,
                actor,
            )
            return after.version(version.version)

        return await self._guarded("key.rotate", name, actor, details, run)

    async def _add_version(
        self,
        tx: Transaction,
        key: Key,
        material: bytes,
        *,
        now: datetime,
        actor: str,
        operation: str,
        reason: str | None,
        imported: bool = False,
        held: bool = False,
    ) -> tuple[KeyVersion, int | None]:
        """The one new-version path of create and rotate: seal, store, record, apply primary.

        The version is Active (and primary) now, PreActive until the policy's activation delay
        ends, or (``held``) PreActive with no activation time: its rollout activates it
        (:func:`~ckms.controller.transitions.awaits_rollout`). Returns the version and the
        key's primary afterwards.
        """
        number = key.latest_version + 1
        delay = key.policy.activation_delay
        active = delay <= timedelta(0) and not held
        state = KeyState.ACTIVE if active else KeyState.PRE_ACTIVE
        version = KeyVersion(
            key=key.name,
            version=number,
            state=state,
            digest=self._vault.digest(material),
            has_material=True,
            created_at=now,
            created_by=actor,
            state_changed_at=now,
            activation_at=None if held else now + delay,
            activated_at=now if active else None,
            origin="imported" if imported else "generated",
        )
        sealed = self._vault.seal_material(
            key.name, number, str(key.type), key.usage_list, material
        )
        await _repo.insert_version(tx, key.id, version, sealed)
        await _repo.insert_transition(
            tx,
            key_id=key.id,
            version=number,
            from_state=None,
            to_state=state,
            operation=operation,
            now=now,
            actor=actor,
            reason=reason,
        )
        with_new = await _repo.load_key(tx, key.name)
        primary = await self._set_primary_after(tx, with_new, number, state, now)
        return version, primary

    # -- rollouts --------------------------------------------------------------------------

    async def _start_rollout(
        self,
        tx: Transaction,
        key: Key,
        version: int,
        plan: RolloutRequest,
        *,
        now: datetime,
        actor: str,
    ) -> Rollout:
        """Store the rollout of a just-added held version with its first stage out."""
        targeted = match_hosts(key.targets, await _repo.list_hosts(tx))
        policy = key.policy
        rollout = Rollout(
            key_id=key.id,
            version=version,
            stages=plan.stages,
            gate=plan.gate,
            spread=plan.spread,
            stage=1,
            state=RolloutState.RUNNING,
            released=stage_release(key, version, plan.stages, 1, targeted, spread=plan.spread),
            threshold_pct=plan.threshold_pct or policy.activation_threshold_pct,
            max_failures=plan.max_failures,
            started_at=now,
            started_by=actor,
            stage_started_at=now,
            deadline_at=now + (plan.deadline or policy.activation_deadline),
            updated_at=now,
        )
        await self._write_rollout(tx, key, rollout, "rollout.start", now=now, actor=actor)
        return rollout

    async def _write_rollout(
        self,
        tx: Transaction,
        key: Key,
        rollout: Rollout,
        action: str,
        *,
        now: datetime,
        actor: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Store a rollout row with its ``key.rollout`` event and audit record."""
        await _repo.put_rollout(tx, rollout)
        released = None if rollout.released is None else len(rollout.released)
        event = KeyRollout(
            key=key.name,
            key_id=key.id,
            version=rollout.version,
            state=rollout.state,
            stage=rollout.stage,
            stages=rollout.stages,
            gate=rollout.gate,
            released=released,
            targets=key.targets,
            reason=None if rollout.reason is None else rollout.reason[:1024],
        )
        details: dict[str, Any] = {
            "version": rollout.version,
            "state": str(rollout.state),
            "stage": rollout.stage,
            "stages": list(rollout.stages),
            "gate": str(rollout.gate),
            "spread": rollout.spread,
            "released": None if rollout.released is None else sorted(rollout.released),
            "deadline_at": format_time(rollout.deadline_at),
            "reason": rollout.reason,
            **(extra or {}),
        }
        await self._emit(
            tx, now=now, actor=actor, action=action, key=key, event=event, details=details
        )

    async def _put_rollout(
        self,
        tx: Transaction,
        key: Key,
        rollout: Rollout,
        op: RolloutOp,
        *,
        now: datetime,
        actor: str,
        reason: str | None,
        deadline: timedelta | None = None,
        extra: dict[str, Any] | None = None,
        max_failures: str | None = None,
    ) -> Rollout:
        """Move ``rollout`` by ``op`` (the table of :mod:`~ckms.controller.transitions`)."""
        state = next_rollout_state(rollout.state, op, key=key.name)
        changes: dict[str, Any] = {"state": state, "updated_at": now, "reason": reason}
        if op in (RolloutOp.ADVANCE, RolloutOp.RESUME, RolloutOp.ABORT):
            targeted = match_hosts(key.targets, await _repo.list_hosts(tx))
            already = rollout.released or frozenset()
            if op is RolloutOp.ADVANCE:
                stage = rollout.stage + 1
                changes["stage"] = stage
                changes["released"] = stage_release(
                    key,
                    rollout.version,
                    rollout.stages,
                    stage,
                    targeted,
                    spread=rollout.spread,
                    before=already,
                )
                changes["stage_started_at"] = now
            elif op is RolloutOp.RESUME:
                if rollout.state is RolloutState.ROLLED_BACK:
                    changes["released"] = stage_release(
                        key,
                        rollout.version,
                        rollout.stages,
                        rollout.stage,
                        targeted,
                        spread=rollout.spread,
                        before=already,
                    )
                changes["stage_started_at"] = now
                changes["deadline_at"] = now + (deadline or key.policy.activation_deadline)
                if max_failures is not None:
                    changes["max_failures"] = max_failures
            else:  # abort: the stage in progress is withdrawn, the ones before it stay out
                if rollout.stage == 1:
                    changes["released"] = frozenset()
                else:
                    before = (
                        stage_release(
                            key,
                            rollout.version,
                            rollout.stages,
                            rollout.stage - 1,
                            targeted,
                            spread=rollout.spread,
                        )
                        or frozenset()
                    )
                    changes["released"] = (
                        before if rollout.released is None else before & rollout.released
                    )
                had = {h.id for h in targeted} if rollout.released is None else rollout.released
                withdrawn = sorted(had - changes["released"])
                # What the withdrawn hosts acknowledged no longer speaks for them: a resumed
                # stage waits for their new 'installed' (their removal ack comes meanwhile).
                await tx.executemany(
                    "DELETE FROM fleet_state WHERE host_id = ? AND key_id = ? AND version = ? "
                    "AND status = 'installed'",
                    [(h, key.id, rollout.version) for h in withdrawn],
                )
        moved = rollout.model_copy(update=changes)
        await self._write_rollout(
            tx, key, moved, f"rollout.{op}", now=now, actor=actor, extra=extra
        )
        return moved

    async def move_rollout(
        self,
        name: str,
        op: RolloutOp,
        *,
        actor: str,
        reason: str | None = None,
        expect: tuple[int, int, datetime] | None = None,
        deadline: timedelta | None = None,
        extra: dict[str, Any] | None = None,
        of_version: int | None = None,
        confirm: Callable[[Transaction, Key, Rollout], Awaitable[None]] | None = None,
        max_failures: str | None = None,
    ) -> Rollout:
        """Move a key's rollout by ``op`` in one transaction with its event and audit record.

        ``confirm`` runs inside that transaction before the move (the driver judges the gate
        there again, from the rows as they are when the move commits) and may refuse it.

        ``complete`` also activates the version (the one signed ``key.state_changed`` every
        host applies); ``expect`` (version, stage, stage start) refuses the move when the rollout
        moved meanwhile (the driver judged a stage as it was before a resume or an abort);
        ``of_version`` refuses it unless the rollout is of that version (an approved request
        moves the rollout it was asked for, not a later one).
        Refusals are audited like every lifecycle refusal.
        """
        details: dict[str, Any] = {"op": str(op), "reason": reason}
        budget = parse_max_failures(max_failures)
        if budget is not None:
            details["max_failures"] = budget
            if op is not RolloutOp.RESUME:
                raise ConfigError("a failure budget is set when a rollout starts or resumes")

        async def run(now: datetime) -> Rollout:
            why = _check_text(reason, "reason")
            self._vault.require_unsealed(f"{op} the rollout of {name}")
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                rollout = key.rollout
                if rollout is None:
                    raise NotFoundError(f"key {name} has no rollout")
                if of_version is not None and of_version != rollout.version:
                    raise InvalidTransitionError(
                        f"cannot {op} the rollout of {name} version {of_version}: the rollout "
                        f"now is of version {rollout.version}"
                    )
                now_at = (rollout.version, rollout.stage, rollout.stage_started_at)
                if expect is not None and expect != now_at:
                    raise InvalidTransitionError(
                        f"the rollout of {name} moved meanwhile (now v{rollout.version} stage "
                        f"{rollout.stage}, {rollout.state})"
                    )
                if confirm is not None:
                    await confirm(tx, key, rollout)
                version = key.version(rollout.version)
                if rollout.live and not awaits_rollout(version.state, version.activation_at):
                    raise InvalidTransitionError(
                        f"cannot {op} the rollout of {name}: version {version.version} is "
                        f"{version.state}"
                    )
                if op is RolloutOp.COMPLETE:
                    if not rollout.final_stage:
                        raise InvalidTransitionError(
                            f"cannot complete the rollout of {name}: stage {rollout.stage} of "
                            f"{len(rollout.stages)} is out"
                        )
                    moved = await self._put_rollout(
                        tx, key, rollout, op, now=now, actor=actor, reason=why, extra=extra
                    )
                    key = await _repo.load_key(tx, name)
                    await self._transition(
                        tx,
                        key,
                        rollout.version,
                        Op.ACTIVATE,
                        now=now,
                        actor=actor,
                        reason=why,
                        rollout_completes=True,
                    )
                    return moved
                if op is RolloutOp.ADVANCE and rollout.final_stage:
                    raise InvalidTransitionError(
                        f"cannot advance the rollout of {name}: its last stage is out"
                    )
                return await self._put_rollout(
                    tx,
                    key,
                    rollout,
                    op,
                    now=now,
                    actor=actor,
                    reason=why,
                    deadline=deadline,
                    extra=extra,
                    max_failures=budget,
                )

        return await self._guarded(f"rollout.{op}", name, actor, details, run)

    # -- per-version transitions -----------------------------------------------------------

    async def activate(
        self, name: str, version: int, *, actor: str, reason: str | None = None
    ) -> KeyVersion:
        """PreActive → Active (by hand, or by the scheduler when the activation time is reached)."""
        return await self._version_op(Op.ACTIVATE, name, version, actor=actor, reason=reason)

    async def suspend(
        self, name: str, version: int, *, actor: str, reason: str | None = None
    ) -> KeyVersion:
        """Active → Suspended (temporarily unusable; a suspended primary leaves no primary)."""
        return await self._version_op(Op.SUSPEND, name, version, actor=actor, reason=reason)

    async def resume(
        self, name: str, version: int, *, actor: str, reason: str | None = None
    ) -> KeyVersion:
        """Suspended → Active."""
        return await self._version_op(Op.RESUME, name, version, actor=actor, reason=reason)

    async def deactivate(
        self, name: str, version: int, *, actor: str, reason: str | None = "superseded past grace"
    ) -> KeyVersion:
        """Active/Suspended → Deactivated (grace or cryptoperiod over; the scheduler's op)."""
        return await self._version_op(Op.DEACTIVATE, name, version, actor=actor, reason=reason)

    async def destroy(
        self, name: str, version: int, *, actor: str, reason: str | None = None
    ) -> KeyVersion:
        """Wipe a version's material, keep its metadata (PreActive/Deactivated/Compromised only)."""
        return await self._version_op(Op.DESTROY, name, version, actor=actor, reason=reason)

    async def revoke(
        self,
        name: str,
        reason: RevocationReason | str,
        *,
        actor: str,
        version: int | None = None,
        message: str | None = None,
    ) -> list[KeyVersion]:
        """Revoke one version, or with ``version=None`` every version the reason applies to.

        keyCompromise / cACompromise → Compromised (Destroyed → DestroyedCompromised); any other
        reason → Deactivated. Revoking the whole key skips versions already out of use for that
        reason, and is refused if a version cannot take it (a PreActive version cannot be
        deactivated: destroy it or revoke it as compromised).
        """
        details = {"version": version, "revocation_reason": str(reason), "reason": message}

        async def run(now: datetime) -> list[KeyVersion]:
            try:
                code = RevocationReason(reason)
            except ValueError:
                raise ConfigError(
                    f"unknown revocation reason {reason!r}; use one of "
                    f"{', '.join(r.value for r in RevocationReason)}"
                ) from None
            why = _check_text(message, "message")
            op = Op.COMPROMISE if code.is_compromise else Op.REVOKE
            self._vault.require_unsealed(f"revoke {name}")
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                if version is not None:
                    numbers = [version]
                    key.version(version)
                else:
                    numbers = _whole_key_revocation(key, op)
                for number in numbers:
                    key = await self._transition(
                        tx, key, number, op, now=now, actor=actor, reason=why, revocation=code
                    )
            return [key.version(n) for n in numbers]

        return await self._guarded("key.revoke", name, actor, details, run)

    # -- policy and targets ----------------------------------------------------------------

    async def set_policy(self, name: str, policy: Policy, *, actor: str) -> Key:
        """Replace a key's policy (checked against the SP 800-57 limits of its purpose)."""

        async def run(now: datetime) -> Key:
            self._vault.require_unsealed(f"change the policy of {name}")
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                check_policy(key.type, key.usage, policy)
                await _repo.update_key(tx, key.id, now=now, policy=policy)
                dumped = policy.model_dump(mode="json")
                await self._emit(
                    tx,
                    now=now,
                    actor=actor,
                    action="key.set_policy",
                    key=key,
                    event=KeyPolicyChanged(key=name, key_id=key.id, policy=_event_policy(policy)),
                    details={"policy": dumped, "previous": key.policy.model_dump(mode="json")},
                )
                return await _repo.load_key(tx, name)

        return await self._guarded("key.set_policy", name, actor, {}, run)

    async def set_targets(
        self,
        name: str,
        targets: Targets,
        *,
        actor: str,
        install: InstallSpec | None = None,
    ) -> Key:
        """Replace a key's targets (and optionally its install spec).

        The key's environment is pinned for life: targets naming another environment are
        refused, and targets naming none keep the key's (so ``role=web`` on a prod key means
        prod hosts with that role).
        """

        async def run(now: datetime) -> Key:
            self._vault.require_unsealed(f"change the targets of {name}")
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                pinned = pin_environment(name, key.targets, targets)
                spec = install if install is not None else key.install
                _check_install(key.type, spec)
                await self._check_env_guard_in(tx, pinned)
                await _repo.update_key(tx, key.id, now=now, targets=pinned, install=spec)
                details: dict[str, Any] = {
                    "targets": pinned.describe(),
                    "env": pinned.effective_env,
                    "previous": key.targets.describe(),
                    "install_changed": spec != key.install,
                }
                after = await _repo.load_key(tx, name)
                if key.type is KeyType.TLS_CERT:
                    details["serials"] = list(await _revoke_unentitled(tx, key, after, now))
                await self._emit(
                    tx,
                    now=now,
                    actor=actor,
                    action="key.set_targets",
                    key=key,
                    event=KeyTargetsChanged(key=name, key_id=key.id, targets=pinned, install=spec),
                    details=details,
                )
                return after

        return await self._guarded(
            "key.set_targets", name, actor, {"targets": targets.describe()}, run
        )

    async def _check_env_guard_in(self, tx: Transaction, targets: Targets) -> None:
        """Refuse targets that list, by id, a known host of another environment."""
        if targets.hosts:
            self._check_env_guard(targets, await _repo.list_hosts(tx))

    @staticmethod
    def _check_env_guard(targets: Targets, hosts: Sequence[Host]) -> None:
        """Refuse targets that list, by id, one of ``hosts`` of another environment."""
        blocked = env_blocked(targets, hosts)
        if blocked:
            raise PolicyError(
                f"hosts {', '.join(h.id for h in blocked)} are not labelled "
                f"env={targets.effective_env}; a key of one environment never goes to another"
            )


def pin_environment(name: str, current: Targets, new: Targets) -> Targets:
    """``new`` with the key's environment kept; PolicyError if it names another one.

    A key created for ``env=prod`` never reaches hosts of another environment, however its
    targets are rewritten later (docs/architecture.md §5): the guard compares the new targets
    with the key's environment, not only with themselves.
    """
    env = current.effective_env
    if env is None:
        return new
    wanted = new.effective_env
    other = {s["env"] for s in new.selectors if "env" in s and s["env"] != env}
    if (wanted is not None and wanted != env) or other or (new.env not in (None, env)):
        shown = wanted or ", ".join(sorted(other)) or str(new.env)
        raise PolicyError(
            f"{name} belongs to env={env}; it cannot be retargeted to env={shown} (a key's "
            "environment is fixed when it is created: create a key for the other environment)"
        )
    if wanted == env:
        return new
    try:
        return Targets(selectors=new.selectors, hosts=new.hosts, env=env)
    except ValueError as exc:
        raise PolicyError(f"invalid targets for {name}: {exc}") from None


def _check_install(key_type: KeyType, spec: InstallSpec) -> None:
    """Refuse an install format that cannot carry the key type."""
    allowed = allowed_formats(key_type)
    if spec.format not in allowed:
        raise ConfigError(
            f"install format '{spec.format}' is not available for key type '{key_type}' "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


_CERT_REASONS: Final = {
    Op.SUSPEND: RevocationReason.CESSATION_OF_OPERATION,
    Op.DEACTIVATE: RevocationReason.SUPERSEDED,
}
"""The moves out of use (other than revocation) that revoke a ``tls-cert`` version's live
certificates, with the RFC 5280 reason each is listed under (a suspension is not a hold: the
certificates do not come back; a resumed version is certified afresh)."""


async def _revoke_unentitled(
    tx: Transaction, before: Key, after: Key, now: datetime
) -> tuple[str, ...]:
    """Revoke the certificates of ``before`` whose host ``after`` (new targets or name
    templates) no longer entitles to the names it holds; the agents then re-issue or remove."""
    holders = await tx.fetchall(
        "SELECT DISTINCT host_id FROM certificates WHERE key_id = ?", (before.id,)
    )
    hosts = {h.id: h for h in await _repo.hosts_by_ids(tx, [str(r["host_id"]) for r in holders])}

    def keep(host_id: str, key_id: str) -> bool:
        host = hosts.get(host_id)
        if host is None:
            return False
        names = entitled_names(after, host)
        return names is not None and names == entitled_names(before, host)

    return await revoke_certificates(
        tx, now=now, reason=RevocationReason.AFFILIATION_CHANGED, key_id=before.id, keep=keep
    )


async def _checked_import(key_type: KeyType, material: bytes) -> bytes:
    """Imported canonical material, checked again for the key's own type (off the loop)."""
    try:
        await asyncio.to_thread(validate_material, key_type, material)
    except Exception:
        raise ConfigError(f"imported material is not a valid {key_type} key") from None
    return material


def _check_rollout(key: Key, plan: RolloutRequest) -> None:
    """Refuse a rollout the key cannot have (a health gate without a health check)."""
    if plan.gate is Gate.HEALTHY and key.install.health is None:
        raise ConfigError(
            f"gate healthy needs a health check: {key.name}'s install spec names none "
            "(set one with ckms key targets --health NAME, or use --gate installed)"
        )
    if key.rollout is not None and key.rollout.live:
        raise InvalidTransitionError(
            f"{key.name} version {key.rollout.version} is still rolling out "
            f"({key.rollout.state}, stage {key.rollout.stage} of {len(key.rollout.stages)}); "
            "resume or abort it first"
        )



async def _generate(key: Key) -> bytes:
    """New material for ``key``; RSA takes hundreds of ms, so off the event loop and the writer."""
    return await asyncio.to_thread(
        generate, key.type, length=key.secret_length, alphabet=key.secret_alphabet
    )


def _whole_key_revocation(key: Key, op: Op) -> list[int]:
    """Pick the versions a whole-key revocation applies to, or raise InvalidTransitionError."""
    numbers: list[int] = []
    for v in key.versions:
        if revoked_for(v.state, op):
            continue
        next_state(v.state, op, key=key.name, version=v.version)  # refuses e.g. PreActive
        numbers.append(v.version)
    if not numbers:
        states = ", ".join(sorted({str(v.state) for v in key.versions})) or "no versions"
        raise InvalidTransitionError(
            f"cannot {op_label(op)} {key.name}: no version can be revoked (states: {states})"
        )
    return numbers
