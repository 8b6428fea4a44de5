"""tls-cert keys end to end: real controller and CA, real agents, real OpenSSL, real Kafka.

Each host makes its own key, sends a CSR over its SSH connection, installs what the CA signed,
renews at two thirds of the lifetime, and stops (files gone, no more signing) once revoked.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.controller.policy import default_policy
from ckms.controller.service import Controller
from ckms.crypto import (
    CertSubject,
    KeyType,
    build_csr,
    certificate_info,
    crl_serials,
    generate,
    split_certificates,
)
from ckms.errors import PermissionDeniedError
from ckms.protocol import (
    CertSignReply,
    CertSignRequest,
    ClientCertRequest,
    InstallSpec,
    RevocationReason,
    Targets,
    TlsProfile,
)
from ckms.protocol import admin as api
from ckms.ssh import Principal
from ckms.store import parse_time
from tests.support.controller import running_controller
from tests.support.fleet import enroll_agent, host_rpc, running_agent, wait_until
from tests.support.tls import needs_openssl, s_client, tls_server, verify

pytestmark = [pytest.mark.kafka, needs_openssl]

DB = {"env": "prod", "role": "db"}
SPEC = InstallSpec(
    path="/etc/ckms/tls/{purpose}",
    format="tls-pem",
    tls=TlsProfile(sans=("{host}.db.internal", "{label:role}.internal", "127.0.0.1"), usage="both"),
)


def _dir(tmp: Path, host: str) -> Path:
    return tmp / host / "root" / "etc/ckms/tls/server"


async def _create(c: Controller, *, lifetime: timedelta | None = None, name: str = "db/server"):
    policy = default_policy(KeyType.TLS_CERT).model_copy(update={"cert_lifetime": lifetime})
    return await c.lifecycle.create(
        name,
        "tls-cert",
        targets=Targets(selectors=(DB,)),
        install=SPEC,
        policy=policy,
        actor="alice",
    )


def _serial(directory: Path) -> str | None:
    try:
        return certificate_info((directory / "cert.pem").read_bytes()).serial_hex
    except (FileNotFoundError, Exception):
        return None


async def _installed_serial(c: Controller, host: str) -> str | None:
    assert c.store is not None
    row = await c.store.fetchone(
        "SELECT serial FROM certificates WHERE host_id = ? AND installed_at IS NOT NULL "
        "AND revoked_at IS NULL ORDER BY issued_at DESC LIMIT 1",
        (host,),
    )
    return None if row is None else str(row["serial"])


@pytest.mark.requirement("SP800-130-DISTRIBUTE")
async def test_issue_verify_serve_and_the_key_never_leaves_the_host(
    controller: Controller, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = controller
    caplog.set_level("DEBUG")
    configs = {h: await enroll_agent(c, tmp_path, h, DB) for h in ("db-1", "db-2")}
    bundle_at_enroll = (tmp_path / "db-1" / "state" / "ca-bundle.pem").read_bytes()
    assert len(split_certificates(bundle_at_enroll)) == 1
    async with running_agent(configs["db-1"]), running_agent(configs["db-2"]):
        await _create(c)
        for host in configs:
            await wait_until(
                lambda h=host: _has_installed(c, h), what=f"{host} acked its certificate"
            )
        for host in configs:
            d = _dir(tmp_path, host)
            info = certificate_info((d / "cert.pem").read_bytes())
            assert info.subject == f"CN={host}"
            assert info.dns_names == (f"{host}.db.internal", "db.internal")
            assert info.ip_addresses == ("127.0.0.1",)
            assert info.not_after - info.not_before == timedelta(hours=24, minutes=5)
            assert (d / "key.pem").stat().st_mode & 0o777 == 0o600
            out = verify(d / "ca.pem", d / "cert.pem", untrusted=d / "chain.pem")
            assert out.returncode == 0, out.stdout + out.stderr
            # fullchain.pem (nginx, PostgreSQL) carries the intermediate itself.
            full = verify(d / "ca.pem", d / "cert.pem", untrusted=d / "fullchain.pem")
            assert full.returncode == 0, full.stdout + full.stderr
            for purpose in ("sslserver", "sslclient"):
                out = verify(
                    d / "ca.pem", d / "cert.pem", untrusted=d / "chain.pem", purpose=purpose
                )
                assert out.returncode == 0, out.stdout + out.stderr
        d1 = _dir(tmp_path, "db-1")
        async with tls_server(d1 / "cert.pem", d1 / "key.pem", d1 / "chain.pem") as port:
            ok = await s_client(port, d1 / "ca.pem", "db-1.db.internal")
            assert ok.returncode == 0, ok.stdout + ok.stderr
            wrong = await s_client(port, d1 / "ca.pem", "db-2.db.internal")
            assert wrong.returncode != 0, "a certificate must not pass for another host's name"
        fleet = await c.admin.fleet_status(_principal(), _params("db/server"))
        hosts = {h.host: h for h in fleet.keys[0].hosts}
        assert hosts["db-1"].cert_serial == _serial(d1)
        assert hosts["db-1"].cert_installed and hosts["db-1"].cert_not_after is not None
        private = [_key_material(_dir(tmp_path, h) / "key.pem") for h in configs]
    # The private keys were made on the hosts: nothing the controller stores or logs has them.
    home = tmp_path / "controller"
    hits = [
        p
        for p in home.rglob("*")
        if p.is_file() and any(needle in p.read_bytes() for k in private for needle in k)
    ]
    assert hits == []
    # Nor does any log line, the controller's or the agents' own (every logger at DEBUG).
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records and "cert_sign" in logged
    assert not any(n.decode("latin-1") in logged for k in private for n in k[1:])
    assert not any(n.hex() in logged for k in private for n in (k[0], k[2]))


def _key_material(path: Path) -> list[bytes]:
    """The needles a leak would show: the key's DER, its PEM body, and its private scalar."""
    pem = path.read_bytes()
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    der = base64.b64decode(body)
    # PKCS#8 EC key: the 32-byte private scalar follows "04 20" inside the ECPrivateKey.
    scalar = der[der.index(b"\x04\x20") + 2 :][:32]
    return [der, body, scalar]


