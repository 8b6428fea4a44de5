"""What the controller answers agents over SSH: enroll, sync, heartbeat, fetch, digest_key, ack.

``fetch`` is the only path by which key material leaves the controller: for a host that the
key targets, for a version in a distributable state, HPKE-wrapped to that host's wrapping key
with the key name, version and host id bound into the wrap, inside the SSH channel. Every other
request is refused with PermissionDeniedError and audited by the server's refusal hook; every
successful fetch is audited too, so the log shows which host received which version.

``cert_sign`` is the other way round: the host sends a CSR for a ``tls-cert`` key it is a
target of, the controller checks it (signature, key type, and that it asks for no name but those
the key's install spec renders for this host) and returns a certificate from the internal CA
with exactly those names. The host's private key never crosses the connection.

``ack`` carries a batch of the host's signed acks; :mod:`ckms.controller.acks` holds their rules
and applies them in the same group commits as ``sync`` and ``heartbeat``.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from ckms.controller import _repo
from ckms.controller.acks import AckService
from ckms.controller.ca import ControllerCA
from ckms.controller.desired import desired_versions, drifted_keys, released_to, targeting
from ckms.controller.hosts import HostRegistry
from ckms.controller.keyview import AnyKey, KeyView
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import DEFAULT_CERT_LIFETIME, Host, KeyState, Targets
from ckms.controller.sealing import Vault
from ckms.controller.targets import host_matches
from ckms.controller.transitions import is_distributable
from ckms.crypto import (
    CertSubject,
    CertUsage,
    CsrInfo,
    KeyType,
    SubjectRole,
    WrapSuite,
    join_certificates,
    load_csr,
    signer_key_id,
    subject_for,
    wrap_for_agent,
)
from ckms.errors import (
    CKMSError,
    ConfigError,
    IntegrityError,
    NotDistributableError,
    PermissionDeniedError,
    ProtocolError,
    StoreError,
)
from ckms.protocol import (
    AckReply,
    AckRequest,
    CertSignReply,
    CertSignRequest,
    ClientCertReply,
    ClientCertRequest,
    DesiredKey,
    DesiredVersion,
    DigestKeyReply,
    EnrollReply,
    EnrollRequest,
    FetchReply,
    FetchRequest,
    HeartbeatReply,
    InstalledVersion,
    InstallSpec,
    RemoveItem,
    Role,
    SyncReply,
    SyncRequest,
    format_time,
    render_tls_names,
    tls_names_digest,
)
from ckms.ssh import Principal, RpcServer
from ckms.store import Clock, GroupWriter, Store, Transaction, utc_now
from ckms.store import audit as audit_log

log = logging.getLogger(__name__)


def desired_keys(keys: list[KeyView], host: Host) -> list[DesiredKey]:
    """The keys (and their distributable versions) that belong on ``host``, as sync sends them."""
    out = []
    for key in targeting(keys, host):
        versions = tuple(
            DesiredVersion(
                version=v.version,
                state=v.state,
                primary=v.version == key.primary_version,
                digest=v.digest,
            )
            for v in desired_versions(key, host)
        )
        names = _names_digest(key, host)
        if not versions or (names is None and key.type is KeyType.TLS_CERT):
            continue  # a tls-cert key whose names this host's labels cannot fill: nothing
        out.append(
            DesiredKey(
                key=key.name,
                key_type=str(key.type),
                install=key.install,
                versions=versions,
                max_staleness_s=int(key.policy.max_staleness.total_seconds()),
                names=names,
            )
        )
    return out


def _names_digest(key: KeyView, host: Host) -> str | None:
    """The digest of the names ``host``'s certificate of a ``tls-cert`` key carries now."""
    profile = key.install.tls
    if key.type is not KeyType.TLS_CERT or profile is None:
        return None  # (a tls-cert key without a profile is refused at cert_sign)
    return tls_names_digest(profile, key_name=key.name, host_id=host.id, labels=host.labels)


