"""Sealing: the root KEK, the secrets it protects, and the controller's sealed/unsealed state.

:func:`init_controller` runs once per store. It makes a 256-bit root KEK and hands it out as
M-of-N SLIP-39 shares (returned once, never stored) or wraps it under a passphrase (scrypt), and
stores, each sealed (AES-256-GCM) under the root KEK with associated data naming the secret:

- the **data KEK**, under which every key version's material is sealed (AAD binds key name,
  version, type and usage);
- the controller's Ed25519 **event-signing key** (its public key is stored in clear so events and
  audit checkpoints can be verified while sealed);
- the **audit HMAC key** for sensitive identifiers in audit records.

Only the KEK check value (an HMAC of a fixed label under the root KEK) is stored to tell a wrong
KEK from a tampered store. A :class:`Vault` starts sealed; unsealing reconstructs the root KEK,
checks it, opens the three secrets into memory, derives the fleet's digest key and the row MAC
key from the root KEK (HKDF, ``ckms.crypto.derive_from_root``; never stored) and forgets the
root KEK. While sealed, anything
that needs those secrets raises :class:`~ckms.errors.SealedError`. Every unseal attempt and every
seal is audited; a successful unseal whose audit record cannot be written is undone.

Custodians may give their shares together (:meth:`Vault.unseal_with_shares`) or one at a time
(:meth:`Vault.submit_share`, as ``ckms unseal`` does); pending shares are kept in memory only,
for at most ``pending_ttl``, and dropped on failure or seal.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from ckms._canonical import canonical_json, parse_canonical_json
from ckms.controller import _repo, upgrade
from ckms.controller.ca import CA_RECORD, new_ca_state
from ckms.controller.keyview import KeyView
from ckms.controller.models import Key
from ckms.crypto import (
    DIGEST_KEY_PURPOSE,
    ROW_MAC_PURPOSE,
    WrapSuite,
    certificate_fingerprint,
    combine_shares,
    derive_from_root,
    generate_signing_key,
    hmac_identifier,
    kek_check_value,
    material_digest,
    new_data_kek,
    new_root_kek,
    open_sealed,
    seal,
    sign,
    signer_key_id,
    signing_public_key,
    split_root_kek,
    staged_aad,
    unwrap_root_kek_with_passphrase,
    version_aad,
    wrap_for_agent,
    wrap_root_kek_with_passphrase,
)
from ckms.errors import (
    AlreadyExistsError,
    AuditError,
    ConfigError,
    CryptoError,
    IntegrityError,
    NotFoundError,
    SealedError,
    StoreError,
    UnsealError,
)
from ckms.protocol import AUDIT_TOPIC, DIGEST_KEY_WRAP_NAME, DIGEST_KEY_WRAP_VERSION
from ckms.store import Clock, Store, format_time, require_utc, utc_now
from ckms.store import audit as audit_log

__all__ = [
    "MIN_PASSPHRASE_LENGTH",
    "InitResult",
    "SealStatus",
    "UnsealProgress",
    "Vault",
    "init_controller",
]

if TYPE_CHECKING:
    from ckms.controller.anchor import AuditAnchor

log = logging.getLogger(__name__)

MIN_PASSPHRASE_LENGTH = 12
AUDIT_HMAC_KEY_BYTES = 32

META_MODE = "root.mode"
META_SHARES = "root.shares"
META_PASSPHRASE = "root.passphrase_wrap"  # noqa: S105 - a meta row name
META_CHECK = "root.kek_check_value"
META_DATA_KEK = "sealed.data_kek"
META_SIGNING_KEY = "sealed.signing_key"
META_SIGNING_PUBLIC = "signing.public_key"
META_AUDIT_HMAC = "sealed.audit_hmac_key"
META_INITIALIZED_AT = "initialized_at"

Mode = Literal["shares", "passphrase"]


def _meta_aad(name: str) -> bytes:
    """Associated data for a controller secret sealed under the root KEK: names which one it is."""
    return canonical_json({"ctx": "ckms.meta.v1", "name": name})


def _record_aad(name: str) -> bytes:
    """Associated data for a controller record sealed under the data KEK (the CA): its name."""
    return canonical_json({"ctx": "ckms.record.v1", "name": name})


def seal_record(data_kek: bytes, name: str, plaintext: bytes) -> bytes:
    """Seal a controller record (the CA's keys) under the data KEK, bound to its name."""
    return seal(data_kek, plaintext, _record_aad(name))


def _normalise_share(mnemonic: str) -> str:
    """Normalise a mnemonic's spacing and case so one share typed twice is seen as one."""
    return " ".join(mnemonic.lower().split())


@dataclass(frozen=True)
class InitResult:
    """What ``ckms init`` shows once: the shares (never stored) and what peers pin."""

    mode: Mode
    threshold: int | None
    count: int | None
    mnemonics: list[str] = field(repr=False)
    kek_check_value: str
    signing_public_key: bytes
    signer_key_id: str


@dataclass(frozen=True)
class UnsealProgress:
    """Where a share-by-share unseal stands."""

    sealed: bool
    threshold: int
    given: int
    contributors: tuple[tuple[str, str], ...] = ()
    """(custodian, identity key fingerprint) of the shares that unsealed, once unsealed."""


@dataclass(frozen=True)
class SealStatus:
    """Whether the controller is initialised and sealed (no secrets)."""

    initialized: bool
    sealed: bool
    mode: Mode | None
    threshold: int | None
    count: int | None
    shares_given: int
    signer_key_id: str | None


async def init_controller(
    store: Store,
    *,
    shares: tuple[int, int] | None = None,
    passphrase: str | None = None,
    actor: str = "init",
    clock: Clock = utc_now,
) -> InitResult:
    """Create the root KEK and the controller's secrets, store them sealed, return the shares once.

    Exactly one of ``shares=(M, N)`` (M-of-N SLIP-39 mnemonics, ``2 <= M <= N <= 16``) or
    ``passphrase`` must be given. Refuses a store that is already initialised.
    """
    if (shares is None) == (passphrase is None):
        raise ConfigError("give exactly one of shares=(threshold, count) or passphrase")
    now = require_utc(clock())
    root = new_root_kek()
    mnemonics: list[str] = []
    threshold = count = None
    if shares is not None:
        threshold, count = shares
        mnemonics = await asyncio.to_thread(split_root_kek, root, threshold, count)
        mode: Mode = "shares"
    else:
        assert passphrase is not None
        if len(passphrase) < MIN_PASSPHRASE_LENGTH:
            raise ConfigError(f"passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters")
        wrapped = await asyncio.to_thread(wrap_root_kek_with_passphrase, root, passphrase)
        mode = "passphrase"
    signing_key = generate_signing_key()
    public = signing_public_key(signing_key)
    check = kek_check_value(root)
    data_kek = new_data_kek()
    ca_state = await asyncio.to_thread(new_ca_state, now)
    async with store.write() as tx:
        if await tx.get_meta(META_CHECK) is not None:
            raise AlreadyExistsError("the controller is already initialised")
        await tx.set_meta(META_MODE, mode.encode())
        if mode == "shares":
            await tx.set_meta(META_SHARES, canonical_json({"threshold": threshold, "count": count}))
        else:
            await tx.set_meta(META_PASSPHRASE, canonical_json(wrapped))
        await tx.set_meta(META_CHECK, check.encode())
        for name, secret in (
            (META_DATA_KEK, data_kek),
            (META_SIGNING_KEY, signing_key),
            (META_AUDIT_HMAC, secrets.token_bytes(AUDIT_HMAC_KEY_BYTES)),
        ):
            await tx.set_meta(name, seal(root, secret, _meta_aad(name)))
        await tx.set_meta(META_SIGNING_PUBLIC, public)
        await tx.set_meta(CA_RECORD, seal_record(data_kek, CA_RECORD, ca_state.encode()))
        await tx.set_meta(META_INITIALIZED_AT, format_time(now).encode())
        await audit_log.append(
            tx,
            now=now,
            actor=actor,
            action="controller.init",
            object="controller",
            details={
                "mode": mode,
                "threshold": threshold,
                "count": count,
                "kek_check_value": check,
                "signer_key_id": signer_key_id(public),
                "ca_root": certificate_fingerprint(ca_state.active.root.certificate),
            },
        )
    del root, signing_key, data_kek, ca_state
    log.info("controller initialised (%s)", mode)
    return InitResult(
        mode=mode,
        threshold=threshold,
        count=count,
        mnemonics=mnemonics,
        kek_check_value=check,
        signing_public_key=public,
        signer_key_id=signer_key_id(public),
    )


@dataclass
class _Secrets:
    data_kek: bytes = field(repr=False)
    signing_key: bytes = field(repr=False)
    audit_hmac_key: bytes = field(repr=False)
    digest_key: bytes = field(repr=False)
    row_key: bytes = field(repr=False)


class Vault:
    """The controller's sealed/unsealed state and the only holder of its secrets in memory."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock = utc_now,
        pending_ttl: timedelta = timedelta(minutes=15),
    ) -> None:
        self._store = store
        self._clock = clock
        self._pending_ttl = pending_ttl
        self._secrets: _Secrets | None = None
        self._lock = asyncio.Lock()
        self._pending: list[tuple[str, str, str]] = []  # (custodian, key, normalised mnemonic)
        self._pending_since: datetime | None = None
        self._public_key: bytes | None = None
        self._anchor: AuditAnchor | None = None

    def __repr__(self) -> str:
        return f"<Vault sealed={self.sealed}>"

    # -- state -----------------------------------------------------------------------------

    @property
    def sealed(self) -> bool:
        """True until unsealed, and again after :meth:`seal`."""
        return self._secrets is None

    def require_unsealed(self, what: str) -> None:
        """Raise SealedError naming ``what`` unless the controller is unsealed."""
        if self._secrets is None:
            raise SealedError(f"controller is sealed: cannot {what}; unseal it first")

    def _unsealed(self, what: str) -> _Secrets:
        self.require_unsealed(what)
        assert self._secrets is not None
        return self._secrets

    async def status(self) -> SealStatus:
        """Return whether the controller is initialised and sealed, and how unsealing is set up."""
        async with self._store.read() as r:
            mode_raw = await r.get_meta(META_MODE)
            params_raw = await r.get_meta(META_SHARES)
            public = await r.get_meta(META_SIGNING_PUBLIC)
        params = parse_canonical_json(params_raw) if params_raw else {}
        return SealStatus(
            initialized=mode_raw is not None,
            sealed=self.sealed,
            mode=None if mode_raw is None else mode_raw.decode(),  # type: ignore[arg-type]
            threshold=params.get("threshold"),
            count=params.get("count"),
            shares_given=len(self._pending),
            signer_key_id=None if public is None else signer_key_id(public),
        )

    async def public_key(self) -> bytes:
        """Return the controller's Ed25519 public key (available while sealed)."""
        if self._public_key is None:
            public = await self._store.get_meta(META_SIGNING_PUBLIC)
            if public is None:
                raise NotFoundError("the controller is not initialised (run ckms init)")
            self._public_key = public
        return self._public_key

    # -- unsealing -------------------------------------------------------------------------

    async def _mode(self) -> tuple[Mode, dict[str, Any]]:
        async with self._store.read() as r:
            mode_raw = await r.get_meta(META_MODE)
            params = await r.get_meta(META_SHARES if mode_raw == b"shares" else META_PASSPHRASE)
        if mode_raw is None or params is None:
            raise NotFoundError("the controller is not initialised (run ckms init)")
        value = parse_canonical_json(params)
        return mode_raw.decode(), value  # type: ignore[return-value]

    async def unseal_with_shares(
        self, mnemonics: Sequence[str], *, actor: str = "custodian"
    ) -> None:
        """Unseal with at least M distinct custodian shares; a repeated share is refused."""
        async with self._lock:
            if not self.sealed:
                return
            mode, params = await self._mode()
            if mode != "shares":
                raise UnsealError("this controller is unsealed with a passphrase, not shares")
            if isinstance(mnemonics, str):
                raise UnsealError("shares must be given as a list of mnemonics")
            normalised = [_normalise_share(m) if isinstance(m, str) else "" for m in mnemonics]
            await self._unseal_shares(normalised, params, actor=actor)

    async def submit_share(
        self, mnemonic: str, *, custodian: str, key: str | None = None
    ) -> UnsealProgress:
        """Add one custodian's share; unseal once M distinct custodians gave distinct shares.

        A share counts once per custodian *identity key* (``key``, the SSH key fingerprint the
        caller authenticated with) as well as once per name: one key under two names is one
        person and gives one share.
        """
        async with self._lock:
            mode, params = await self._mode()
            if mode != "shares":
                raise UnsealError("this controller is unsealed with a passphrase, not shares")
            threshold = int(params["threshold"])
            if not self.sealed:
                return UnsealProgress(sealed=False, threshold=threshold, given=0)
            now = require_utc(self._clock())
            if self._pending_since is not None and now - self._pending_since > self._pending_ttl:
                log.info(
                    "discarding %d unseal shares older than %s",
                    len(self._pending),
                    self._pending_ttl,
                )
                self._clear_pending()
            share = _normalise_share(mnemonic) if isinstance(mnemonic, str) else ""
            identity = key if key is not None else f"name:{custodian}"
            if any(c == custodian for c, _, _ in self._pending):
                raise UnsealError(f"custodian {custodian!r} already gave a share")
            if any(k == identity for _, k, _ in self._pending):
                raise UnsealError("this identity key already gave a share; each key counts once")
            if any(s == share for _, _, s in self._pending):
                raise UnsealError("this share was already given")
            self._pending.append((custodian, identity, share))
            if self._pending_since is None:
                self._pending_since = now
            if len(self._pending) < threshold:
                return UnsealProgress(sealed=True, threshold=threshold, given=len(self._pending))
            given = [s for _, _, s in self._pending]
            contributors = tuple(sorted((c, k) for c, k, _ in self._pending))
            self._clear_pending()
            await self._unseal_shares(given, params, actor=",".join(c for c, _ in contributors))
            return UnsealProgress(
                sealed=False, threshold=threshold, given=len(given), contributors=contributors
            )

    async def _unseal_shares(
        self, shares: list[str], params: dict[str, Any], *, actor: str
    ) -> None:
        threshold = int(params["threshold"])
        try:
            if len(set(shares)) != len(shares):
                raise UnsealError("a share was given twice; each share counts once")
            if len(shares) < threshold:
                missing = threshold - len(shares)
                raise UnsealError(
                    f"{missing} more share{'s' if missing != 1 else ''} needed "
                    f"({len(shares)} of {threshold} given)"
                )
            kek = await asyncio.to_thread(combine_shares, shares)
            await self._unlock(kek)
        except (CryptoError, StoreError) as exc:
            await self._audit_unseal_failure("shares", actor, exc, given=len(shares))
            raise
        del kek
        details: dict[str, Any] = {
            "method": "shares",
            "given": len(shares),
            "share_ids": sorted(self.identifier(s) for s in shares),
        }
        await self._audit_unsealed(actor, details)

    async def unseal_with_passphrase(self, passphrase: str, *, actor: str = "custodian") -> None:
        """Unseal with the passphrase given at init; a wrong one raises UnsealError."""
        async with self._lock:
            if not self.sealed:
                return
            mode, blob = await self._mode()
            if mode != "passphrase":
                raise UnsealError("this controller is unsealed with shares, not a passphrase")
            try:
                kek = await asyncio.to_thread(unwrap_root_kek_with_passphrase, blob, passphrase)
                await self._unlock(kek)
            except (CryptoError, StoreError) as exc:
                await self._audit_unseal_failure("passphrase", actor, exc, given=1)
                raise
            del kek
            await self._audit_unsealed(actor, {"method": "passphrase"})

    async def _unlock(self, kek: bytes) -> None:
        """Check the root KEK against the stored check value and open the controller's secrets."""
        async with self._store.read() as r:
            stored_check = await r.get_meta(META_CHECK)
            sealed = {
                name: await r.get_meta(name)
                for name in (META_DATA_KEK, META_SIGNING_KEY, META_AUDIT_HMAC)
            }
            public = await r.get_meta(META_SIGNING_PUBLIC)
        if stored_check is None or public is None or any(v is None for v in sealed.values()):
            raise NotFoundError("the controller is not initialised (run ckms init)")
        if not hmac.compare_digest(kek_check_value(kek).encode(), stored_check):
            raise UnsealError("the root KEK does not match this controller (check value differs)")
        opened = {
            name: open_sealed(kek, blob, _meta_aad(name), what=f"controller secret {name}")
            for name, blob in sealed.items()
            if blob is not None
        }
        if not hmac.compare_digest(signing_public_key(opened[META_SIGNING_KEY]), public):
            # The public key is stored in clear (events and checkpoints verify while sealed);
            # it is bound to the root KEK through the sealed private key it must match.
            raise IntegrityError("the stored event-signing public key failed integrity check")
        self._secrets = _Secrets(
            data_kek=opened[META_DATA_KEK],
            signing_key=opened[META_SIGNING_KEY],
            audit_hmac_key=opened[META_AUDIT_HMAC],
            digest_key=derive_from_root(kek, DIGEST_KEY_PURPOSE),
            row_key=derive_from_root(kek, ROW_MAC_PURPOSE),
        )
        self._public_key = public

    async def _audit_unsealed(self, actor: str, details: dict[str, Any]) -> None:
        now = require_utc(self._clock())
        try:
            async with self._store.write() as tx:
                await audit_log.append(
                    tx,
                    now=now,
                    actor=actor,
                    action="controller.unseal",
                    object="controller",
                    details=details,
                )
        except (AuditError, StoreError):
            self._secrets = None  # fail closed: an unaudited unseal does not stand
            raise
        try:
            await upgrade.after_unseal(self._store, self, now=require_utc(self._clock()))
        except BaseException:
            self._forget()  # nothing is served on data that could not be brought up
            raise
        log.info("controller unsealed (%s)", details["method"])

    async def _audit_unseal_failure(
        self, method: str, actor: str, exc: BaseException, *, given: int
    ) -> None:
        self._secrets = None
        now = require_utc(self._clock())
        try:
            async with self._store.write() as tx:
                await audit_log.append(
                    tx,
                    now=now,
                    actor=actor,
                    action="controller.unseal",
                    object="controller",
                    outcome="failed",
                    details={
                        "method": method,
                        "given": given,
                        "error": type(exc).__name__,
                        "message": str(exc),
                    },
                )
        except StoreError:
            log.exception("could not audit a failed unseal attempt")
        log.warning("unseal with %s failed: %s", method, exc)

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._pending_since = None

    def _forget(self) -> None:
        """Drop the secrets from memory; row checks stop with them (nothing to check with)."""
        self._secrets = None
        self._store.row_key = None
        self._store.invalidate()

    async def seal(self, *, actor: str = "operator") -> None:
        """Forget every secret and pending share; material operations are refused again."""
        async with self._lock:
            was_sealed = self.sealed
            self._forget()
            self._clear_pending()
            if was_sealed:
                return
            now = require_utc(self._clock())
            async with self._store.write() as tx:
                await audit_log.append(
                    tx, now=now, actor=actor, action="controller.seal", object="controller"
                )
            log.info("controller sealed")

    # -- the same state in several processes (ckms.controller.workers) --------------------

    def share_state(self) -> dict[str, str] | None:
        """What an SSH worker process needs to be unsealed like this one (None: sealed).

        Only for the parent's inherited socket to its own workers: the opened secrets (never
        the root KEK, which is not kept) as base64, with the public key they were checked
        against.
        """
        s = self._secrets
        if s is None:
            return None
        assert self._public_key is not None
        values = {
            "data_kek": s.data_kek,
            "signing_key": s.signing_key,
            "audit_hmac_key": s.audit_hmac_key,
            "digest_key": s.digest_key,
            "row_key": s.row_key,
            "public_key": self._public_key,
        }
        return {name: base64.b64encode(value).decode("ascii") for name, value in values.items()}

    async def adopt_state(self, state: dict[str, str] | None) -> None:
        """Take the parent's state from :meth:`share_state` (None: forget every secret).

        The signing key must match the public key in the store (what an unseal checks too),
        so a worker never signs with a key the fleet does not trust. Nothing is written: the
        parent audited the unseal and brought the data up to date.
        """
        async with self._lock:
            if state is None:
                self._forget()
                self._clear_pending()
                return
            try:
                values = {name: base64.b64decode(state[name], validate=True) for name in state}
                secrets_ = _Secrets(
                    data_kek=values["data_kek"],
                    signing_key=values["signing_key"],
                    audit_hmac_key=values["audit_hmac_key"],
                    digest_key=values["digest_key"],
                    row_key=values["row_key"],
                )
                public = values["public_key"]
            except (KeyError, ValueError, TypeError):
                raise IntegrityError("the unsealed state handed over is malformed") from None
            stored = await self._store.get_meta(META_SIGNING_PUBLIC)
            if (
                stored is None
                or not hmac.compare_digest(stored, public)
                or not hmac.compare_digest(signing_public_key(secrets_.signing_key), public)
            ):
                raise IntegrityError("the unsealed state handed over does not match this store")
            self._secrets = secrets_
            self._public_key = public
            self._store.row_key = secrets_.row_key
            self._store.invalidate()  # caches filled while sealed were not checked

    # -- using the secrets -----------------------------------------------------------------

    def seal_material(
        self, key_name: str, version: int, key_type: str, usage: Sequence[str], material: bytes
    ) -> bytes:
        """Seal a version's material under the data KEK, bound to its name, version, type, usage."""
        s = self._unsealed("seal key material")
        return seal(s.data_kek, material, version_aad(key_name, version, key_type, usage))

    def seal_staged(
        self, operation: str, key: str, key_type: str, usage: Sequence[str], material: bytes
    ) -> str:
        """Seal imported material for an operation that may wait for approval (base64 text
        for the request's parameters; the material is never stored in the clear)."""
        s = self._unsealed("seal imported material")
        blob = seal(s.data_kek, material, staged_aad(operation, key, key_type, usage))
        return base64.b64encode(blob).decode("ascii")

    def open_staged(
        self, operation: str, key: str, key_type: str, usage: Sequence[str], staged: str
    ) -> bytes:
        """Open :meth:`seal_staged` text; IntegrityError if it was made for anything else."""
        s = self._unsealed("open imported material")
        what = f"imported material for {operation} {key}"
        try:
            blob = base64.b64decode(staged.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise IntegrityError(f"{what} failed integrity check") from None
        return open_sealed(s.data_kek, blob, staged_aad(operation, key, key_type, usage), what=what)

    async def material(
        self, key_name: str, version: int, *, key: Key | KeyView | None = None
    ) -> bytes:
        """Return one version's material (for the fetch path); IntegrityError if its row was edited.

        Never log or store the result. Destroyed versions raise NotFoundError.
        """
        s = self._unsealed("read key material")
        if key is None or key.name != key_name:
            async with self._store.read() as r:
                key, sealed_material = await _repo.load_sealed(r, key_name, version)
        else:
            # The caller holds the key (name, type, usage: what the AAD binds; never change).
            key.version(version)  # NotFoundError for an unknown version
            value = await self._store.fetchval(
                "SELECT sealed_material FROM key_versions WHERE key_id = ? AND version = ?",
                (key.id, version),
            )
            sealed_material = None if value is None else bytes(value)
        if sealed_material is None:
            raise NotFoundError(f"key {key_name} version {version} was destroyed; no material")
        aad = version_aad(key.name, version, str(key.type), key.usage_list)
        return open_sealed(
            s.data_kek, sealed_material, aad, what=f"key {key_name} version {version}"
        )

    def seal_record(self, name: str, plaintext: bytes) -> bytes:
        """Seal a controller record (the CA) under the data KEK, bound to its name."""
        return seal_record(self._unsealed("seal a controller record").data_kek, name, plaintext)

    def open_record(self, name: str, blob: bytes) -> bytes:
        """Open a controller record; IntegrityError if it was edited or swapped for another."""
        s = self._unsealed("open a controller record")
        return open_sealed(s.data_kek, blob, _record_aad(name), what=f"controller record {name}")

    def digest(self, material: bytes) -> str:
        """Return the keyed digest of canonical material (what events name and agents check)."""
        return material_digest(self._unsealed("compute material digests").digest_key, material)

    def wrapped_digest_key(
        self, wrapping_public_key: bytes, *, host_id: str, suite: WrapSuite
    ) -> bytes:
        """Return the fleet's digest key HPKE-wrapped to one host, as enrollment hands it out."""
        return wrap_for_agent(
            wrapping_public_key,
            self._unsealed("hand out the digest key").digest_key,
            key_name=DIGEST_KEY_WRAP_NAME,
            version=DIGEST_KEY_WRAP_VERSION,
            agent_id=host_id,
            suite=suite,
        )

    def row_key(self) -> bytes:
        """Return the key that MACs store rows (never leaves the controller; see rowmac)."""
        return self._unsealed("check stored rows").row_key

    def identifier(self, value: str) -> str:
        """Return the audit HMAC of a sensitive identifier (matchable, not reversible)."""
        return hmac_identifier(self._unsealed("compute audit identifiers").audit_hmac_key, value)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the controller's event-signing key."""
        return sign(self._unsealed("sign").signing_key, data)

    @property
    def anchor(self) -> AuditAnchor:
        """The audit anchor every checkpoint goes through (in memory only until the controller
        attaches one that is published on the anchor topic)."""
        if self._anchor is None:
            from ckms.controller.anchor import AuditAnchor

            self._anchor = AuditAnchor(
                self._store, self, kafka=None, topic=AUDIT_TOPIC, clock=self._clock
            )
        return self._anchor

    @anchor.setter
    def anchor(self, value: AuditAnchor) -> None:
        self._anchor = value

    async def checkpoint_audit(self) -> audit_log.AuditCheckpoint:
        """Sign and store a checkpoint of the audit log as it is now, if it extends the anchor."""
        return await self.anchor.checkpoint()