async def _has_installed(c: Controller, host: str) -> bool:
    return await _installed_serial(c, host) is not None


def _principal() -> Principal:
    return Principal(name="alice", role="admin", key_fingerprint="SHA256:test")


def _params(key: str) -> api.FleetStatusParams:
    return api.FleetStatusParams(key=key)


@pytest.mark.requirement("PCI-4.2.1")
async def test_renewal_before_expiry_with_a_fresh_key(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    d = _dir(tmp_path, "db-1")
    async with running_agent(config):
        await _create(c, lifetime=timedelta(seconds=30))
        await wait_until(lambda: _has_installed(c, "db-1"), what="first certificate")
        first = certificate_info((d / "cert.pem").read_bytes())
        first_key = (d / "key.pem").read_bytes()
        await wait_until(
            lambda: _renewed(c, first.serial_hex), timeout_s=45, what="renewal installed"
        )
        second = certificate_info((d / "cert.pem").read_bytes())
        assert second.serial != first.serial
        assert second.not_after > first.not_after
        assert (d / "key.pem").read_bytes() != first_key, "each renewal gets a fresh key"
        assert c.store is not None
        row = await c.store.fetchone(
            "SELECT issued_at FROM certificates WHERE serial = ?", (second.serial_hex,)
        )
        # Renewed while the first one was still valid (at two thirds of its lifetime).
        assert parse_time(row["issued_at"]) < first.not_after
        assert verify(d / "ca.pem", d / "cert.pem", untrusted=d / "chain.pem").returncode == 0


async def _renewed(c: Controller, old: str) -> bool:
    serial = await _installed_serial(c, "db-1")
    return serial is not None and serial != old


@pytest.mark.requirement("PCI-4.2.1")
async def test_revoking_the_key_removes_the_files_stops_renewal_and_lists_the_serials(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    d = _dir(tmp_path, "db-1")
    async with running_agent(config):
        await _create(c, lifetime=timedelta(seconds=60))
        await wait_until(lambda: _has_installed(c, "db-1"), what="certificate")
        serial = _serial(d)
        assert serial is not None
        await c.lifecycle.revoke(
            "db/server", RevocationReason.KEY_COMPROMISE, actor="alice", message="test"
        )
        await wait_until(lambda: not (d / "key.pem").exists(), what="files removed")
        assert not any(d.glob("*.pem"))
    assert c.store is not None
    row = await c.store.fetchone(
        "SELECT payload FROM outbox WHERE type = 'key.revoked' ORDER BY seq DESC LIMIT 1"
    )
    assert f'"serials":["{serial}"]' in bytes(row["payload"]).decode()
    pem, serials = await c.ca.crl(now=c.clock())
    assert serial in serials
    state = await c.ca.state()
    assert serial in {format(s, "x") for s in crl_serials(pem, state.active.issuing.certificate)}
    # The host can no longer get a certificate for the key, whatever it sends.
    async with host_rpc(c, config) as rpc:
        with pytest.raises(PermissionDeniedError, match="Compromised"):
            await rpc.call("cert_sign", _sign_request("db/server", 1, None))


def _sign_request(key: str, version: int, subject: CertSubject | None, **names: list[str]) -> dict:
    csr = build_csr(generate(KeyType.ECDSA_P256), subject, **names).decode()
    return CertSignRequest(key=key, version=version, csr=csr).model_dump(mode="json")


async def test_a_host_may_claim_only_the_names_its_spec_renders_for_it(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    db1 = await enroll_agent(c, tmp_path, "db-1", DB)
    web = await enroll_agent(c, tmp_path, "web-1", {"env": "prod", "role": "web"})
    await _create(c)
    async with host_rpc(c, db1) as rpc:
        for names, subject in [
            ({"dns_names": ["db-2.db.internal"]}, None),  # another host's name
            ({"dns_names": ["db-1.db.internal", "evil.example.com"]}, None),
            ({"ip_addresses": ["10.0.0.1"]}, None),
            ({}, CertSubject("db-2")),
            ({}, CertSubject("db-1", "ckms-controller")),  # a Kafka principal's OU
        ]:
            with pytest.raises(PermissionDeniedError, match="may not claim"):
                await rpc.call("cert_sign", _sign_request("db/server", 1, subject, **names))
        ok = CertSignReply.model_validate(
            await rpc.call(
                "cert_sign",
                _sign_request("db/server", 1, CertSubject("db-1"), dns_names=["db-1.db.internal"]),
            )
        )
        info = certificate_info(ok.certificate.encode())
        assert info.dns_names == ("db-1.db.internal", "db.internal")
        with pytest.raises(PermissionDeniedError, match="refused"):
            await rpc.call(
                "cert_sign",
                CertSignRequest(key="db/server", version=1, csr="not a csr").model_dump(),
            )
    async with host_rpc(c, web) as rpc:
        with pytest.raises(PermissionDeniedError, match="not a target"):
            await rpc.call("cert_sign", _sign_request("db/server", 1, None))
    # A host lacking a label a template needs gets no certificate, not a guessed name.
    bare = await enroll_agent(c, tmp_path, "db-3", {"env": "prod"})
    await c.lifecycle.create(
        "db/bare",
        "tls-cert",
        targets=Targets(hosts=("db-3",)),
        install=SPEC,
        actor="alice",
    )
    async with host_rpc(c, bare) as rpc:
        with pytest.raises(PermissionDeniedError, match="no label 'role'"):
            await rpc.call("cert_sign", _sign_request("db/bare", 1, None))


async def test_ca_rotation_overlaps_then_hosts_trust_only_the_new_root(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    d = _dir(tmp_path, "db-1")
    bundle = tmp_path / "db-1" / "state" / "ca-bundle.pem"
    async with running_agent(config):
        await _create(c, lifetime=timedelta(hours=1))
        await wait_until(lambda: _has_installed(c, "db-1"), what="first certificate")
        old_cert = tmp_path / "old-cert.pem"
        old_cert.write_bytes((d / "cert.pem").read_bytes())
        old_chain = tmp_path / "old-chain.pem"
        old_chain.write_bytes((d / "chain.pem").read_bytes())
        old_serial = _serial(d)
        await c.ca.rotate(now=c.clock(), actor="alice")
        c.publisher.wake()
        await wait_until(lambda: _published(c, "ca.rotated"), what="ca.rotated published")
        await wait_until(
            lambda: len(split_certificates(bundle.read_bytes())) == 2, what="bundle holds both"
        )
        # During the overlap the old certificate still verifies against what hosts trust.
        assert verify(bundle, old_cert, untrusted=old_chain).returncode == 0
        # Agents renew onto the new CA on the ca.rotated event, not at two thirds.
        await wait_until(lambda: _renewed(c, old_serial or ""), timeout_s=15, what="renewed")
        client = tmp_path / "db-1" / "state" / "kafka" / "client.pem"
        await wait_until(
            lambda: _issuer(client) == "CN=ckms issuing 2,OU=ckms-ca",
            timeout_s=15,
            what="Kafka client certificate renewed onto the new CA",
        )
        new_issuer = certificate_info((d / "cert.pem").read_bytes()).issuer
        assert new_issuer == "CN=ckms issuing 2,OU=ckms-ca"
        assert verify(bundle, d / "cert.pem", untrusted=d / "chain.pem").returncode == 0
        assert verify(d / "ca.pem", d / "cert.pem", untrusted=d / "chain.pem").returncode == 0
        await c.ca.retire(now=c.clock(), actor="alice")
        c.publisher.wake()
        await wait_until(
            lambda: len(split_certificates(bundle.read_bytes())) == 1, what="old root dropped"
        )
        assert verify(bundle, old_cert, untrusted=old_chain).returncode != 0
        assert verify(bundle, d / "cert.pem", untrusted=d / "chain.pem").returncode == 0
    assert c.store is not None
    actions = [
        r["action"]
        for r in await c.store.fetchall(
            "SELECT action FROM audit WHERE action LIKE 'ca.%' ORDER BY idx"
        )
    ]
    assert actions == ["ca.rotate", "ca.retire"]


async def _published(c: Controller, event_type: str) -> bool:
    assert c.store is not None
    return bool(
        await c.store.fetchval(
            "SELECT count(*) FROM outbox WHERE type = ? AND sent_at IS NOT NULL", (event_type,)
        )
    )


async def test_revoking_the_host_lists_its_serials(controller: Controller, tmp_path: Path) -> None:
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    await _create(c)
    async with host_rpc(c, config) as rpc:
        reply = CertSignReply.model_validate(
            await rpc.call("cert_sign", _sign_request("db/server", 1, None))
        )
    await c.hosts.revoke("db-1", actor="alice")
    assert c.store is not None
    row = await c.store.fetchone(
        "SELECT payload FROM outbox WHERE type = 'host.revoked' ORDER BY seq DESC LIMIT 1"
    )
    listed = json.loads(bytes(row["payload"]))["serials"]
    client = tmp_path / "db-1" / "state" / "kafka" / "client.pem"
    kafka_serial = certificate_info(split_certificates(client.read_bytes())[0]).serial_hex
    assert sorted(listed) == sorted([reply.serial, kafka_serial])  # its Kafka identity too
    _, serials = await c.ca.crl(now=c.clock())
    assert set(listed) <= set(serials)


async def test_enrollment_issues_the_agent_its_kafka_client_certificate_and_it_renews(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    async with running_controller(
        tmp_path / "controller",
        controller_kafka,
        unique_topic("events"),
        unique_topic("fleet"),
        audit_topic=unique_topic("audit"),
        agent_cert_lifetime_s=30,
    ) as c:
        config = await enroll_agent(c, tmp_path, "db-1", DB)
        state = tmp_path / "db-1" / "state"
        client = state / "kafka" / "client.pem"
        client_key = state / "kafka" / "client.key"
        assert client_key.stat().st_mode & 0o777 == 0o600
        first = split_certificates(client.read_bytes())
        info = certificate_info(first[0])
        assert info.subject == "CN=db-1,OU=ckms-agent"  # the principal Kafka's ACLs map
        assert len(first) == 2, "the certificate and its intermediate"
        # What a Python (or Kafka PEM keystore) client loads: the chain and its key.
        context = ssl.create_default_context(cafile=str(state / "ca-bundle.pem"))
        context.load_cert_chain(client, client_key)
        (tmp_path / "leaf.pem").write_bytes(first[0])
        (tmp_path / "chain.pem").write_bytes(first[1])
        bundle = state / "ca-bundle.pem"
        ok = verify(
            bundle, tmp_path / "leaf.pem", untrusted=tmp_path / "chain.pem", purpose="sslclient"
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        server = verify(
            bundle, tmp_path / "leaf.pem", untrusted=tmp_path / "chain.pem", purpose="sslserver"
        )
        assert server.returncode != 0, "an agent's client certificate cannot serve TLS"
        key_needles = _key_material(client_key)
        async with running_agent(config):
            await wait_until(
                lambda: _client_serial(client) not in (None, info.serial_hex),
                timeout_s=45,
                what="Kafka client certificate renewed",
            )
        async with host_rpc(c, config) as rpc:
            for subject in (
                CertSubject("db-2", "ckms-agent"),
                CertSubject("db-1", "ckms-controller"),
            ):
                csr = build_csr(generate(KeyType.ECDSA_P256), subject).decode()
                with pytest.raises(PermissionDeniedError, match="may not claim"):
                    await rpc.call("client_cert", ClientCertRequest(csr=csr).model_dump())
        renewed_needles = _key_material(client_key)
        context.load_cert_chain(client, client_key)  # the renewed pair still matches
        await c.hosts.revoke("db-1", actor="alice")
        assert c.store is not None
        row = await c.store.fetchone(
            "SELECT payload FROM outbox WHERE type = 'host.revoked' ORDER BY seq DESC LIMIT 1"
        )
        assert _client_serial(client) in bytes(row["payload"]).decode()
    home = tmp_path / "controller"
    for needles in (key_needles, renewed_needles):
        assert not [
            p for p in home.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)
        ]


def _issuer(path: Path) -> str:
    return certificate_info(split_certificates(path.read_bytes())[0]).issuer


def _client_serial(path: Path) -> str | None:
    try:
        return certificate_info(split_certificates(path.read_bytes())[0]).serial_hex
    except (OSError, Exception):
        return None


async def test_a_relabel_that_renames_a_host_reissues_its_certificate_at_once(
    controller: Controller, tmp_path: Path
) -> None:
    """The host's names come from a label; a relabel changes it while the host stays a
    target. The old certificate is revoked in the relabel's transaction, and the agent, whose
    files and install spec are all as before, re-issues at once (its heartbeat drifts, and the
    sync's names digest differs from the one its certificate was issued under)."""
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", {**DB, "zone": "a"})
    zoned = InstallSpec(
        path="/etc/ckms/tls/{purpose}",
        format="tls-pem",
        tls=TlsProfile(sans=("{label:zone}.db.internal",)),
    )
    d = _dir(tmp_path, "db-1")
    async with running_agent(config):
        await c.lifecycle.create(
            "db/server", "tls-cert", targets=Targets(selectors=(DB,)), install=zoned, actor="alice"
        )
        await wait_until(lambda: _has_installed(c, "db-1"), what="first certificate")
        first = certificate_info((d / "cert.pem").read_bytes())
        assert first.dns_names == ("a.db.internal",)
        await c.hosts.set_labels("db-1", {**DB, "zone": "b"}, actor="alice")
        _, revoked = await c.ca.crl(now=c.clock())
        assert first.serial_hex in revoked
        await wait_until(
            lambda: _serial(d) not in (None, first.serial_hex), what="certificate re-issued"
        )
        second = certificate_info((d / "cert.pem").read_bytes())
        assert second.dns_names == ("b.db.internal",)
        await wait_until(lambda: _renewed(c, first.serial_hex), what="re-issue acknowledged")
