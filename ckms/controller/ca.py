"""The controller's internal CA: roots and signing intermediates, sealed; host certificates issued.

**What is kept.** One record, ``sealed.ca`` in ``meta``, sealed (AES-256-GCM) under the data
KEK, which the root KEK seals, exactly like key material: every CA *generation* (an ECDSA P-256
root, ``CN=ckms root <n>``, and the intermediate it signed, which signs host certificates),
with their private keys and certificates, and whether the generation is retired. Editing or
swapping the record makes it fail to open; nothing about the CA is stored in clear.

**Lifecycle.** ``ckms init`` creates generation 1 (and the first unseal of a home made before
the CA existed does, audited either way). ``ckms ca rotate`` adds a generation that signs from
then on while the previous one stays trusted (hosts' bundles hold both roots: the overlap);
``ckms ca retire`` drops every older generation from the bundle once hosts renewed. Each change
is audited and announced with a signed ``ca.rotated`` event, on which agents fetch the new
bundle with a sync.

**Issued certificates** are rows of ``certificates`` (serial, host, key, version, generation,
fingerprint, validity, revocation), each with a row MAC (``ckms.controller.rowmac``) checked
when read, so a DB file owner cannot clear a revocation and drop a serial from the CRL. The
CRL of each trusted generation lists the revoked serials that have not expired yet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from ckms._canonical import canonical_json, parse_canonical_json
from ckms.controller import rowmac
from ckms.controller.desired import desired_versions
from ckms.controller.keyview import AnyKey
from ckms.controller.models import Host, Key
from ckms.controller.targets import host_matches
from ckms.crypto import (
    CertificateAuthority,
    CertificateInfo,
    CertSubject,
    CertUsage,
    KeyType,
    build_crl,
    certificate_fingerprint,
    certificate_info,
    issue_certificate,
    join_certificates,
    new_intermediate_ca,
    new_root_ca,
    parse_serial,
    public_key_fingerprint,
    row_mac,
    row_mac_matches,
)
from ckms.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    PolicyError,
    SealedError,
)
from ckms.protocol import CA_SUBJECT, CaRotated, RevocationReason, render_tls_names
from ckms.store import Reader, Store, Transaction, format_time, outbox, parse_time
from ckms.store import audit as audit_log

if TYPE_CHECKING:
    from ckms.controller.sealing import Vault

__all__ = [
    "CA_RECORD",
    "COMPROMISE_REASONS",
    "CaGeneration",
    "CaState",
    "ControllerCA",
    "IssuedCertificate",
    "Overdue",
    "entitled_names",
    "new_ca_state",
    "revoke_certificates",
]

log = logging.getLogger(__name__)

CA_RECORD: Final = "sealed.ca"
ROOT_LIFETIME: Final = timedelta(days=10 * 365)
ISSUING_LIFETIME: Final = timedelta(days=2 * 365)
CRL_LIFETIME: Final = timedelta(days=7)
CA_PARTITION: Final = CA_SUBJECT
TLS_CERT: Final = "tls-cert"
KAFKA_CLIENT: Final = "kafka-client"
"""The two kinds of certificates the CA issues hosts: a ``tls-cert`` key's, and the agent's own
Kafka client certificate (``CN=<host>,OU=ckms-agent``)."""


@dataclass(frozen=True)
class CaGeneration:
    """One root and the intermediate it signed."""

    generation: int
    root: CertificateAuthority = field(repr=False)
    issuing: CertificateAuthority = field(repr=False)
    created_at: str
    retired: bool = False

    def _dump(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "root_key": base64.b64encode(self.root.key).decode(),
            "root_cert": self.root.certificate.decode(),
            "issuing_key": base64.b64encode(self.issuing.key).decode(),
            "issuing_cert": self.issuing.certificate.decode(),
            "created_at": self.created_at,
            "retired": self.retired,
        }

    @classmethod
    def _load(cls, value: dict[str, Any]) -> CaGeneration:
        return cls(
            generation=int(value["generation"]),
            root=CertificateAuthority(
                base64.b64decode(value["root_key"]), value["root_cert"].encode()
            ),
            issuing=CertificateAuthority(
                base64.b64decode(value["issuing_key"]), value["issuing_cert"].encode()
            ),
            created_at=str(value["created_at"]),
            retired=bool(value["retired"]),
        )


@dataclass(frozen=True)
class CaState:
    """Every CA generation; the newest signs, every one not retired is trusted."""

    generations: tuple[CaGeneration, ...]

    @property
    def active(self) -> CaGeneration:
        """The generation that signs new certificates."""
        return self.generations[-1]

    @property
    def trusted(self) -> tuple[CaGeneration, ...]:
        """The generations whose roots hosts trust (newest first)."""
        return tuple(g for g in reversed(self.generations) if not g.retired)

    def bundle(self) -> bytes:
        """The PEM trust bundle: every trusted root, newest first."""
        return join_certificates(*(g.root.certificate for g in self.trusted))

    def encode(self) -> bytes:
        """The record's plaintext (sealed before it is stored)."""
        return canonical_json({"v": 1, "generations": [g._dump() for g in self.generations]})

    @classmethod
    def decode(cls, data: bytes) -> CaState:
        """Read a record's plaintext (after it opened, so it is what the controller wrote)."""
        value = parse_canonical_json(data)
        return cls(tuple(CaGeneration._load(g) for g in value["generations"]))