class AgentService:
    """The agent-facing half of the controller's SSH endpoint."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        lifecycle: Lifecycle,
        hosts: HostRegistry,
        *,
        kafka_bootstrap: str,
        events_topic: str,
        reconcile_interval_s: int = 300,
        clock: Clock = utc_now,
        ca: ControllerCA | None = None,
        agent_cert_lifetime: timedelta = DEFAULT_CERT_LIFETIME,
    ) -> None:
        self._agent_cert_lifetime = agent_cert_lifetime
        self._store = store
        self._ca = ca if ca is not None else ControllerCA(store, vault)
        self._vault = vault
        self._lifecycle = lifecycle
        self._hosts = hosts
        self._bootstrap = kafka_bootstrap
        self._events_topic = events_topic
        self._reconcile_interval_s = reconcile_interval_s
        self._clock = clock
        self._group = GroupWriter(store)
        self.acks = AckService(store, self._group, clock=clock)
        """The hosts' acks: verified and applied in the same group commits as syncs."""

    def register(self, server: RpcServer) -> None:
        """Route the agent methods on ``server``."""
        server.route("enroll", self.enroll, roles={Role.ENROLL}, secret_params=True)
        server.route("sync", self.sync, roles={Role.AGENT})
        server.route("heartbeat", self.heartbeat, roles={Role.AGENT})
        server.route("fetch", self.fetch, roles={Role.AGENT})
        server.route("digest_key", self.digest_key, roles={Role.AGENT})
        server.route("cert_sign", self.cert_sign, roles={Role.AGENT})
        server.route("client_cert", self.client_cert, roles={Role.AGENT})
        server.route("ack", self.ack, roles={Role.AGENT})

    def _now(self) -> datetime:
        return self._clock()

    async def enroll(self, principal: Principal, params: dict[str, Any]) -> EnrollReply:
        """Record a new host (see :class:`HostRegistry.enroll`) and tell it what to pin."""
        request = EnrollRequest.model_validate(params)
        csr = None
        if request.kafka_csr is not None:
            try:  # before the token is spent: a bad CSR refuses the enrollment
                csr = load_csr(request.kafka_csr.encode("ascii"))
            except ConfigError as exc:
                raise PermissionDeniedError(f"enrollment refused: Kafka client {exc}") from None
        enrolled = await self._hosts.enroll(request, presented_key=principal.public_key)
        host = enrolled.host
        kafka_certificate = None
        if csr is not None and await self._ca.bundle() is not None:
            kafka_certificate = (await self._issue_client(host, csr)).certificate
        public = await self._vault.public_key()
        digest_key = self._vault.wrapped_digest_key(
            host.wrapping_public_key, host_id=host.id, suite=WrapSuite(request.wrap_suite)
        )
        return EnrollReply(
            host=host.id,
            labels=host.labels,
            controller_signing_key=base64.b64encode(public).decode(),
            controller_key_id=signer_key_id(public),
            kafka_bootstrap=self._bootstrap,
            events_topic=self._events_topic,
            event_seq=enrolled.event_seq,
            digest_key=base64.b64encode(digest_key).decode(),
            ca_bundle=_text(await self._ca.bundle()) if request.kafka_csr is not None else None,
            kafka_certificate=kafka_certificate,
        )

    async def client_cert(self, principal: Principal, params: dict[str, Any]) -> ClientCertReply:
        """Renew the host's Kafka client certificate (``CN=<host>,OU=ckms-agent``)."""
        request = ClientCertRequest.model_validate(params)
        host, _ = await self._host(principal)
        try:
            csr = load_csr(request.csr.encode("ascii"))
        except ConfigError as exc:
            raise PermissionDeniedError(f"client certificate refused: {exc}") from None
        return await self._issue_client(host, csr)

    async def _issue_client(self, host: Host, csr: CsrInfo) -> ClientCertReply:
        """Issue ``host`` its Kafka client certificate for the key ``csr`` proves. The subject
        is the host's own, whatever the CSR asks; a CSR naming anyone else is refused."""
        subject = subject_for(SubjectRole.AGENT, host.id)
        asked = (csr.common_name, csr.organizational_unit)
        if asked not in ((None, None), (host.id, SubjectRole.AGENT.value)) or (
            csr.dns_names or csr.ip_addresses
        ):
            raise PermissionDeniedError(
                f"host {host.id} may not claim {asked} or names in its Kafka client "
                f"certificate; it gets {subject.rfc4514()}"
            )
        now = self._now()
        async with self._store.write() as tx:
            revoked = await tx.fetchval("SELECT revoked FROM hosts WHERE id = ?", (host.id,))
            if revoked is None or revoked:
                raise PermissionDeniedError(f"host {host.id} is revoked")
            await _check_issue_rate(tx, host.id, None, 0, now)
            issued = await self._ca.issue(
                tx,
                host_id=host.id,
                key_id=None,
                key_name=None,
                version=0,
                public_key=csr.public_key,
                subject=subject,
                dns_names=(),
                ip_addresses=(),
                lifetime=self._agent_cert_lifetime,
                usage=CertUsage.CLIENT,
                now=now,
            )
        log.info(
            "host %s: issued Kafka client certificate %s (until %s)",
            host.id,
            issued.info.serial_hex,
            format_time(issued.info.not_after),
        )
        return ClientCertReply(
            certificate=join_certificates(issued.certificate, issued.chain).decode("ascii"),
            ca_bundle=issued.bundle.decode("ascii"),
            serial=issued.info.serial_hex,
            not_after=format_time(issued.info.not_after),
        )

    async def digest_key(self, principal: Principal, params: dict[str, Any]) -> DigestKeyReply:
        """The fleet's digest key wrapped to the asking host (agents enrolled before digests
        were keyed ask once; newer ones got it with their enrollment)."""
        if params:
            raise ProtocolError("digest_key takes no parameters")
        host, suite = await self._host(principal)
        wrapped = self._vault.wrapped_digest_key(
            host.wrapping_public_key, host_id=host.id, suite=suite
        )
        return DigestKeyReply(suite=str(suite), wrapped=base64.b64encode(wrapped).decode())

    async def _host(self, principal: Principal) -> tuple[Host, WrapSuite]:
        # While sealed, rows are not checked (rowmac): no host acts on what they say.
        self._vault.require_unsealed("answer a host")
        host, suite = await self._hosts.identity(principal.name)
        if host.revoked:
            raise PermissionDeniedError(f"host {host.id} is revoked")
        return host, WrapSuite(suite)

    async def sync(self, principal: Principal, params: dict[str, Any]) -> SyncReply:
        """The host's desired state, what it reported holding that it must remove, and the
        material of the versions it asked to fetch along (those it may have)."""
        request = SyncRequest.model_validate(params)
        host, suite = await self._host(principal)
        keys = await self._keys_knowing(request.fetch)
        desired = desired_keys(list(keys.values()), host)
        wanted = {(d.key, v.version) for d in desired for v in d.versions}
        extra: dict[str, set[int]] = {}
        for item in request.installed:
            if (item.key, item.version) not in wanted:
                extra.setdefault(item.key, set()).add(item.version)
        rows = await self._store.fetchall(
            "SELECT k.name, f.version FROM fleet_state f JOIN keys k ON k.id = f.key_id "
            "WHERE f.host_id = ? AND f.status = 'installed'",
            (host.id,),
        )
        for row in rows:
            if (row["name"], row["version"]) not in wanted:
                extra.setdefault(row["name"], set()).add(int(row["version"]))
        material: list[FetchReply] = []
        refused: list[tuple[FetchRequest, CKMSError]] = []
        for item in dict.fromkeys(request.fetch):
            wanted_key = keys.get(item.key)
            if wanted_key is not None and wanted_key.type is KeyType.TLS_CERT:
                continue  # an event woke the host; it asks for a certificate, not material
            if (item.key, item.version) not in wanted and _withheld(wanted_key, item, host):
                # The rotation's event woke every targeted host, and each asks for the new
                # version along; its rollout has not released it here. Not a refusal to audit
                # per host (a rollout would write one per host of the fleet): the reply does not
                # list the version, and a fetch of it is refused and audited.
                continue
            try:
                material.append(await self._wrap(host, suite, keys, item))
            except StoreError:
                raise
            except CKMSError as exc:
                # Left out, and the rest of the sync still answered (one bad version must not
                # stop a host from syncing); the agent's own fetch of it gets the reason.
                log.info("host %s sync: not sending %s v%d: %s", host.id, *_item(item), exc)
                refused.append((item, exc))
        reported = [i.model_dump() for i in request.installed]

        granted = list(material)

        async def record(tx: Transaction) -> None:
            # May run twice (once in a group that failed): start from what was granted.
            material.clear()
            await self._hosts.record_seen(tx, host.id, reported)
            for reply in granted:
                try:
                    await self._recheck(tx, host, reply)
                except PermissionDeniedError as exc:
                    await self._audit_fetch(tx, host, reply.key, reply.version, refused=exc)
                    continue
                await self._audit_fetch(tx, host, reply.key, reply.version, suite=reply.suite)
                material.append(reply)
            for item, exc in refused:
                await self._audit_fetch(tx, host, item.key, item.version, refused=exc)

        await self._group.write(record)
        return SyncReply(
            host=host.id,
            keys=tuple(desired),
            remove=tuple(
                RemoveItem(key=name, versions=tuple(sorted(vs)))
                for name, vs in sorted(extra.items())
            ),
            controller_time=format_time(self._now()),
            reconcile_interval_s=self._reconcile_interval_s,
            material=tuple(material),
            ca_bundle=_text(await self._ca.bundle()) if request.want_ca_bundle else None,
        )

    async def heartbeat(self, principal: Principal, params: dict[str, Any]) -> HeartbeatReply:
        """Record what the host holds and say which keys differ from what it should hold."""
        request = SyncRequest.model_validate(params)
        host, _ = await self._host(principal)
        keys = await self._lifecycle.current_keys()
        drift = drifted_keys(
            keys.values(), host, ((i.key, i.version, i.digest) for i in request.installed)
        )
        drift += await self._revoked_certificates(host, keys, request.installed, drift)
        reported = [i.model_dump() for i in request.installed]

        async def record(tx: Transaction) -> None:
            await self._hosts.record_seen(tx, host.id, reported)

        await self._group.write(record)
        if drift:
            log.info("host %s drifts on %s", host.id, ", ".join(drift))
        return HeartbeatReply(drift=tuple(drift), controller_time=format_time(self._now()))

    async def _revoked_certificates(
        self,
        host: Host,
        keys: Mapping[str, KeyView],
        installed: Iterable[InstalledVersion],
        drift: list[str],
    ) -> list[str]:
        """The ``tls-cert`` keys the host reports holding a version of, as it should, whose
        certificates of that version were all revoked (a relabel that changed its names):
        drift, so the host syncs now and re-issues instead of at its next reconcile."""
        held = {
            (i.key, i.version)
            for i in installed
            if i.key not in drift
            and (key := keys.get(i.key)) is not None
            and key.type is KeyType.TLS_CERT
        }
        if not held:
            return []
        rows = await self._store.fetchall(
            "SELECT k.name, c.version FROM certificates c JOIN keys k ON k.id = c.key_id "
            "WHERE c.host_id = ? AND c.revoked_at IS NULL AND c.not_after > ?",
            (host.id, format_time(self._now())),
        )
        live = {(str(r["name"]), int(r["version"])) for r in rows}
        return sorted({name for name, version in held - live})

    async def ack(self, principal: Principal, params: dict[str, Any]) -> AckReply:
        """Apply a batch of the host's own signed acks; the reply (sent after the commit) says
        which are durable here, so the host forgets exactly those."""
        request = AckRequest.model_validate(params)
        host, _ = await self._host(principal)
        return await self.acks.submit(host, request)

    async def fetch(self, principal: Principal, params: dict[str, Any]) -> FetchReply:
        """One version's material, wrapped for the asking host, if it may have it."""
        request = FetchRequest.model_validate(params)
        host, suite = await self._host(principal)
        reply = await self._wrap(host, suite, await self._keys_knowing((request,)), request)

        async def record(tx: Transaction) -> None:
            await self._recheck(tx, host, reply)
            await self._audit_fetch(tx, host, reply.key, reply.version, suite=reply.suite)

        await self._group.write(record)
        return reply

    async def cert_sign(self, principal: Principal, params: dict[str, Any]) -> CertSignReply:
        """Certify the host's own key for a ``tls-cert`` version it is a target of, with the
        names the key's install spec renders for it; refuse a CSR asking for anything else."""
        request = CertSignRequest.model_validate(params)
        host, _ = await self._host(principal)
        key = (await self._lifecycle.current_keys()).get(request.key)
        what = f"{request.key} v{request.version}"
        if key is None or key.type is not KeyType.TLS_CERT or key.install.tls is None:
            raise PermissionDeniedError(f"host {host.id} may not get a certificate for {what}")
        if not host_matches(key.targets, host):
            raise PermissionDeniedError(f"host {host.id} is not a target of {key.name}")
        try:
            version = key.version(request.version)
        except CKMSError:
            raise PermissionDeniedError(f"{what}: no such version") from None
        if not is_distributable(version.state, has_material=version.has_material):
            raise PermissionDeniedError(f"{what} is {version.state}: no certificates for it")
        if not released_to(key, version, host):
            raise PermissionDeniedError(
                f"host {host.id} may not get a certificate for {what}: its rollout has not "
                "released it to this host"
            )
        profile = key.install.tls
        try:
            cn, dns, ips = render_tls_names(
                profile, key_name=key.name, host_id=host.id, labels=host.labels
            )
            csr = load_csr(request.csr.encode("ascii"))
        except ConfigError as exc:
            raise PermissionDeniedError(f"certificate for {what} refused: {exc}") from None
        claimed = {*csr.dns_names, *csr.ip_addresses} - {*dns, *ips}
        if csr.common_name not in (None, cn) or csr.organizational_unit is not None:
            claimed.add(f"subject CN={csr.common_name},OU={csr.organizational_unit}")
        if claimed:
            raise PermissionDeniedError(
                f"host {host.id} may not claim {sorted(claimed)} in a certificate for {what}; "
                f"it may have CN={cn} and {sorted({*dns, *ips})}"
            )
        now = self._now()
        async with self._store.write() as tx:
            await self._recheck_cert(tx, host, key.name, version.version, (cn, dns, ips))
            await _check_issue_rate(tx, host.id, key.id, version.version, now)
            issued = await self._ca.issue(
                tx,
                host_id=host.id,
                key_id=key.id,
                key_name=key.name,
                version=version.version,
                public_key=csr.public_key,
                subject=CertSubject(cn),
                dns_names=dns,
                ip_addresses=ips,
                lifetime=key.policy.effective_cert_lifetime,
                usage=CertUsage(profile.usage),
                now=now,
            )
        log.info(
            "host %s: issued certificate %s for %s (until %s)",
            host.id,
            issued.info.serial_hex,
            what,
            format_time(issued.info.not_after),
        )
        return CertSignReply(
            key=key.name,
            version=version.version,
            certificate=issued.certificate.decode("ascii"),
            chain=issued.chain.decode("ascii"),
            ca_bundle=issued.bundle.decode("ascii"),
            serial=issued.info.serial_hex,
            not_after=format_time(issued.info.not_after),
        )

    async def _recheck_cert(
        self,
        tx: Transaction,
        host: Host,
        key: str,
        version: int,
        names: tuple[str, tuple[str, ...], tuple[str, ...]],
    ) -> None:
        """In the transaction that issues: refuse if the version or host was revoked, the key
        retargeted away from the host, or its names changed (new labels or name templates)
        since the request was authorized: a change commits either before the certificate (and
        refuses it) or after it (and revokes it)."""
        row = await tx.fetchone(
            "SELECT v.state, k.targets, k.install, h.revoked AS host_revoked, "
            "h.labels AS host_labels "
            "FROM key_versions v JOIN keys k ON k.id = v.key_id LEFT JOIN hosts h ON h.id = ? "
            "WHERE k.name = ? AND v.version = ?",
            (host.id, key, version),
        )
        if row is None or row["host_revoked"] is None or row["host_revoked"]:
            raise PermissionDeniedError(f"host {host.id}: {key} v{version} revoked meanwhile")
        if not is_distributable(KeyState(row["state"]), has_material=True):
            raise PermissionDeniedError(f"{key} version {version} is {row['state']}")
        if row["state"] == str(KeyState.PRE_ACTIVE):
            stored = await _repo.load_key(tx, key)  # a stage withdrawn since: ask the rule again
            if not released_to(stored, stored.version(version), host):
                raise PermissionDeniedError(
                    f"host {host.id} may not get a certificate for {key} v{version}: its "
                    "rollout withdrew it meanwhile"
                )
        try:
            targets = Targets.model_validate_json(row["targets"])
            labels = json.loads(row["host_labels"])
        except ValueError as exc:
            raise StoreError(f"stored targets of {key} are malformed: {exc}") from exc
        fresh = host.model_copy(update={"labels": labels})
        if not host_matches(targets, fresh):
            raise PermissionDeniedError(f"host {host.id} is no longer a target of {key}")
        try:
            profile = InstallSpec.model_validate_json(row["install"]).tls
        except ValueError as exc:
            raise StoreError(f"stored install spec of {key} is malformed: {exc}") from exc
        try:
            now_names = (
                None
                if profile is None
                else render_tls_names(profile, key_name=key, host_id=host.id, labels=labels)
            )
        except ConfigError:
            now_names = None
        if now_names != names:
            raise PermissionDeniedError(f"host {host.id}: the names of {key} changed meanwhile")

    async def _recheck(self, tx: Transaction, host: Host, reply: FetchReply) -> None:
        """Refuse material the host may no longer have: version or host revoked, or the key
        retargeted away from it, after the request was authorized.

        Authorization reads a snapshot taken when the request came in; this check runs in the
        write transaction that records the fetch, so a revocation or a targets change either
        committed before it (and the material is not sent) or comes after it in the audit log.
        """
        row = await tx.fetchone(
            "SELECT v.state, v.sealed_material IS NOT NULL AS has_material, k.targets, "
            "h.revoked AS host_revoked, h.labels AS host_labels "
            "FROM key_versions v JOIN keys k ON k.id = v.key_id LEFT JOIN hosts h ON h.id = ? "
            "WHERE k.name = ? AND v.version = ?",
            (host.id, reply.key, reply.version),
        )
        if (
            row is None
            or row["host_revoked"] is None
            or row["host_revoked"]
            or not (row["has_material"])
        ):
            raise PermissionDeniedError(
                f"host {host.id} may not fetch {reply.key} v{reply.version}: revoked meanwhile"
            )
        if not is_distributable(KeyState(row["state"]), has_material=True):
            raise NotDistributableError(
                f"{reply.key} version {reply.version} is {row['state']}: not distributable"
            )
        try:
            targets = Targets.model_validate_json(row["targets"])
            labels = json.loads(row["host_labels"])
        except ValueError as exc:
            raise StoreError(f"stored targets of {reply.key} are malformed: {exc}") from exc
        if not host_matches(targets, host.model_copy(update={"labels": labels})):
            raise PermissionDeniedError(
                f"host {host.id} is no longer a target of {reply.key}: retargeted meanwhile"
            )
        if row["state"] == str(KeyState.PRE_ACTIVE):
            # A rollout may have withdrawn the stage since: read the key as this transaction
            # sees it (rows checked) and ask the one rule again.
            key = await _repo.load_key(tx, reply.key)
            if not released_to(key, key.version(reply.version), host):
                raise PermissionDeniedError(
                    f"host {host.id} may not fetch {reply.key} v{reply.version}: its rollout "
                    "withdrew it meanwhile"
                )

    async def _keys_knowing(self, asked: Iterable[FetchRequest]) -> Mapping[str, KeyView]:
        """The key view, looked up again in the store if it lacks a version the host asks for.

        The host learnt of that version from its signed event, published after the commit;
        among replicas the commit may be another's, not seen here until the next poll of the
        store (up to 50 ms later), and a host that was answered without the version waited
        for its next reconcile (minutes). A version nobody committed costs one more read.
        """
        keys = await self._lifecycle.current_keys()
        for item in asked:
            key = keys.get(item.key)
            if key is None or item.version > key.latest_version:
                return await self._lifecycle.current_keys(fresh=True)
        return keys

    async def _wrap(
        self, host: Host, suite: WrapSuite, keys: Mapping[str, KeyView], request: FetchRequest
    ) -> FetchReply:
        """Authorize one version for ``host`` and wrap its material to the host's key."""
        key = keys.get(request.key)
        if key is None:
            raise PermissionDeniedError(f"host {host.id} may not fetch {request.key}: no such key")
        if not host_matches(key.targets, host):
            raise PermissionDeniedError(f"host {host.id} is not a target of {key.name}")
        if key.type is KeyType.TLS_CERT:
            raise PermissionDeniedError(
                f"{key.name} is a tls-cert: hosts make their own key and ask for a certificate"
            )
        try:
            version = key.version(request.version)
        except CKMSError:
            raise PermissionDeniedError(
                f"host {host.id} may not fetch {key.name} v{request.version}: no such version"
            ) from None
        if not is_distributable(version.state, has_material=version.has_material):
            raise NotDistributableError(
                f"{key.name} version {version.version} is {version.state}: not distributable"
            )
        if not released_to(key, version, host):
            raise PermissionDeniedError(
                f"host {host.id} may not fetch {key.name} v{version.version}: its rollout has "
                "not released it to this host"
            )
        material = await self._vault.material(key.name, version.version, key=key)
        if self._vault.digest(material) != version.digest:
            raise IntegrityError(f"key {key.name} version {version.version} failed integrity check")
        wrapped = wrap_for_agent(
            host.wrapping_public_key,
            material,
            key_name=key.name,
            version=version.version,
            agent_id=host.id,
            suite=suite,
        )
        del material
        return FetchReply(
            key=key.name,
            version=version.version,
            digest=version.digest,
            suite=str(suite),
            wrapped=base64.b64encode(wrapped).decode(),
        )

    async def _audit_fetch(
        self,
        tx: Transaction,
        host: Host,
        key: str,
        version: int,
        *,
        suite: str | None = None,
        refused: CKMSError | None = None,
    ) -> None:
        """The record that ``host`` received this version (fail closed: no record, no reply),
        or that it was refused it."""
        details: dict[str, object] = {"version": version}
        if refused is None:
            details["suite"] = suite
        else:
            details.update(error=type(refused).__name__, message=str(refused)[:500])
        await audit_log.append(
            tx,
            now=self._now(),
            actor=f"host:{host.id}",
            action="key.fetch",
            object=f"key:{key}",
            outcome="ok" if refused is None else "refused",
            details=details,
        )


