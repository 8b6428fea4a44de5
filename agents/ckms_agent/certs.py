"""``tls-cert`` keys: a private key made here, certified by the controller's CA, renewed in time.

For each ``tls-cert`` key the controller lists for this host, :class:`CertKeeper` keeps one
certificate of the key's primary (else newest) version installed:

- **Issue.** A fresh ECDSA P-256 key is generated on this host; only a CSR (which names
  nothing: the controller decides every name from the key's install spec) goes to the
  controller, over the agent's own SSH connection (``cert_sign``). The reply is checked before
  anything is written: the certificate must be for this key and chain to the CA bundle.
- **Install.** Into the directory the install spec's path names, every file staged (written,
  owned, fsync'd under a temp name) before the first is renamed into place
  (:meth:`Installer.write_all`), with the spec's owner and mode: ``key.pem`` (PKCS#8),
  ``cert.pem``,
  ``chain.pem`` (intermediates), ``fullchain.pem`` (nginx ``ssl_certificate``, PostgreSQL
  ``ssl_cert_file``), ``combined.pem`` (certificate, chain and key: HAProxy ``crt``) and
  ``ca.pem`` (the roots: ``ssl_ca_file``). Then the reload and health hooks run; if they fail the
  previous files come back. A crash while writing leaves every old file in place; only a kill
  in the burst of renames can leave a mix, which the next pass sees (the files are not the
  ones it recorded) and re-issues. The directory itself is never replaced, so a service that
  bind-mounts it (a container) sees each renewal. The ack carries the certificate's serial
  and expiry.
- **Renew** at two thirds of the lifetime (from when it was received here), with a fresh key,
  and at once when the controller lists the key with other names than the certificate was
  issued under (a relabel changed a ``{label:NAME}``; the controller revoked the old one).
- **Stop.** When the controller no longer lists the version (revoked, host retargeted) or a
  revocation event names it, the files are removed (overwritten first), acked ``removed``,
  and renewal stops; the controller also refuses to sign for a revoked version or host.

The private key exists in this process only while it is written and in the key file; it is
never logged, sent or kept in the state DB (which holds serials, times and file hashes).

:class:`ClientCertKeeper` does the same for the agent's own Kafka client certificate
(``CN=<host>,OU=ckms-agent``, issued at enrollment): ``kafka/client.pem`` (certificate and
chain) and ``kafka/client.key`` in the state directory, renewed at two thirds of its lifetime
(``client_cert``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ckms.crypto import (
    CLOCK_SKEW,
    KeyType,
    build_csr,
    certificate_fingerprint,
    certificate_info,
    certificate_matches_key,
    chains_to,
    generate,
    join_certificates,
    private_key_pem,
    split_certificates,
)
from ckms.errors import CKMSError, ProtocolError, StoreError, TransportError
from ckms.protocol import (
    AckStatus,
    CertSignReply,
    CertSignRequest,
    ClientCertReply,
    ClientCertRequest,
    DesiredKey,
    DesiredVersion,
    InstalledVersion,
    InstallSpec,
    format_time,
    parse_time,
)
from ckms_agent.acks import AckWriter
from ckms_agent.files import digest_of, write_atomic
from ckms_agent.installer import Installer
from ckms_agent.state import AgentState

__all__ = [
    "CERT_FILES",
    "CertKeeper",
    "CertRecord",
    "ClientCertKeeper",
    "is_cert_key",
    "save_client_certificate",
]

log = logging.getLogger(__name__)

RENEW_AT: float = 2 / 3
"""Renew when this share of the lifetime has passed."""
RETRY_S = 30.0
"""After a failed issue, try again no sooner than this (or the next reconcile)."""
CERT_FILES = ("key.pem", "cert.pem", "chain.pem", "fullchain.pem", "combined.pem", "ca.pem")

Signer = Callable[[CertSignRequest], Awaitable[CertSignReply]]


def is_cert_key(entry: DesiredKey) -> bool:
    """Whether a desired key is a ``tls-cert`` (kept by :class:`CertKeeper`, not by KeyOps)."""
    return entry.key_type == KeyType.TLS_CERT.value


@dataclass(frozen=True)
class CertRecord:
    """One installed certificate: what it is for, when to renew, the files and their hashes."""

    key: str
    version: int
    digest: str
    directory: str
    serial: str
    not_after: str
    renew_at: float
    files: dict[str, str]
    spec: str
    names: str | None = None
    """The digest of the names the controller listed when this was issued (None: recorded
    before names were digested, or by a controller that sends none)."""

    @property
    def paths(self) -> list[Path]:
        """The files as they are on this host."""
        return [Path(p) for p in self.files]


class CertKeeper:
    """Issues, installs, renews and removes this host's ``tls-cert`` certificates."""

    def __init__(
        self,
        *,
        state: AgentState,
        installer: Installer,
        acks: AckWriter,
        host_id: str,
        bundle_path: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._installer = installer
        self._acks = acks
        self._host = host_id
        self._bundle_path = bundle_path
        self._clock = clock
        self._records: dict[str, CertRecord] = {}
        self._failed_at: dict[tuple[str, int], float] = {}
        self._specs: dict[str, InstallSpec] = {}

    async def load(self) -> None:
        """Read what was installed before this start, and sweep the temp files a crash
        mid-install left in each directory (the files there may still match the record, so no
        install would come to sweep them before the renewal; they hold a new private key)."""
        self._records = {
            name: CertRecord(**value)  # type: ignore[arg-type]
            for name, value in (await self._state.tls_certs()).items()
        }
        for record in self._records.values():
            self._installer.sweep(Path(record.directory), CERT_FILES)

    async def _save(self) -> None:
        await self._state.set_tls_certs({n: asdict(r) for n, r in self._records.items()})

    def renew_unless_issued_by(self, issuing: str) -> int:
        """Make every certificate not issued by the intermediate with fingerprint ``issuing``
        due now (a CA rotation); return how many."""
        count = 0
        for name, record in list(self._records.items()):
            if self._issuer_of(record) != issuing:
                self._records[name] = replace(record, renew_at=self._clock())
                count += 1
        return count

    def _issuer_of(self, record: CertRecord) -> str | None:
        """The fingerprint of the intermediate in an installed ``chain.pem`` (read like any
        key file, through the allowed root; None when unreadable)."""
        try:
            data = self._installer.read(Path(record.directory) / "chain.pem")
            first = split_certificates(data) if data else []
        except (OSError, CKMSError):
            return None
        return certificate_fingerprint(first[0]) if first else None

    def holds(self, key: str) -> bool:
        """Whether a certificate of ``key`` is installed here."""
        return key in self._records

    def next_renewal(self) -> float | None:
        """Epoch seconds of the soonest renewal due (None: nothing installed); one that failed
        is due again :data:`RETRY_S` after the failure."""
        return min(
            (
                max(r.renew_at, self._failed_at.get((r.key, r.version), 0.0) + RETRY_S)
                for r in self._records.values()
            ),
            default=None,
        )

    def installed(self) -> list[InstalledVersion]:
        """What the host reports holding: versions whose files are intact on disk."""
        return [
            InstalledVersion(key=r.key, version=r.version, digest=r.digest)
            for r in self._records.values()
            if self._installer.files_match({Path(p): h for p, h in r.files.items()})
        ]

    def save_bundle(self, bundle: str | None) -> None:
        """Keep the CA roots this host trusts (for services and clients that check peers)."""
        if not bundle:
            return
        data = bundle.encode("ascii")
        try:
            if self._bundle_path.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
        tmp = self._bundle_path.with_name(self._bundle_path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(self._bundle_path)
        log.info("host=%s trust bundle updated (%s)", self._host, self._bundle_path)

    async def reconcile(self, desired: Sequence[DesiredKey], sign: Signer) -> None:
        """Make the installed certificates match what the controller listed (one pass)."""
        wanted: dict[str, tuple[DesiredKey, DesiredVersion]] = {}
        for entry in desired:
            if not is_cert_key(entry) or not entry.versions:
                continue
            primary = [v for v in entry.versions if v.primary]
            wanted[entry.key] = (entry, primary[0] if primary else max(entry.versions, key=_v))
        for name in [n for n in self._records if n not in wanted]:
            await self.remove(name, reason="no longer desired for this host")
        for name, (entry, version) in sorted(wanted.items()):
            self._specs[name] = entry.install
            record = self._records.get(name)
            if record is not None and record.version != version.version:
                reason = f"version {version.version} replaces {record.version}"
            elif record is not None and entry.names not in (None, record.names):
                reason = "its names changed"
            elif record is not None and self._current(record, entry, version):
                continue
            else:
                reason = "renewal due" if record is not None else "no certificate yet"
            failed = self._failed_at.get((name, version.version))
            if failed is not None and self._clock() - failed < RETRY_S:
                continue
            await self._issue(entry, version, reason, sign)

    def _current(self, record: CertRecord, entry: DesiredKey, version: DesiredVersion) -> bool:
        """The record is for this version and spec, intact on disk, and not due for renewal."""
        return (
            record.digest == version.digest
            and record.spec == entry.install.model_dump_json()
            and (entry.names is None or record.names == entry.names)  # a relabel renamed it
            and self._clock() < record.renew_at
            and self._installer.files_match({Path(p): h for p, h in record.files.items()})
        )

    async def _issue(
        self, entry: DesiredKey, version: DesiredVersion, reason: str, sign: Signer
    ) -> None:
        started = time.monotonic()
        name = entry.key
        spec = entry.install
        log.info("key=%s host=%s: requesting a certificate (%s)", name, self._host, reason)
        private = generate(KeyType.ECDSA_P256)
        try:
            reply = await sign(
                CertSignRequest(
                    key=name, version=version.version, csr=build_csr(private, None).decode()
                )
            )
            files = self._files(entry, version.version, reply, private)
        except (TransportError, StoreError):
            raise
        except CKMSError as exc:
            self._failed_at[(name, version.version)] = self._clock()
            log.error("key=%s host=%s: no certificate: %s", name, self._host, exc)
            await self._acks.ack(
                name, version.version, AckStatus.FAILED, started=started, error=str(exc)
            )
            return
        record = self._records.get(name)
        previous = {Path(p): h for p, h in record.files.items()} if record else {}
        secret = private_key_pem(private)
        del private
        outcome = await self._installer.apply_files(name, spec, files, previous, secrets=[secret])
        if outcome.status is not AckStatus.INSTALLED:
            self._failed_at[(name, version.version)] = self._clock()
            await self._acks.ack(
                name,
                version.version,
                AckStatus.FAILED,
                started=started,
                hooks=outcome.hooks,
                error=outcome.error,
            )
            return
        self._failed_at.pop((name, version.version), None)
        received = self._clock()
        not_after = parse_time(reply.not_after).timestamp()
        self._records[name] = CertRecord(
            key=name,
            version=version.version,
            digest=version.digest,
            directory=str(next(iter(files)).parent),
            serial=reply.serial,
            not_after=reply.not_after,
            renew_at=received + RENEW_AT * max(0.0, not_after - received),
            files={str(p): digest_of(data) or "" for p, data in files.items()},
            spec=spec.model_dump_json(),
            names=entry.names,
        )
        await self._save()
        self.save_bundle(reply.ca_bundle)
        if record is not None and record.version != version.version:
            self._failed_at.pop((name, record.version), None)
        await self._acks.ack(
            name,
            version.version,
            AckStatus.INSTALLED,
            started=started,
            digest=version.digest,
            hooks=outcome.hooks,
            cert_serial=reply.serial,
            cert_not_after=reply.not_after,
        )
        log.info(
            "key=%s host=%s: certificate %s installed, valid until %s, renewal at %s",
            name,
            self._host,
            reply.serial,
            reply.not_after,
            format_time(datetime.fromtimestamp(self._records[name].renew_at, UTC)),
        )

    def _files(
        self, entry: DesiredKey, version: int, reply: CertSignReply, private: bytes
    ) -> dict[Path, bytes]:
        """The files to write, after checking the reply is a certificate of ``private`` that
        chains to the bundle (ProtocolError otherwise: nothing is written)."""
        cert, chain, bundle = (
            x.encode("ascii") for x in (reply.certificate, reply.chain, reply.ca_bundle)
        )
        if reply.key != entry.key or reply.version != version:
            raise ProtocolError("the controller answered for another key or version")
        try:
            info = certificate_info(cert)
            ok = certificate_matches_key(cert, private) and chains_to(cert, chain, bundle)
        except CKMSError:
            ok = False
        if not ok or info.serial_hex != reply.serial:
            raise ProtocolError("the controller sent a certificate that is not for this key")
        directory = self._installer.host_path(
            entry.install.render_path(entry.key, version, self._host)
        )
        key_pem = private_key_pem(private)
        fullchain = join_certificates(cert, chain)
        return {
            directory / "key.pem": key_pem,
            directory / "cert.pem": join_certificates(cert),
            directory / "chain.pem": join_certificates(chain),
            directory / "fullchain.pem": fullchain,
            directory / "combined.pem": fullchain + key_pem,
            directory / "ca.pem": join_certificates(bundle),
        }

    async def revoke(self, name: str, versions: Iterable[int], event_id: str) -> bool:
        """A signed event revoked ``versions``: remove the certificate if it is one of them."""
        record = self._records.get(name)
        if record is None or record.version not in set(versions):
            return False
        await self.remove(name, reason="revoked", event_id=event_id)
        return True

    async def remove(self, name: str, *, reason: str, event_id: str | None = None) -> None:
        """Remove one key's certificate files (key overwritten first), ack, forget it."""
        record = self._records.get(name)
        if record is None:
            return
        started = time.monotonic()
        outcome = await self._installer.remove(self._specs.get(name), record.paths)
        if outcome.status is AckStatus.REMOVED:
            del self._records[name]
            await self._save()
        log.warning(
            "key=%s host=%s: certificate %s removed (%s)", name, self._host, record.serial, reason
        )
        await self._acks.ack(
            name,
            record.version,
            outcome.status,
            started=started,
            hooks=outcome.hooks,
            event_id=event_id,
            error=outcome.error,
        )

    async def drop_everything(self, event_id: str) -> None:
        """The host was revoked: remove every certificate."""
        for name in list(self._records):
            await self.remove(name, reason="host revoked", event_id=event_id)


def _v(version: DesiredVersion) -> int:
    return version.version





def save_client_certificate(
    cert_path: Path, key_path: Path, private: bytes, certificate: str, bundle: str
) -> None:
    """Write the Kafka client key (0600) and certificate with its chain, after checking the
    certificate is for ``private`` and chains to ``bundle`` (ProtocolError otherwise).

    Both are complete and synced before either replaces its predecessor, and they are renamed
    one right after the other (key first), so a client loads a mismatched pair only if it
    reads in that instant, and then retries."""
    cert = certificate.encode("ascii")
    try:
        first = split_certificates(cert)
        ok = bool(first) and certificate_matches_key(first[0], private)
        ok = ok and chains_to(first[0], b"".join(first[1:]), bundle.encode("ascii"))
    except CKMSError:
        ok = False
    if not ok:
        raise ProtocolError("the controller sent a Kafka client certificate not for this key")
    write_atomic(key_path, private_key_pem(private), mode=0o600, dir_mode=0o700)
    write_atomic(cert_path, join_certificates(cert), mode=0o644, dir_mode=0o700)


ClientSigner = Callable[[ClientCertRequest], Awaitable[ClientCertReply]]


class _NoCertificate(Exception):
    """The certificate file holds no certificate."""


def _due(held: bytes, bundle: bytes) -> float | None:
    """When the certificate file ``held`` is due for renewal, None when it is unreadable or not
    the controller's CA's (``bundle``) to renew."""
    try:
        certs = split_certificates(held)
    except CKMSError:
        return None
    if not certs:
        raise _NoCertificate
    info = certificate_info(certs[0])
    issued = info.not_before + CLOCK_SKEW  # the CA backdates not_before by CLOCK_SKEW
    # Whether the controller's CA issued it, judged when it was issued: an expired one of
    # ours is renewed at once, not mistaken for another CA's.
    if not chains_to(certs[0], b"".join(certs[1:]), bundle, now=issued):
        return None
    return (issued + (info.not_after - issued) * RENEW_AT).timestamp()


class ClientCertKeeper:
    """Renews the agent's Kafka client certificate at two thirds of its lifetime.

    Only a certificate the controller's CA issued is renewed: files an operator put in place
    (another CA's) are left alone.
    """

    def __init__(
        self,
        *,
        cert_path: Path,
        key_path: Path,
        bundle_path: Path,
        host_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._bundle_path = bundle_path
        self._host = host_id
        self._clock = clock
        self._failed_at: float | None = None
        self._forced = False
        self._judged: tuple[bytes, bytes, float | None] | None = None
        """(bundle, certificate file, due) of the last certificate judged: parsing it and
        checking its chain cost ~0.2 ms, and every sync and renewal check asks."""

    def renew_unless_issued_by(self, issuing: str) -> bool:
        """Make the certificate due now unless the intermediate ``issuing`` issued it."""
        try:
            chain = split_certificates(self._cert_path.read_bytes())[1:]
        except (OSError, CKMSError):
            return False
        if chain and certificate_fingerprint(chain[0]) == issuing:
            return False
        self._forced = True
        return True

    def _retry_at(self) -> float:
        return self._clock() if self._failed_at is None else self._failed_at + RETRY_S

    def renew_at(self) -> float | None:
        """When the certificate is due for renewal (None: not this agent's to renew)."""
        try:
            bundle = self._bundle_path.read_bytes()
        except OSError:
            return None  # a controller without a CA
        try:
            held = self._cert_path.read_bytes()
        except FileNotFoundError:
            return self._retry_at()  # enrolled before the controller had a CA: get one
        except OSError:
            return None
        judged = self._judged
        if judged is not None and judged[0] == bundle and judged[1] == held:
            due = judged[2]
        else:
            try:
                due = _due(held, bundle)
            except _NoCertificate:
                return self._retry_at()
            self._judged = (bundle, held, due)
        if due is None:
            return None  # unreadable, or another CA's certificate: the operator's to renew
        if self._forced:
            due = min(due, self._clock())
        return due if self._failed_at is None else max(due, self._failed_at + RETRY_S)

    async def ensure(self, sign: ClientSigner) -> bool:
        """Renew the certificate if due; True when a new one was written."""
        due = self.renew_at()
        if due is None or self._clock() < due:
            return False
        private = generate(KeyType.ECDSA_P256)
        try:
            reply = await sign(ClientCertRequest(csr=build_csr(private, None).decode("ascii")))
            save_client_certificate(
                self._cert_path, self._key_path, private, reply.certificate, reply.ca_bundle
            )
        except (TransportError, StoreError):
            raise
        except CKMSError as exc:
            self._failed_at = self._clock()
            log.error("host=%s: Kafka client certificate not renewed: %s", self._host, exc)
            return False
        finally:
            del private
        self._failed_at = None
        self._forced = False
        log.info(
            "host=%s: Kafka client certificate %s installed, valid until %s",
            self._host,
            reply.serial,
            reply.not_after,
        )
        return True