_CA_ACTIONS: Final = ("controller.init", "ca.create", "ca.rotate", "ca.retire")


async def _check_against_audit(r: Reader | Transaction, state: CaState) -> None:
    """Refuse a CA record that is not the one the audit log's newest CA change made.

    The record is sealed and bound to its name, so it cannot be edited -- but an older copy of
    it (from a backup, or read before a rotation) opens just as well. Written back, it would
    trust a retired root again and sign with a rotated-away intermediate. The audit log is
    hash-chained, checkpointed and anchored outside the database, so its newest ``ca.*``
    record says which generation signs and which are trusted; the record must agree."""
    row = await r.fetchone(
        f"SELECT action, details FROM audit WHERE action IN ({', '.join('?' * len(_CA_ACTIONS))}) "  # noqa: S608
        "ORDER BY idx DESC LIMIT 1",
        _CA_ACTIONS,
    )
    if row is None:
        return  # a store whose CA change left no record (made before CA audits existed)
    details = json.loads(str(row["details"]))
    action = str(row["action"])
    active = state.active
    trusted = [g.generation for g in state.trusted]
    if action == "controller.init":
        want = {"generation": 1, "trusted": [1], "root": details.get("ca_root")}
    elif action == "ca.retire":
        want = {"generation": max(details["trusted"]), "trusted": details["trusted"]}
    else:
        want = {
            "generation": details["generation"],
            "trusted": details.get("trusted", [details["generation"]]),
            "root": details["root"],
            "issuing": details["issuing"],
        }
    have = {
        "generation": active.generation,
        "trusted": trusted,
        "root": certificate_fingerprint(active.root.certificate),
        "issuing": certificate_fingerprint(active.issuing.certificate),
    }
    if any(value is not None and have[name] != value for name, value in want.items()):
        raise IntegrityError(
            f"the CA record is not the one the audit log's newest CA change ({action}) made: "
            "an older copy was written back"
        )


ISSUED_RECORD: Final = "ca.issued"
_TALLY_MOD: Final = 1 << 256