MAX_ISSUES_PER_WINDOW = 20
"""Most certificates one host gets for one key version per certificate lifetime: a host that
loses its files re-asks, one that asks in a loop is refused instead of filling the store."""


async def _check_issue_rate(
    tx: Transaction, host_id: str, key_id: str | None, version: int, now: datetime
) -> None:
    count = await tx.fetchval(
        "SELECT count(*) FROM certificates WHERE host_id = ? "
        "AND key_id IS NOT DISTINCT FROM ? AND version = ? "
        "AND not_after > ?",
        (host_id, key_id, version, format_time(now)),
    )
    if int(count or 0) >= MAX_ISSUES_PER_WINDOW:
        raise PermissionDeniedError(
            f"host {host_id} holds {count} unexpired certificates of this key version: "
            "not issuing more until some expire"
        )


def _withheld(key: AnyKey | None, request: FetchRequest, host: Host) -> bool:
    """True when ``request`` names a version its rollout has not released to ``host``."""
    if key is None:
        return False
    version = next((v for v in key.versions if v.version == request.version), None)
    return version is not None and not released_to(key, version, host)


def _item(request: FetchRequest) -> tuple[str, int]:
    return request.key, request.version


def _text(pem: bytes | None) -> str | None:
    return None if pem is None else pem.decode("ascii")
