"""Enrolled hosts: single-use enrollment tokens, enrollment, identity lookup, labels, revocation.

An operator creates a token for a host name and its labels; the token is shown once and only
its SHA-256 is stored (tokens are 256-bit random, so a plain hash is enough to keep the token
secret). The token row carries a MAC under the row key (``ckms.controller.rowmac``), so a token
row the controller did not write -- one the database file's owner inserted with labels of their
choosing, or whose labels or host they changed -- enrolls nobody. Host rows carry one too: who a
host is, its labels and whether it is revoked are checked on every read once unsealed.

The agent's first SSH connection authenticates with its new Ed25519 identity key and presents
the token; the controller checks that the key in the request is the key the connection proved,
that the raw ack-signing key is the same Ed25519 key, and that the token is unused and
unexpired, then records the host and burns the token — all in one transaction with its audit record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ckms.controller import _repo, rowmac
from ckms.controller.ca import entitled_names, revoke_certificates
from ckms.controller.models import Host
from ckms.controller.sealing import Vault
from ckms.crypto import WrapSuite, signer_key_id, signing_public_openssh
from ckms.errors import (
    AlreadyExistsError,
    CKMSError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
)
from ckms.protocol import (
    EnrollRequest,
    HostRevoked,
    RevocationReason,
    validate_host_name,
    validate_labels,
)
from ckms.store import (
    Clock,
    Reader,
    Store,
    Transaction,
    format_time,
    outbox,
    parse_time,
    utc_now,
)
from ckms.store import audit as audit_log

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = timedelta(hours=1)
MAX_TOKEN_TTL = timedelta(days=7)


@dataclass(frozen=True)
class EnrollmentToken:
    """A new token: give ``token`` to the host once; it is not stored and cannot be shown again."""

    host: str
    labels: dict[str, str]
    expires_at: datetime
    token: str = field(repr=False)


@dataclass(frozen=True)
class Enrollment:
    """A host just enrolled, and the last event ``seq`` committed before it (its replay floor)."""

    host: Host
    event_seq: int


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _ssh_line(text: str) -> str:
    """The ``type base64`` part of an OpenSSH public key line (comments dropped)."""
    return " ".join(text.split()[:2])


def logs_in_with(host: Host, presented_key: str) -> bool:
    """Whether ``presented_key`` (an OpenSSH public key line) is ``host``'s identity key: the
    login check, and the check of an open connection before each request (the host may have
    been enrolled again with another key since it logged in)."""
    try:
        return signing_public_openssh(host.identity_public_key) == _ssh_line(presented_key)
    except CKMSError:
        return False


async def _revoke_unentitled(
    tx: Transaction, before: Host, host: Host, now: datetime
) -> tuple[str, ...]:
    """Revoke the host's certificates of keys its new labels no longer entitle it to what it
    holds (no longer a target, a name template they cannot fill, or other names: a
    ``{label:NAME}`` that changed); the agent removes or re-issues them (the names digest in
    its sync reply changed)."""
    key_ids = [
        str(r["key_id"])
        for r in await tx.fetchall(
            "SELECT DISTINCT key_id FROM certificates WHERE host_id = ? AND key_id IS NOT NULL",
            (host.id,),
        )
    ]
    if not key_ids:
        return ()
    keys = {k.id: k for k in await _repo.keys_by_ids(tx, key_ids)}

    def keep(host_id: str, key_id: str) -> bool:
        key = keys.get(key_id)
        if key is None:
            return False
        names = entitled_names(key, host)
        return names is not None and names == entitled_names(key, before)

    return await revoke_certificates(
        tx, now=now, reason=RevocationReason.AFFILIATION_CHANGED, host_id=host.id, keep=keep
    )


def _host_row(row: object, row_key: bytes | None) -> Host:
    return _repo._host(row, row_key)


class HostRegistry:
    """The controller's enrolled hosts and the tokens that let new ones in."""

    def __init__(self, store: Store, vault: Vault, *, clock: Clock = utc_now) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._known: dict[str, tuple[Host, str]] = {}
        self._known_generation = -1
        self.on_revoked: Callable[[str], object] | None = None
        """Called with a host's id once its revocation committed (the controller closes the
        host's open SSH connections)."""

    async def create_token(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        *,
        actor: str,
        ttl: timedelta = DEFAULT_TOKEN_TTL,
    ) -> EnrollmentToken:
        """Make a single-use, expiring enrollment token for host ``name``."""
        validate_host_name(name)
        labels = validate_labels(labels or {})
        if not timedelta(seconds=1) <= ttl <= MAX_TOKEN_TTL:
            raise ConfigError(f"token lifetime must be between 1 s and {MAX_TOKEN_TTL.days} days")
        now = self._clock()
        token = "ckms-enroll-" + secrets.token_urlsafe(32)
        expires = now + ttl
        async with self._store.write() as tx:
            existing = await tx.fetchone("SELECT * FROM hosts WHERE id = ?", (name,))
            if existing is not None and not _host_row(existing, tx.row_key).revoked:
                raise AlreadyExistsError(f"host {name} is already enrolled")
            await tx.execute(
                "INSERT INTO enrollment_tokens(token_hash, host_name, labels, created_at, "
                "created_by, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _token_hash(token),
                    name,
                    json.dumps(labels, sort_keys=True),
                    format_time(now),
                    actor,
                    format_time(expires),
                ),
            )
            await rowmac.stamp_token(tx, _token_hash(token))
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="host.token",
                object=f"host:{name}",
                details={"labels": labels, "expires_at": format_time(expires)},
            )
        log.info("enrollment token for host %s created by %s", name, actor)
        return EnrollmentToken(host=name, labels=labels, expires_at=expires, token=token)

    async def enroll(self, request: EnrollRequest, *, presented_key: str) -> Enrollment:
        """Record a new host from its enrollment request; the token is burnt in the same step.

        Refused while sealed: what the reply pins (the controller's signing key) is only
        verified against the sealed secrets once unsealed.
        """
        self._vault.require_unsealed("enroll a host")
        now = self._clock()
        try:
            signing_key = base64.b64decode(request.signing_key, validate=True)
            wrapping_key = base64.b64decode(request.wrapping_key, validate=True)
            suite = WrapSuite(request.wrap_suite)
        except (binascii.Error, ValueError):
            raise ConfigError("enrollment keys must be base64 and the suite a known one") from None
        if _ssh_line(request.identity_key) != _ssh_line(presented_key):
            raise PermissionDeniedError(
                "the identity key in the request is not the key this connection authenticated with"
            )
        try:
            same_key = signing_public_openssh(signing_key) == _ssh_line(presented_key)
        except CKMSError:
            same_key = False
        if not same_key:
            raise PermissionDeniedError("the ack-signing key is not the SSH identity key")
        expected_wrap = 32 if suite is WrapSuite.X25519 else 1216
        if len(wrapping_key) != expected_wrap:
            raise ConfigError(f"a {suite} wrapping key is {expected_wrap} bytes")
        async with self._store.write() as tx:
            row = await tx.fetchone(
                "SELECT * FROM enrollment_tokens WHERE token_hash = ?",
                (_token_hash(request.token.get_secret_value()),),
            )
            problem = None
            if row is None:
                problem = "unknown"
            elif row["used_at"] is not None:
                problem = "already used"
            elif parse_time(row["expires_at"]) <= now:
                problem = "expired"
            if problem is not None:
                # Audited in its own transaction by the caller's refusal hook.
                raise PermissionDeniedError(f"enrollment token is {problem}")
            assert row is not None
            rowmac.check_token(tx.row_key, row)
            name = row["host_name"]
            existing = await tx.fetchone("SELECT * FROM hosts WHERE id = ?", (name,))
            if existing is not None and not _host_row(existing, tx.row_key).revoked:
                raise AlreadyExistsError(f"host {name} is already enrolled")
            if existing is not None:
                # A revoked host enrolled again: the row is replaced in place (its old tokens
                # still name it), everything it held or acked is forgotten.
                await tx.execute("DELETE FROM fleet_state WHERE host_id = ?", (name,))
            await tx.execute(
                "INSERT INTO hosts(id, name, labels, identity_public_key, wrapping_public_key, "
                "enrolled_at, wrap_suite, signer_key_id, last_seen_at, seen_mac) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "labels = excluded.labels, identity_public_key = excluded.identity_public_key, "
                "wrapping_public_key = excluded.wrapping_public_key, "
                "enrolled_at = excluded.enrolled_at, wrap_suite = excluded.wrap_suite, "
                "signer_key_id = excluded.signer_key_id, last_seen_at = excluded.last_seen_at, "
                "seen_mac = excluded.seen_mac, revoked = 0, revoked_at = NULL, "
                "last_ack_seq = NULL, reported = NULL",
                (
                    name,
                    name,
                    row["labels"],
                    signing_key,
                    wrapping_key,
                    format_time(now),
                    str(suite),
                    signer_key_id(signing_key),
                    format_time(now),
                    rowmac.seen_mac(tx.row_key, name, format_time(now)),
                ),
            )
            await rowmac.stamp_host(tx, name)
            token_hash = _token_hash(request.token.get_secret_value())
            await tx.execute(
                "UPDATE enrollment_tokens SET used_at = ?, used_by_host = ? WHERE token_hash = ?",
                (format_time(now), name, token_hash),
            )
            await rowmac.stamp_token(tx, token_hash)
            await audit_log.append(
                tx,
                now=now,
                actor=f"host:{name}",
                action="host.enroll",
                object=f"host:{name}",
                details={
                    "labels": json.loads(row["labels"]),
                    "signer_key_id": signer_key_id(signing_key),
                    "wrap_suite": str(suite),
                },
            )
            host = _host_row(
                await tx.fetchone("SELECT * FROM hosts WHERE id = ?", (name,)), tx.row_key
            )
            event_seq = await outbox.last_seq(tx)
        log.info("host %s enrolled", name)
        return Enrollment(host, event_seq)

    async def get(self, host_id: str) -> Host:
        """The host with this id, revoked or not."""
        row = await self._store.fetchone("SELECT * FROM hosts WHERE id = ?", (host_id,))
        if row is None:
            raise NotFoundError(f"no host {host_id!r}")
        return _host_row(row, self._store.row_key)

    async def list(self) -> list[Host]:
        """Every host, revoked ones included."""
        async with self._store.read() as r:
            return await _repo.list_hosts(r)

    async def page(self, after: str | None, limit: int) -> list[Host]:
        """Up to ``limit`` hosts whose id sorts after ``after``, by id."""
        async with self._store.read() as r:
            return await _repo.page_hosts(r, after, limit)

    async def identity(self, host_id: str) -> tuple[Host, str]:
        """The host and its wrap suite, from memory unless a commit changed a host since.

        Agent requests need who the host is (labels, revoked, wrapping key) on every request;
        that changes only on enroll, relabel and revoke (see ``Store.generation``).
        """
        generation = await self._store.generation("hosts")
        if generation != self._known_generation:
            self._known.clear()
            self._known_generation = generation
        known = self._known.get(host_id)
        if known is None:
            row = await self._store.fetchone("SELECT * FROM hosts WHERE id = ?", (host_id,))
            if row is None:
                raise NotFoundError(f"no host {host_id!r}")
            known = (_host_row(row, self._store.row_key), str(row["wrap_suite"]))
            if await self._store.generation("hosts") == generation:
                self._known[host_id] = known
        return known

    async def authenticate(self, host_id: str, presented_key: str) -> Host | None:
        """The host whose id and identity key these are, unless it is revoked (or its row
        fails its integrity check: logged, and the login refused)."""
        row = await self._store.fetchone(
            "SELECT * FROM hosts WHERE id = ? AND revoked = 0", (host_id,)
        )
        if row is None:
            return None
        try:
            host = _host_row(row, self._store.row_key)
        except IntegrityError as exc:
            log.error("login refused for host %s: %s", host_id, exc)
            return None
        return host if logs_in_with(host, presented_key) else None

    async def set_labels(self, host_id: str, labels: dict[str, str], *, actor: str) -> Host:
        """Replace a host's labels (which keys target it follows from them)."""
        labels = validate_labels(labels)
        now = self._clock()
        async with self._store.write() as tx:
            host = await self._require(tx, host_id)
            await tx.execute(
                "UPDATE hosts SET labels = ? WHERE id = ?",
                (json.dumps(labels, sort_keys=True), host_id),
            )
            await rowmac.stamp_host(tx, host_id)
            relabelled = host.model_copy(update={"labels": labels})
            serials = await _revoke_unentitled(tx, host, relabelled, now)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="host.label",
                object=f"host:{host_id}",
                details={"labels": labels, "previous": host.labels, "serials": list(serials)},
            )
        return await self.get(host_id)

    async def revoke(self, host_id: str, *, actor: str) -> Host:
        """Revoke a host: its key no longer authenticates and a ``host.revoked`` event goes out."""
        now = self._clock()
        async with self._store.write() as tx:
            host = await self._require(tx, host_id)
            if host.revoked:
                raise AlreadyExistsError(f"host {host_id} is already revoked")
            await tx.execute(
                "UPDATE hosts SET revoked = 1, revoked_at = ? WHERE id = ?",
                (format_time(now), host_id),
            )
            await rowmac.stamp_host(tx, host_id)
            serials = await revoke_certificates(
                tx, now=now, reason=RevocationReason.PRIVILEGE_WITHDRAWN, host_id=host_id
            )
            revoked = HostRevoked(
                host=host_id,
                signer_key_id=signer_key_id(host.identity_public_key),
                serials=serials,
            )
            event = await outbox.add_event(tx, partition_key=host_id, data=revoked, now=now)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="host.revoke",
                object=f"host:{host_id}",
                details={
                    "event_id": event.event_id,
                    "event_seq": event.seq,
                    "serials": list(serials),
                },
            )
        log.info("host %s revoked by %s", host_id, actor)
        if self.on_revoked is not None:
            self.on_revoked(host_id)
        return await self.get(host_id)

    async def touch(self, host_id: str, reported: list[dict[str, object]] | None = None) -> None:
        """Record that the host was seen now (and what it reported holding, digests only)."""
        async with self._store.write() as tx:
            await self.record_seen(tx, host_id, reported)

    async def record_seen(
        self, tx: Transaction, host_id: str, reported: list[dict[str, object]] | None = None
    ) -> None:
        """:meth:`touch` inside the caller's transaction."""
        now = format_time(self._clock())
        mac = rowmac.seen_mac(tx.row_key, host_id, now)  # a rollout's gate reads it
        if reported is None:
            await tx.execute_later(
                "UPDATE hosts SET last_seen_at = ?, seen_mac = ? WHERE id = ?",
                (now, mac, host_id),
            )
        else:
            # The report carries its own time: drift is only judged on a report newer than
            # the host's last ack (a heartbeat from before a rotation is not drift).
            report = {"at": now, "installed": reported}
            await tx.execute_later(
                "UPDATE hosts SET last_seen_at = ?, seen_mac = ?, reported = ? WHERE id = ?",
                (now, mac, json.dumps(report, sort_keys=True), host_id),
            )

    async def _require(self, r: Reader, host_id: str) -> Host:
        row = await r.fetchone("SELECT * FROM hosts WHERE id = ?", (host_id,))
        if row is None:
            raise NotFoundError(f"no host {host_id!r}")
        return _host_row(row, r.row_key)