@dataclass(frozen=True)
class IssuedTally:
    """How many certificates the CA issued and the sum (mod 2^256) of their serials' SHA-256;
    how many it revoked and the sum of their (serial, reason)'s SHA-256.

    Row MACs catch a row edited, not one deleted, nor an older copy of a row (its MAC is the
    controller's own) written back: a revoked row deleted from the file would drop its serial
    from the CRL, and the row as it was before its revocation would undo it. The tally is kept
    in ``meta`` under a MAC (row key), bumped in the transaction that issues or revokes, and
    each ``cert.issue`` and ``cert.revoke`` audit record names the count it reached. The CRL
    recomputes it from every row, so a deleted row, a revocation undone or its reason changed
    (or a row and an older tally put back, which the audit log's counts refuse; cutting the
    audit log too is caught against its anchor) fails instead of vanishing."""

    count: int
    total: int
    revoked: int | None = 0
    """None in a tally sealed before revocations were tallied (taken from the rows once)."""
    revoked_total: int = 0
    compromised: frozenset[str] | None = frozenset()
    """None in a tally sealed before compromised keys were kept (taken from the rows once).
    The SHA-256 of every public key revoked for a compromise: issuing reads it (it does not
    scan the table), so a row written back as it was before its compromise does not let its
    key pair be certified again."""

    @staticmethod
    def of_serial(serial: str) -> int:
        """One serial's share of :attr:`total`."""
        return int.from_bytes(hashlib.sha256(serial.encode("ascii")).digest(), "big")

    @staticmethod
    def of_revocation(serial: str, reason: str | None) -> int:
        """One revoked certificate's share of :attr:`revoked_total`."""
        text = f"{serial}\x00{reason or ''}".encode("ascii")
        return int.from_bytes(hashlib.sha256(text).digest(), "big")

    @classmethod
    def of_rows(cls, rows: Iterable[Any]) -> IssuedTally:
        """The tally of ``rows`` (serial, revoked_at, revocation_reason) as they are."""
        count = total = revoked = revoked_total = 0
        compromised: set[str] = set()
        for row in rows:
            count += 1
            total = (total + cls.of_serial(str(row["serial"]))) % _TALLY_MOD
            if row["revoked_at"] is not None:
                revoked += 1
                share = cls.of_revocation(str(row["serial"]), row["revocation_reason"])
                revoked_total = (revoked_total + share) % _TALLY_MOD
                if row["revocation_reason"] in COMPROMISE_REASONS and row["public_key_sha256"]:
                    compromised.add(str(row["public_key_sha256"]))
        return cls(count, total, revoked, revoked_total, frozenset(compromised))

    def add(self, serial: str) -> IssuedTally:
        """The tally with one more certificate."""
        return replace(
            self, count=self.count + 1, total=(self.total + self.of_serial(serial)) % _TALLY_MOD
        )

    def revoke(
        self, serial: str, reason: str, *, was: str | None = None, public_key: str | None = None
    ) -> IssuedTally:
        """The tally with ``serial`` revoked for ``reason`` (``was``: its reason until now,
        when it was revoked already and only its reason changes; ``public_key``: its key's
        SHA-256, kept when the reason is a compromise)."""
        assert self.revoked is not None  # _stored_tally fills a tally sealed before
        compromised = self.compromised
        assert compromised is not None  # as revoked
        if public_key and reason in COMPROMISE_REASONS:
            compromised = compromised | {public_key}
        share = self.of_revocation(serial, reason)
        if was is None:
            return replace(
                self,
                revoked=self.revoked + 1,
                revoked_total=(self.revoked_total + share) % _TALLY_MOD,
                compromised=compromised,
            )
        old = self.of_revocation(serial, was)
        return replace(
            self,
            revoked_total=(self.revoked_total - old + share) % _TALLY_MOD,
            compromised=compromised,
        )

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"count": self.count, "total": format(self.total, "064x")}
        if self.revoked is not None:
            fields["revoked"] = self.revoked
            fields["revoked_total"] = format(self.revoked_total, "064x")
            if self.compromised is not None:
                fields["compromised"] = sorted(self.compromised)
        return fields

    def seal(self, row_key: bytes) -> bytes:
        """The meta value: the tally and its MAC."""
        mac = row_mac(row_key, "meta", ISSUED_RECORD, self._fields())
        return canonical_json({**self._fields(), "mac": mac})

    @classmethod
    def open(cls, row_key: bytes, blob: bytes) -> IssuedTally:
        """Read a meta value (IntegrityError if it is not one the controller wrote)."""
        try:
            value = parse_canonical_json(blob)
            revoked = value.get("revoked")
            tally = cls(
                int(value["count"]),
                int(str(value["total"]), 16),
                None if revoked is None else int(revoked),
                int(str(value.get("revoked_total", "0")), 16),
                None
                if value.get("compromised") is None
                else frozenset(str(k) for k in value["compromised"]),
            )
            ok = row_mac_matches(row_key, "meta", ISSUED_RECORD, tally._fields(), value["mac"])
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise IntegrityError("the CA's tally of issued certificates failed integrity check")
        return tally


async def _audited(r: Reader | Transaction) -> tuple[int | None, int | None, int | None]:
    """The issued, revoked and compromised-key counts the newest ``cert.issue`` or
    ``cert.revoke`` audit record names (None: none names one; records from before revocations
    were tallied name only the first)."""
    row = await r.fetchone(
        "SELECT details FROM audit WHERE action IN ('cert.issue', 'cert.revoke') "
        "ORDER BY idx DESC LIMIT 1"
    )
    if row is None:
        return None, None, None
    details = json.loads(str(row["details"]))
    counts = (details.get(name) for name in ("issued", "revoked", "compromised"))
    issued, revoked, compromised = (None if c is None else int(c) for c in counts)
    return issued, revoked, compromised


_TALLIED = "SELECT serial, revoked_at, revocation_reason, public_key_sha256 FROM certificates"


