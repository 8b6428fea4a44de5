"""The key lifecycle: create, rotate, activate, suspend, resume, deactivate, revoke, destroy.

Per-version states follow DESIGN §3 exactly (:data:`TRANSITIONS`); any other transition raises
:class:`~ckms.errors.InvalidTransitionError` naming the operation and the current state.

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

Outbox events (``data`` never holds material; times are RFC 3339 UTC):

- ``key.created``: key, key_id, type, usage, version, state, digest, activation_at, primary,
  policy, targets, install
- ``key.rotated``: key, key_id, version, state, digest, activation_at, primary, previous_primary
- ``key.state_changed`` (activate, suspend, resume, deactivate): key, key_id, version, from, to,
  primary, reason
- ``key.revoked``: key, key_id, version, from, to, reason (KMIP code), compromise, primary
- ``key.destroyed``: key, key_id, version, from, to, digest, primary
- ``key.policy_changed``: key, key_id, policy
- ``key.targets_changed``: key, key_id, targets, install
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, TypeVar

from ckms.controller import _repo
from ckms.controller.models import (
    Host,
    InstallSpec,
    Key,
    KeyState,
    KeyVersion,
    Policy,
    RevocationReason,
    Targets,
    Usage,
    validate_key_name,
)
from ckms.controller.policy import check_policy, check_usage, default_policy
from ckms.controller.sealing import Vault
from ckms.controller.targets import env_blocked, match_hosts
from ckms.crypto import InstallFormat, KeyType, allowed_formats, generate, material_digest
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
from ckms.store import Clock, Store, Transaction, format_time, outbox, require_utc, utc_now
from ckms.store import audit as audit_log

__all__ = [
    "DISTRIBUTABLE_STATES",
    "TRANSITIONS",
    "Lifecycle",
    "Op",
    "allowed_operations",
    "default_install",
    "next_state",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REASON_LENGTH: Final = 1000


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
"""DESIGN §3, per version: (state, operation) → new state. Everything not listed is refused."""

DISTRIBUTABLE_STATES: Final = frozenset({KeyState.PRE_ACTIVE, KeyState.ACTIVE})
"""States whose material agents may fetch and keep installed: PreActive versions are
pre-distributed so activation only flips the primary; every other state is removed from hosts."""

_OP_LABEL: Final = {Op.REVOKE: "revoke", Op.COMPROMISE: "revoke as compromised"}
_HINT: Final = {
    (_S.ACTIVE, Op.DESTROY): "; deactivate or revoke it first",
    (_S.SUSPENDED, Op.DESTROY): "; deactivate or revoke it first",
}
_EVENT: Final = {
    Op.ACTIVATE: "key.state_changed",
    Op.SUSPEND: "key.state_changed",
    Op.RESUME: "key.state_changed",
    Op.DEACTIVATE: "key.state_changed",
    Op.REVOKE: "key.revoked",
    Op.COMPROMISE: "key.revoked",
    Op.DESTROY: "key.destroyed",
}
_REFUSALS = (
    InvalidTransitionError,
    NotFoundError,
    AlreadyExistsError,
    PolicyError,
    ConfigError,
    SealedError,
)


def next_state(
    state: KeyState, op: Op, *, key: str = "key", version: int | None = None
) -> KeyState:
    """Return the state ``op`` leads to from ``state``, or raise InvalidTransitionError."""
    try:
        return TRANSITIONS[(state, op)]
    except KeyError:
        what = f"{key} version {version}" if version is not None else key
        label = _OP_LABEL.get(op, str(op))
        raise InvalidTransitionError(
            f"cannot {label} {what}: it is {state}{_HINT.get((state, op), '')}"
        ) from None


def allowed_operations(state: KeyState) -> frozenset[Op]:
    """Return the operations the table allows from ``state``."""
    return frozenset(op for (s, op) in TRANSITIONS if s is state)


def default_install(key_type: KeyType) -> InstallSpec:
    """Return the install spec a key gets when create names none (one file per version)."""
    fmt = InstallFormat.PEM if InstallFormat.PEM in allowed_formats(key_type) else InstallFormat.RAW
    ext = "pem" if fmt is InstallFormat.PEM else "key"
    return InstallSpec(
        path=f"/var/lib/ckms/keys/{{team}}/{{purpose}}/v{{version}}.{ext}", format=fmt
    )


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


class Lifecycle:
    """Runs key lifecycle operations on the store, with audit and outbox, on an injected clock."""

    def __init__(self, store: Store, vault: Vault, *, clock: Clock = utc_now) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._current: tuple[int, Mapping[str, Key]] | None = None

    # -- reads -----------------------------------------------------------------------------

    async def current_keys(self) -> Mapping[str, Key]:
        """Every key by name, from memory unless a commit changed keys or versions since.

        The agent requests (sync, fetch) read every key on every request; keys change seldom,
        so this is rebuilt once per key change instead (see ``Store.generation``).
        """
        generation = await self._store.generation("keys")
        if self._current is None or self._current[0] != generation:
            keys = await self.list_keys()
            self._current = (generation, MappingProxyType({k.name: k for k in keys}))
        return self._current[1]

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
        """Run an operation; audit a refusal (own transaction) before re-raising it."""
        now = self._now()
        try:
            _check_text(actor, "actor", required=True)
            return await run(now)
        except _REFUSALS as exc:
            await self._audit_refusal(action, name, actor, details, exc, now)
            raise

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
        event_type: str,
        data: dict[str, Any],
        details: dict[str, Any],
    ) -> None:
        """Write the outbox event and the audit record of one change, in its transaction."""
        event = await outbox.add_event(
            tx, type=event_type, partition_key=key.name, data=data, now=now
        )
        await audit_log.append(
            tx,
            now=now,
            actor=actor,
            action=action,
            object=f"key:{key.name}",
            details={**details, "event_id": event.event_id, "event_seq": event.seq},
        )

    async def _set_primary_after(
        self, tx: Transaction, key: Key, version: int, new_state: KeyState, now: datetime
    ) -> int | None:
        """Apply the primary rule after ``version`` entered ``new_state``; return the primary."""
        primary = key.primary_version
        if new_state is KeyState.ACTIVE:
            entered = key.version(version)
            if entered.superseded_at is None and (primary is None or version > primary):
                await tx.execute(
                    "UPDATE key_versions SET superseded_at = ? WHERE key_id = ? AND version < ? "
                    "AND superseded_at IS NULL AND state IN ('PreActive', 'Active', 'Suspended')",
                    (format_time(now), key.id, version),
                )
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
        data: dict[str, Any] = {
            "key": key.name,
            "key_id": key.id,
            "version": version,
            "from": str(current.state),
            "to": str(target),
            "primary": primary,
        }
        details: dict[str, Any] = {
            "version": version,
            "from": str(current.state),
            "to": str(target),
            "primary": primary,
            "reason": reason,
        }
        if op in (Op.REVOKE, Op.COMPROMISE):
            assert revocation is not None
            data |= {"reason": str(revocation), "compromise": revocation.is_compromise}
            details["revocation_reason"] = str(revocation)
        elif op is Op.DESTROY:
            data["digest"] = current.digest
            details["digest_hmac"] = self._vault.identifier(current.digest)
        else:
            data["reason"] = reason
        action = "key.revoke" if op is Op.COMPROMISE else f"key.{op}"
        await self._emit(
            tx,
            now=now,
            actor=actor,
            action=action,
            key=key,
            event_type=_EVENT[op],
            data=data,
            details=details,
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
    ) -> Key:
        """Create a key with version 1 (Active, or PreActive when the policy delays activation)."""
        details: dict[str, Any] = {"type": str(key_type)}

        async def run(now: datetime) -> Key:
            validate_key_name(name)
            try:
                kt = KeyType(key_type)
            except ValueError:
                raise ConfigError(f"unsupported key type {key_type!r}") from None
            mask = check_usage(kt, None if usage is None else frozenset(usage))  # type: ignore[arg-type]
            pol = policy if policy is not None else default_policy(kt, mask)
            check_policy(kt, mask, pol)
            tgt = targets if targets is not None else Targets()
            spec = install if install is not None else default_install(kt)
            _check_install(kt, spec)
            if kt is not KeyType.SECRET and (
                secret_length is not None or secret_alphabet is not None
            ):
                raise ConfigError("secret_length and secret_alphabet apply only to type 'secret'")
            self._vault.require_unsealed(f"create key {name}")
            async with self._store.read() as r:
                if await _repo.find_key(r, name) is not None:
                    raise AlreadyExistsError(f"a key named {name!r} already exists")
            # RSA generation takes hundreds of ms: keep it off the event loop and the writer lock.
            material = await asyncio.to_thread(
                generate, kt, length=secret_length, alphabet=secret_alphabet
            )
            digest = material_digest(material)
            active = pol.activation_delay <= timedelta(0)
            state = KeyState.ACTIVE if active else KeyState.PRE_ACTIVE
            key = Key(
                id=str(uuid.uuid4()),
                name=name,
                type=kt,
                usage=mask,
                policy=pol,
                targets=tgt,
                install=spec,
                secret_length=secret_length,
                secret_alphabet=secret_alphabet,
                primary_version=1 if active else None,
                created_at=now,
                created_by=actor,
                updated_at=now,
            )
            first = KeyVersion(
                key=name,
                version=1,
                state=state,
                digest=digest,
                has_material=True,
                created_at=now,
                created_by=actor,
                state_changed_at=now,
                activation_at=now + pol.activation_delay,
                activated_at=now if active else None,
            )
            async with self._store.write() as tx:
                if await _repo.find_key(tx, name) is not None:
                    raise AlreadyExistsError(f"a key named {name!r} already exists")
                await self._check_env_guard(tx, tgt)
                sealed = self._vault.seal_material(name, 1, str(kt), key.usage_list, material)
                del material
                await _repo.insert_key(tx, key)
                await _repo.insert_version(tx, key.id, first, sealed)
                await _repo.insert_transition(
                    tx,
                    key_id=key.id,
                    version=1,
                    from_state=None,
                    to_state=state,
                    operation="create",
                    now=now,
                    actor=actor,
                    reason=None,
                )
                data = {
                    "key": name,
                    "key_id": key.id,
                    "type": str(kt),
                    "usage": key.usage_list,
                    "version": 1,
                    "state": str(state),
                    "digest": digest,
                    "activation_at": _t(first.activation_at),
                    "primary": key.primary_version,
                    "policy": pol.model_dump(mode="json"),
                    "targets": tgt.model_dump(mode="json"),
                    "install": spec.model_dump(mode="json"),
                }
                await self._emit(
                    tx,
                    now=now,
                    actor=actor,
                    action="key.create",
                    key=key,
                    event_type="key.created",
                    data=data,
                    details={
                        "type": str(kt),
                        "usage": key.usage_list,
                        "version": 1,
                        "state": str(state),
                        "digest_hmac": self._vault.identifier(digest),
                        "targets": tgt.describe(),
                    },
                )
                created = await _repo.load_key(tx, name)
            log.info("created key %s (%s) by %s", name, kt, actor)
            return created

        return await self._guarded("key.create", name, actor, details, run)

    async def rotate(self, name: str, *, actor: str, reason: str | None = None) -> KeyVersion:
        """Add a version: Active and primary now, or PreActive until the activation delay ends."""

        async def run(now: datetime) -> KeyVersion:
            why = _check_text(reason, "reason")
            self._vault.require_unsealed(f"rotate {name}")
            async with self._store.read() as r:
                before = await _repo.load_key(r, name)
            material = await asyncio.to_thread(
                generate, before.type, length=before.secret_length, alphabet=before.secret_alphabet
            )
            digest = material_digest(material)
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                number = key.latest_version + 1
                delay = key.policy.activation_delay
                active = delay <= timedelta(0)
                state = KeyState.ACTIVE if active else KeyState.PRE_ACTIVE
                version = KeyVersion(
                    key=name,
                    version=number,
                    state=state,
                    digest=digest,
                    has_material=True,
                    created_at=now,
                    created_by=actor,
                    state_changed_at=now,
                    activation_at=now + delay,
                    activated_at=now if active else None,
                )
                sealed = self._vault.seal_material(
                    name, number, str(key.type), key.usage_list, material
                )
                del material
                await _repo.insert_version(tx, key.id, version, sealed)
                await _repo.insert_transition(
                    tx,
                    key_id=key.id,
                    version=number,
                    from_state=None,
                    to_state=state,
                    operation="rotate",
                    now=now,
                    actor=actor,
                    reason=why,
                )
                key_with_new = await _repo.load_key(tx, name)
                primary = await self._set_primary_after(tx, key_with_new, number, state, now)
                data = {
                    "key": name,
                    "key_id": key.id,
                    "type": str(key.type),
                    "version": number,
                    "state": str(state),
                    "digest": digest,
                    "activation_at": _t(version.activation_at),
                    "primary": primary,
                    "previous_primary": key.primary_version,
                    "targets": key.targets.model_dump(mode="json"),
                    "install": key.install.model_dump(mode="json"),
                }
                await self._emit(
                    tx,
                    now=now,
                    actor=actor,
                    action="key.rotate",
                    key=key,
                    event_type="key.rotated",
                    data=data,
                    details={
                        "version": number,
                        "state": str(state),
                        "primary": primary,
                        "previous_primary": key.primary_version,
                        "digest_hmac": self._vault.identifier(digest),
                        "reason": why,
                    },
                )
                after = await _repo.load_key(tx, name)
            log.info("rotated key %s to version %d (%s) by %s", name, number, state, actor)
            return after.version(number)

        return await self._guarded("key.rotate", name, actor, {"reason": reason}, run)

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
                    event_type="key.policy_changed",
                    data={"key": name, "key_id": key.id, "policy": dumped},
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
        """Replace a key's targets (and optionally its install spec)."""

        async def run(now: datetime) -> Key:
            self._vault.require_unsealed(f"change the targets of {name}")
            async with self._store.write() as tx:
                key = await _repo.load_key(tx, name)
                spec = install if install is not None else key.install
                _check_install(key.type, spec)
                await self._check_env_guard(tx, targets)
                await _repo.update_key(tx, key.id, now=now, targets=targets, install=spec)
                await self._emit(
                    tx,
                    now=now,
                    actor=actor,
                    action="key.set_targets",
                    key=key,
                    event_type="key.targets_changed",
                    data={
                        "key": name,
                        "key_id": key.id,
                        "targets": targets.model_dump(mode="json"),
                        "install": spec.model_dump(mode="json"),
                    },
                    details={
                        "targets": targets.describe(),
                        "previous": key.targets.describe(),
                        "install_changed": spec != key.install,
                    },
                )
                return await _repo.load_key(tx, name)

        return await self._guarded(
            "key.set_targets", name, actor, {"targets": targets.describe()}, run
        )

    async def _check_env_guard(self, tx: Transaction, targets: Targets) -> None:
        """Refuse targets that list, by id, a known host of another environment."""
        if not targets.hosts:
            return
        blocked = env_blocked(targets, await _repo.list_hosts(tx))
        if blocked:
            raise PolicyError(
                f"hosts {', '.join(h.id for h in blocked)} are not labelled "
                f"env={targets.effective_env}; a key of one environment never goes to another"
            )


def _check_install(key_type: KeyType, spec: InstallSpec) -> None:
    """Refuse an install format that cannot carry the key type."""
    allowed = allowed_formats(key_type)
    if spec.format not in allowed:
        raise ConfigError(
            f"install format '{spec.format}' is not available for key type '{key_type}' "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _whole_key_revocation(key: Key, op: Op) -> list[int]:
    """Pick the versions a whole-key revocation applies to, or raise InvalidTransitionError."""
    done = (
        {KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED}
        if op is Op.COMPROMISE
        else {
            KeyState.DEACTIVATED,
            KeyState.COMPROMISED,
            KeyState.DESTROYED,
            KeyState.DESTROYED_COMPROMISED,
        }
    )
    numbers: list[int] = []
    for v in key.versions:
        if v.state in done:
            continue
        next_state(v.state, op, key=key.name, version=v.version)  # refuses e.g. PreActive
        numbers.append(v.version)
    if not numbers:
        states = ", ".join(sorted({str(v.state) for v in key.versions})) or "no versions"
        raise InvalidTransitionError(
            f"cannot {_OP_LABEL.get(op, str(op))} {key.name}: no version can be revoked "
            f"(states: {states})"
        )
    return numbers