async def _stored_tally(r: Reader | Transaction, rows: list[Any] | None = None) -> IssuedTally:
    """The stored tally, checked against the audit log and, given ``rows`` (every certificate
    row), against the table (the CRL's check; issuing and revoking only bump the checked tally,
    so they cost no scan of the table).

    A store from before the tally has none: its rows are taken as they are, once (the first
    issue stores it), unless the audit log shows a tally existed (then it was deleted); a tally
    from before revocations were tallied takes its revocations from the rows the same way."""
    row_key = r.row_key
    if row_key is None:
        raise SealedError("controller is sealed: cannot check the CA's issued certificates")
    blob = await r.get_meta(ISSUED_RECORD)
    audited, audited_revoked, audited_compromised = await _audited(r)
    if blob is None:
        if audited is not None or audited_revoked is not None:
            raise IntegrityError(
                "the CA's tally of issued certificates was deleted (the audit log counts "
                f"{audited or 0}): certificate rows may have been deleted"
            )
        return IssuedTally.of_rows(rows if rows is not None else await r.fetchall(_TALLIED))
    stored = IssuedTally.open(row_key, blob)
    if stored.revoked is None or stored.compromised is None:
        if (audited_revoked is not None and stored.revoked is None) or (
            audited_compromised is not None and stored.compromised is None
        ):
            raise IntegrityError(
                "the CA's tally is older than the revocations the audit log counts: an older "
                "copy was written back"
            )
        revoked = rows
        if revoked is None:
            revoked = await r.fetchall(_TALLIED + " WHERE revoked_at IS NOT NULL")
        tallied = IssuedTally.of_rows(revoked)
        if stored.revoked is None:
            stored = replace(
                stored, revoked=tallied.revoked, revoked_total=tallied.revoked_total
            )
        if stored.compromised is None:
            stored = replace(stored, compromised=tallied.compromised)
    have = stored if rows is None else IssuedTally.of_rows(rows)
    if (stored.count, stored.total) != (have.count, have.total) or (
        audited is not None and audited != stored.count
    ):
        raise IntegrityError(
            f"certificate rows were deleted: the CA issued {max(stored.count, audited or 0)}, "
            f"the table holds {have.count} (or another set)"
        )
    if (
        stored != have
        or (audited_revoked is not None and audited_revoked != stored.revoked)
        or (
            audited_compromised is not None
            and audited_compromised != len(stored.compromised or ())
        )
    ):
        raise IntegrityError(
            "a certificate's revocation was undone or its reason changed (an older copy of "
            f"its row written back): the CA revoked {stored.revoked}, the table holds "
            f"{have.revoked} (or another set)"
        )
    return stored


def new_generation(number: int, now: datetime) -> CaGeneration:
    """A fresh ECDSA P-256 root and the intermediate it signs."""
    root = new_root_ca(f"ckms root {number}", lifetime=ROOT_LIFETIME, now=now)
    issuing = new_intermediate_ca(
        root, f"ckms issuing {number}", lifetime=ISSUING_LIFETIME, now=now
    )
    return CaGeneration(number, root, issuing, format_time(now))


def new_ca_state(now: datetime) -> CaState:
    """The CA of a new controller: generation 1."""
    return CaState((new_generation(1, now),))


@dataclass(frozen=True)
class Overdue:
    """A host certificate past its renewal point that was not renewed."""

    host: str
    key: str
    version: int
    serial: str
    not_after: datetime
    renew_at: datetime
    expired: bool


OVERDUE_MARGIN: Final = 1 / 6
"""How far past its renewal point (two thirds of the lifetime) a certificate is flagged: half
of what remains, so an operator has the other half to act before it expires."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate just issued to a host, with the chain and bundle it installs."""

    certificate: bytes
    chain: bytes
    bundle: bytes
    info: CertificateInfo


def _audit_generation(g: CaGeneration) -> dict[str, Any]:
    return {
        "generation": g.generation,
        "root": certificate_fingerprint(g.root.certificate),
        "issuing": certificate_fingerprint(g.issuing.certificate),
    }


class ControllerCA:
    """Opens, changes and signs with the sealed CA record (see the module docstring)."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault
        self._bundle: bytes | None = None
        self._checked: bytes | None = None

    async def _read(self, r: Reader | Transaction) -> CaState:
        blob = await r.get_meta(CA_RECORD)
        if blob is None:
            raise NotFoundError("the controller has no CA yet (it is made at init or unseal)")
        state = CaState.decode(self._vault.open_record(CA_RECORD, blob))
        if blob != self._checked:  # first read, or a record this process did not write
            await _check_against_audit(r, state)
            self._checked = blob
        return state

    async def state(self) -> CaState:
        """The CA as stored (needs the controller unsealed)."""
        self._vault.require_unsealed("use the CA")
        async with self._store.read() as r:
            return await self._read(r)

    async def bundle(self) -> bytes | None:
        """The trust bundle, or None while sealed or before the CA exists."""
        if self._vault.sealed:
            return None
        if self._bundle is None:  # every sync sends it: kept until this CA changes it
            try:
                self._bundle = (await self.state()).bundle()
            except NotFoundError:
                return None
        return self._bundle

    async def ensure(self, *, now: datetime, actor: str = "controller") -> bool:
        """Create generation 1 if this home has no CA yet (homes made before it); True if made."""
        async with self._store.write() as tx:
            if await tx.get_meta(CA_RECORD) is not None:
                return False
            state = new_ca_state(now)
            await tx.set_meta(CA_RECORD, self._vault.seal_record(CA_RECORD, state.encode()))
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="ca.create",
                object="ca",
                details=_audit_generation(state.active),
            )
        log.info("created the controller CA (generation 1)")
        return True

    async def _change(self, tx: Transaction, state: CaState, *, now: datetime) -> None:
        self._bundle = None
        blob = self._vault.seal_record(CA_RECORD, state.encode())
        await tx.set_meta(CA_RECORD, blob)
        self._checked = blob  # its audit record follows in this transaction
        event = CaRotated(
            generation=state.active.generation,
            trusted=tuple(certificate_fingerprint(g.root.certificate) for g in state.trusted),
            issuing=certificate_fingerprint(state.active.issuing.certificate),
        )
        await outbox.add_event(tx, partition_key=CA_PARTITION, data=event, now=now)

    async def rotate(self, *, now: datetime, actor: str) -> CaState:
        """Add a generation that signs from now on; the previous ones stay trusted (overlap)."""
        self._vault.require_unsealed("rotate the CA")
        async with self._store.write() as tx:
            state = await self._read(tx)
            fresh = new_generation(state.active.generation + 1, now)
            changed = CaState((*state.generations, fresh))
            await self._change(tx, changed, now=now)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="ca.rotate",
                object="ca",
                details={
                    **_audit_generation(fresh),
                    "trusted": [g.generation for g in changed.trusted],
                },
            )
        log.info("CA rotated to generation %d by %s", fresh.generation, actor)
        return changed

    async def retire(self, *, now: datetime, actor: str, force: bool = False) -> CaState:
        """Stop trusting every generation but the active one (the end of a rotation's overlap).

        Refused while a host's newest certificate (of a key, or its Kafka client certificate)
        is an unexpired, unrevoked one of a generation it would retire: the host has not
        renewed onto the new CA yet and its peers would stop trusting it at once. ``force``
        retires anyway.
        """
        self._vault.require_unsealed("retire CA generations")
        async with self._store.write() as tx:
            state = await self._read(tx)
            old = [g for g in state.generations[:-1] if not g.retired]
            if not old:
                raise PolicyError("no previous CA generation is trusted: nothing to retire")
            marks = ", ".join("?" * len(old))
            holders = await tx.fetchall(
                "SELECT DISTINCT c.host_id FROM certificates c WHERE c.revoked_at IS NULL "  # noqa: S608
                f"AND c.not_after > ? AND c.ca_generation IN ({marks}) AND NOT EXISTS ("
                "SELECT 1 FROM certificates n WHERE n.host_id = c.host_id AND n.kind = c.kind "
                "AND n.key_id IS NOT DISTINCT FROM c.key_id AND n.issued_at > c.issued_at) "
                "ORDER BY c.host_id",
                (format_time(now), *(g.generation for g in old)),
            )
            if holders and not force:
                hosts = [str(r["host_id"]) for r in holders]
                raise PolicyError(
                    f"{len(hosts)} hosts still hold certificates of the generation(s) to retire "
                    f"({', '.join(hosts[:10])}{', ...' if len(hosts) > 10 else ''}); wait until "
                    "they renewed (agents renew on the ca.rotated event) or retire with force"
                )
            changed = CaState(
                (*tuple(replace(g, retired=True) for g in state.generations[:-1]), state.active)
            )
            await self._change(tx, changed, now=now)
            await audit_log.append(
                tx,
                now=now,
                actor=actor,
                action="ca.retire",
                object="ca",
                details={
                    "retired": [g.generation for g in old],
                    "trusted": [g.generation for g in changed.trusted],
                    "forced_over_hosts": len(holders) if force else 0,
                },
            )
        log.info("CA generations %s retired by %s", [g.generation for g in old], actor)
        return changed

    async def issue(
        self,
        tx: Transaction,
        *,
        host_id: str,
        key_id: str | None,
        key_name: str | None,
        version: int,
        public_key: bytes,
        subject: CertSubject,
        dns_names: tuple[str, ...],
        ip_addresses: tuple[str, ...],
        lifetime: timedelta,
        usage: CertUsage,
        now: datetime,
    ) -> IssuedCertificate:
        """Sign a host's public key with the active intermediate and record it (row MAC, audit)
        in the caller's transaction: for a ``tls-cert`` key version, or (``key_id=None``) as
        the host's Kafka client certificate."""
        state = await self._read(tx)
        active = state.active
        key_fingerprint = public_key_fingerprint(public_key)
        await _refuse_compromised(tx, key_fingerprint)
        tally = await _stored_tally(tx)
        if key_fingerprint in (tally.compromised or ()):
            raise PermissionDeniedError(
                "this public key was in a certificate revoked for a compromise: make a new key "
                "pair"
            )
        pem = issue_certificate(
            active.issuing,
            public_key,
            subject,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            lifetime=lifetime,
            usage=usage,
            now=now,
        )
        info = certificate_info(pem)
        serial = info.serial_hex
        await tx.execute(
            "INSERT INTO certificates(serial, kind, host_id, key_id, version, ca_generation, "
            "fingerprint, not_before, not_after, issued_at, public_key_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                serial,
                KAFKA_CLIENT if key_id is None else TLS_CERT,
                host_id,
                key_id,
                version,
                active.generation,
                info.fingerprint,
                format_time(info.not_before),
                format_time(info.not_after),
                format_time(now),
                key_fingerprint,
            ),
        )
        await rowmac.stamp_certificate(tx, serial)
        tally = tally.add(serial)
        assert tx.row_key is not None  # checked by _stored_tally
        await tx.set_meta(ISSUED_RECORD, tally.seal(tx.row_key))
        await audit_log.append(
            tx,
            now=now,
            actor=f"host:{host_id}",
            action="cert.issue",
            object=f"key:{key_name}" if key_name is not None else f"host:{host_id}",
            details={
                "kind": KAFKA_CLIENT if key_id is None else TLS_CERT,
                "version": version,
                "serial": serial,
                "subject": info.subject,
                "dns_names": list(info.dns_names),
                "ip_addresses": list(info.ip_addresses),
                "not_after": format_time(info.not_after),
                "ca_generation": active.generation,
                "fingerprint": info.fingerprint,
                "public_key_sha256": key_fingerprint,
                "issued": tally.count,
                "revoked": tally.revoked,
                "compromised": len(tally.compromised or ()),
            },
        )
        return IssuedCertificate(pem, active.issuing.certificate, state.bundle(), info)

    async def crl(self, *, now: datetime) -> tuple[bytes, tuple[str, ...]]:
        """One CRL per trusted generation (PEM, concatenated), each listing that generation's
        revoked certificates that have not expired; numbered by time so each is newer."""
        state, every = await self._every_certificate()
        # Every row is checked before it is filtered: a WHERE on revoked_at or not_after would
        # skip, unchecked, a row whose revocation the file's owner cleared or backdated.
        rows = _unexpired_checked(self._store.row_key, every, now)
        by_generation: dict[int, list[tuple[int, datetime, str | None]]] = {}
        serials = []
        for row in rows:
            if row["revoked_at"] is None:
                continue
            serials.append(str(row["serial"]))
            by_generation.setdefault(int(row["ca_generation"]), []).append(
                (
                    parse_serial(str(row["serial"])),
                    parse_time(str(row["revoked_at"])),
                    row["revocation_reason"],
                )
            )
        number = int(now.timestamp() * 1000)
        pem = b"".join(
            build_crl(
                g.issuing,
                by_generation.get(g.generation, []),
                crl_number=number,
                next_update=CRL_LIFETIME,
                now=now,
            )
            for g in state.trusted
        )
        return pem, tuple(serials)

    async def _every_certificate(self) -> tuple[CaState, list[Any]]:
        """The CA and every certificate row, none deleted (the tally, :class:`IssuedTally`)."""
        self._vault.require_unsealed("use the CA")
        async with self._store.read() as r:
            state = await self._read(r)
            every = await r.fetchall("SELECT * FROM certificates ORDER BY serial")
            for row in every:  # an edited row is named as such, before the tally's verdict
                rowmac.check_certificate(r.row_key, row)
            await _stored_tally(r, every)
        return state, every

    async def check_issued(self) -> None:
        """IntegrityError unless every certificate row the CA issued is there, as it wrote it
        (``audit verify`` asks; the CRL checks the same before it lists anything)."""
        await self._every_certificate()

    async def overdue(
        self, keys: Iterable[AnyKey], hosts: Iterable[Host], now: datetime
    ) -> list[Overdue]:
        """The newest certificate of each (host, key version) that the host should still hold
        and did not renew by :data:`OVERDUE_MARGIN` past its renewal point: unless the host
        renews, it expires (or did)."""
        by_name = {k.name: k for k in keys}
        by_id = {h.id: h for h in hosts}
        newest: dict[tuple[str, str, int], dict[str, Any]] = {}
        for row in await self.latest():
            newest[(str(row["host_id"]), str(row["key_name"]), int(row["version"]))] = row
        out = []
        for (host_id, name, version), row in sorted(newest.items()):
            key, host = by_name.get(name), by_id.get(host_id)
            if key is None or host is None or host.revoked:
                continue
            if version not in {v.version for v in desired_versions(key, host)}:
                continue
            issued, not_after = parse_time(row["issued_at"]), parse_time(row["not_after"])
            lifetime = not_after - issued
            renew_at = issued + lifetime * 2 / 3
            if now < renew_at + lifetime * OVERDUE_MARGIN:
                continue
            out.append(
                Overdue(
                    host_id,
                    name,
                    version,
                    str(row["serial"]),
                    not_after,
                    renew_at,
                    now >= not_after,
                )
            )
        return out

    async def latest(self, host_id: str | None = None) -> list[dict[str, Any]]:
        """The newest unrevoked certificate of each (host, key, version), checked: what the
        fleet view and status show."""
        sql = (
            "SELECT c.*, k.name AS key_name FROM certificates c JOIN keys k ON k.id = c.key_id "
            "WHERE c.revoked_at IS NULL AND c.kind = 'tls-cert'"
        )
        args: tuple[Any, ...] = ()
        if host_id is not None:
            sql += " AND c.host_id = ?"
            args = (host_id,)
        rows = await self._store.fetchall(sql + " ORDER BY c.issued_at", args)
        newest: dict[tuple[str, str, int], dict[str, Any]] = {}
        for row in rows:
            rowmac.check_certificate(self._store.row_key, row)
            newest[(str(row["host_id"]), str(row["key_name"]), int(row["version"]))] = dict(row)
        return list(newest.values())


TlsNames = tuple[str, tuple[str, ...], tuple[str, ...]]
"""A certificate's (common name, DNS names, IP addresses)."""


def entitled_names(key: Key, host: Host) -> TlsNames | None:
    """The names ``host`` may have certified for ``key`` as both are now (None: none at all:
    not a ``tls-cert`` key, not a target, or a template the host's labels cannot fill).

    The one rule behind issuing and keeping: ``cert_sign`` issues exactly these names, and a
    change of targets, names or labels revokes each certificate whose host they no longer
    entitle to what it holds."""
    profile = key.install.tls
    if key.type is not KeyType.TLS_CERT or profile is None or not host_matches(key.targets, host):
        return None
    try:
        return render_tls_names(profile, key_name=key.name, host_id=host.id, labels=host.labels)
    except ConfigError:
        return None


COMPROMISE_REASONS: Final = frozenset(
    str(r) for r in RevocationReason if r.is_compromise
)
"""Revocation reasons after which a certificate's key pair is never certified again."""


async def _refuse_compromised(tx: Transaction, key_fingerprint: str) -> None:
    """Refuse to certify a public key that was in a certificate revoked for a compromise.

    Every row of that key is MAC-checked before its reason is read (a reason filtered in SQL
    would let a row whose reason was cleared in the file escape unchecked)."""
    rows = await tx.fetchall(
        "SELECT * FROM certificates WHERE public_key_sha256 = ? ORDER BY serial",
        (key_fingerprint,),
    )
    for row in rows:
        rowmac.check_certificate(tx.row_key, row)
        if row["revocation_reason"] in COMPROMISE_REASONS:
            raise PermissionDeniedError(
                f"this public key was certified in {row['serial']}, revoked for "
                f"{row['revocation_reason']}: make a new key pair"
            )


async def revoke_certificates(
    tx: Transaction,
    *,
    now: datetime,
    reason: RevocationReason,
    key_id: str | None = None,
    version: int | None = None,
    host_id: str | None = None,
    keep: Callable[[str, str], bool] | None = None,
) -> tuple[str, ...]:
    """Mark every unexpired, unrevoked certificate of a key version, of every version of a key
    (``keep`` given), or of a host revoked, for ``reason`` (RFC 5280's, on the CRL; after a
    compromise the key pair is never certified again); return their serials for the event and
    audit. A compromise also takes the certificates of that scope already revoked for another
    reason (reason changed, date kept) and those expired (revoked now): their serials are
    returned too.

    ``keep(host_id, key_id)`` spares the ``tls-cert`` certificates it is true for (those whose
    host is still entitled to them, :func:`entitled_names`); with ``keep`` given, certificates
    of no key (an agent's own Kafka client certificate) are never revoked."""
    if host_id is not None:
        where, args = "host_id = ?", (host_id,)
    elif key_id is not None and version is not None:
        where, args = "key_id = ? AND version = ?", (key_id, version)
    elif key_id is not None and keep is not None:
        where, args = "key_id = ?", (key_id,)
    else:
        raise ConfigError("revoke certificates of a key version or of a host")
    every = await tx.fetchall(
        f"SELECT * FROM certificates WHERE {where} ORDER BY serial",  # noqa: S608
        args,
    )
    rows = _unexpired_checked(tx.row_key, every, now)
    serials = []
    changes: list[tuple[str, str | None, str | None]] = []  # (serial, reason before, key)
    if reason.is_compromise:
        # A compromise found late reaches the certificates already out of use too: one
        # revoked before for another reason (a suspend, a relabel) takes this reason and
        # keeps its date, one expired is marked; so the CRL says why and the key pair is
        # never certified again (_refuse_compromised reads the reason).
        rows = every
        for row in every:
            if row["revoked_at"] is None or row["revocation_reason"] in COMPROMISE_REASONS:
                continue
            await tx.execute(
                "UPDATE certificates SET revocation_reason = ? WHERE serial = ?",
                (str(reason), row["serial"]),
            )
            await rowmac.stamp_certificate(tx, str(row["serial"]))
            serials.append(str(row["serial"]))
            changes.append(
                (str(row["serial"]), row["revocation_reason"] or "", row["public_key_sha256"])
            )
    for row in rows:
        if row["revoked_at"] is not None:
            continue
        if keep is not None and (
            row["key_id"] is None or keep(str(row["host_id"]), str(row["key_id"]))
        ):
            continue  # entitlement is a tls-cert key's: an agent's own certificate is not judged
        await tx.execute(
            "UPDATE certificates SET revoked_at = ?, revocation_reason = ? WHERE serial = ?",
            (format_time(now), str(reason), row["serial"]),
        )
        await rowmac.stamp_certificate(tx, str(row["serial"]))
        serials.append(str(row["serial"]))
        changes.append((str(row["serial"]), None, row["public_key_sha256"]))
    if changes:
        await _tally_revocations(tx, changes, str(reason), now)
    return tuple(serials)


async def _tally_revocations(
    tx: Transaction, changes: list[tuple[str, str | None, str | None]], reason: str, now: datetime
) -> None:
    """Bump the CA's tally for certificates just revoked (or whose reason just changed) and
    audit the count reached, so an older copy of a row (or of the tally) is refused."""
    tally = await _stored_tally(tx)
    for serial, was, public_key in changes:
        tally = tally.revoke(serial, reason, was=was, public_key=public_key)
    assert tx.row_key is not None  # checked by _stored_tally
    await tx.set_meta(ISSUED_RECORD, tally.seal(tx.row_key))
    await audit_log.append(
        tx,
        now=now,
        actor="controller",
        action="cert.revoke",
        object="ca",
        details={
            "reason": reason,
            "serials": [s for s, _, _ in changes],
            "issued": tally.count,
            "revoked": tally.revoked,
            "compromised": len(tally.compromised or ()),
        },
    )


def _unexpired_checked(row_key: bytes | None, rows: list[Any], now: datetime) -> list[Any]:
    """The rows that have not expired at ``now``, every one of ``rows`` MAC-checked first.

    Revocation and the CRL select by ``revoked_at`` and ``not_after``, which the row MAC
    covers; filtering in SQL would never check the rows it leaves out, so a row whose
    revocation was cleared or whose expiry was backdated in the file would silently escape.
    """
    for row in rows:
        rowmac.check_certificate(row_key, row)
    return [row for row in rows if parse_time(str(row["not_after"])) > now]
