"""Attacks on issued certificates' records: a database file owner who edits ``certificates``
rows must not make a revoked serial vanish from the CRL, nor keep a certificate out of a
revocation. Real controller, CA, SSH and SQLite file; the host asks over its own connection."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from ckms.controller.service import Controller
from ckms.crypto import KeyType, build_csr, crl_reasons, crl_serials, generate
from ckms.errors import IntegrityError, PermissionDeniedError
from ckms.protocol import CertSignReply, CertSignRequest, InstallSpec, Targets, TlsProfile
from ckms.protocol import admin as api
from ckms.ssh import Principal
from tests.support.audit import tamper
from tests.support.fleet import enroll_agent, host_rpc

pytestmark = [pytest.mark.kafka]

DB = {"env": "prod", "role": "db"}
SPEC = InstallSpec(path="/etc/ckms/tls/{purpose}", format="tls-pem", tls=TlsProfile())
BACKDATE = "UPDATE certificates SET not_after = '2001-01-01T00:00:00Z'"


async def _issued(c: Controller, tmp_path: Path, host: str = "db-1") -> str:
    """Create a tls-cert key for ``host``, have the host get a certificate; its serial."""
    config = await enroll_agent(c, tmp_path, host, DB)
    await c.lifecycle.create(
        "db/server", "tls-cert", targets=Targets(selectors=(DB,)), install=SPEC, actor="alice"
    )
    csr = build_csr(generate(KeyType.ECDSA_P256), None).decode()
    async with host_rpc(c, config) as rpc:
        reply = CertSignReply.model_validate(
            await rpc.call(
                "cert_sign",
                CertSignRequest(key="db/server", version=1, csr=csr).model_dump(mode="json"),
            )
        )
    return reply.serial


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE certificates SET revoked_at = NULL",  # the revocation cleared
        "UPDATE certificates SET revocation_reason = 'superseded'",  # a compromise hidden
        "UPDATE certificates SET public_key_sha256 = NULL",  # the pair made reusable
        BACKDATE,  # made to look expired
    ],
)
async def test_an_edited_revoked_row_fails_the_crl_instead_of_leaving_it(
    controller: Controller, tmp_path: Path, edit: str
) -> None:
    c = controller
    serial = await _issued(c, tmp_path)
    await c.hosts.revoke("db-1", actor="alice")
    _, serials = await c.ca.crl(now=c.clock())
    assert serial in serials
    tamper(c.settings.db_path, edit)
    with pytest.raises(IntegrityError, match="failed integrity check"):
        await c.ca.crl(now=c.clock())


async def test_a_row_made_to_look_expired_fails_the_revocation_instead_of_escaping_it(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    await _issued(c, tmp_path)
    tamper(c.settings.db_path, BACKDATE)
    with pytest.raises(IntegrityError, match="failed integrity check"):
        await c.hosts.revoke("db-1", actor="alice")
    assert not (await c.hosts.get("db-1")).revoked  # nothing half done


async def test_the_crl_lists_a_revoked_serial_signed_by_its_issuer(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    serial = await _issued(c, tmp_path)
    await c.hosts.revoke("db-1", actor="alice")
    pem, _ = await c.ca.crl(now=c.clock())
    state = await c.ca.state()
    assert serial in {format(s, "x") for s in crl_serials(pem, state.active.issuing.certificate)}


async def _crl_serials(c: Controller) -> tuple[str, ...]:
    _, serials = await c.ca.crl(now=c.clock())
    return serials


async def test_a_host_retargeted_away_loses_its_certificate_to_the_crl(
    controller: Controller, tmp_path: Path
) -> None:
    """Taking a host out of a key's targets (say, out of the pool that answers for a name)
    must not leave it a valid certificate for that name until expiry."""
    c = controller
    serial = await _issued(c, tmp_path)
    await c.lifecycle.set_targets("db/server", Targets(selectors=(DB,)), actor="alice")
    assert serial not in await _crl_serials(c)  # still a target: kept
    await c.lifecycle.set_targets(
        "db/server", Targets(selectors=({"env": "prod", "role": "db2"},)), actor="alice"
    )
    assert serial in await _crl_serials(c)


async def test_a_host_relabelled_out_of_the_targets_loses_its_certificate_to_the_crl(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    serial = await _issued(c, tmp_path)
    await c.hosts.set_labels("db-1", {**DB, "zone": "a"}, actor="alice")
    assert serial not in await _crl_serials(c)  # still a target, same names: kept
    await c.hosts.set_labels("db-1", {"env": "prod", "role": "web"}, actor="alice")
    assert serial in await _crl_serials(c)


async def test_new_name_templates_revoke_the_certificates_of_the_old_names(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    serial = await _issued(c, tmp_path)
    renamed = SPEC.model_copy(update={"tls": TlsProfile(sans=("{host}.other.internal",))})
    await c.lifecycle.set_targets(
        "db/server", Targets(selectors=(DB,)), install=renamed, actor="alice"
    )
    assert serial in await _crl_serials(c)


async def test_names_rendered_from_labels_that_changed_before_the_commit_are_refused(
    controller: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request authorized on the host's labels as they were (its snapshot) while an
    operator moved a label away must not get a certificate of the old label's names."""
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", {**DB, "zone": "a"})
    zoned = SPEC.model_copy(update={"tls": TlsProfile(sans=("{label:zone}.db.internal",))})
    await c.lifecycle.create(
        "db/zoned", "tls-cert", targets=Targets(selectors=(DB,)), install=zoned, actor="alice"
    )
    before = await c.hosts.identity("db-1")
    await c.hosts.set_labels("db-1", {**DB, "zone": "b"}, actor="alice")

    async def stale(host_id: str) -> tuple[object, str]:
        return before

    monkeypatch.setattr(c.hosts, "identity", stale)
    csr = build_csr(generate(KeyType.ECDSA_P256), None).decode()
    async with host_rpc(c, config) as rpc:
        with pytest.raises(PermissionDeniedError, match="changed meanwhile"):
            await rpc.call(
                "cert_sign",
                CertSignRequest(key="db/zoned", version=1, csr=csr).model_dump(mode="json"),
            )


async def test_a_host_refused_in_a_loop_is_audited_in_a_summary_not_record_by_record(
    controller: Controller, tmp_path: Path
) -> None:
    """An enrolled host asking in a loop for what it may not have (a CSR for names it does not
    own, a key it is no target of) must not write one audit record -- one write transaction --
    per request: past its burst its refusals are summed into one record, and still refused."""
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    await c.lifecycle.create(
        "db/server", "tls-cert", targets=Targets(selectors=(DB,)), install=SPEC, actor="alice"
    )
    bad = CertSignRequest(key="db/server", version=1, csr="not a csr").model_dump(mode="json")
    tries = 80
    async with host_rpc(c, config) as rpc:
        for _ in range(tries):
            with pytest.raises(PermissionDeniedError, match="refused"):
                await rpc.call("cert_sign", bad)
    assert c.store is not None
    one_by_one = await c.store.fetchval(
        "SELECT count(*) FROM audit WHERE action = 'rpc.cert_sign' AND actor = 'host:db-1'"
    )
    assert 1 <= one_by_one <= tries // 2
    await c.rpc.host_guard.flush()
    rows = await c.store.fetchall("SELECT details FROM audit WHERE actor = 'source:host:db-1'")
    summarised = sum(json.loads(r["details"])["refused"].get("rpc.cert_sign", 0) for r in rows)
    assert one_by_one + summarised == tries


async def test_relabelling_a_host_keeps_its_kafka_client_certificate(
    controller: Controller, tmp_path: Path
) -> None:
    """Entitlement is about tls-cert keys: the agent's own Kafka client certificate (no key)
    must survive any relabel, and a relabel that takes the host out of a key's targets revokes
    only that key's certificate."""
    c = controller
    serial = await _issued(c, tmp_path)
    assert c.store is not None
    client = "SELECT count(*) FROM certificates WHERE host_id = 'db-1' AND key_id IS NULL"
    issued = await c.store.fetchval(client)
    assert issued >= 1, "enrollment issued the agent its Kafka client certificate"
    await c.hosts.set_labels("db-1", {"env": "prod", "role": "web"}, actor="alice")
    assert serial in await _crl_serials(c)
    assert await c.store.fetchval(client + " AND revoked_at IS NULL") == issued


async def test_an_older_sealed_ca_record_written_back_is_refused(
    controller: Controller, tmp_path: Path
) -> None:
    """The sealed CA record opens whatever copy of it the file holds: a database file owner
    who kept the record from before a rotation and retirement (an old backup has it) and
    writes it back would make the retired root trusted again, in every host's bundle, and the
    old intermediate sign. The record must agree with the audit log's newest CA change."""
    c = controller
    assert c.store is not None
    old = await c.store.get_meta("sealed.ca")
    await c.ca.rotate(now=c.clock(), actor="alice")
    await c.ca.retire(now=c.clock(), actor="alice", force=True)
    assert len((await c.ca.state()).trusted) == 1
    tamper(c.settings.db_path, "UPDATE meta SET value = ? WHERE name = 'sealed.ca'", params=(old,))
    fresh = type(c.ca)(c.store, c.vault)  # a controller starting on the edited file
    with pytest.raises(IntegrityError, match="CA record"):
        await fresh.state()
    with pytest.raises(IntegrityError, match="CA record"):
        await c.ca.state()  # and the running one, which sees a record it did not write


async def _sign(rpc: object, version: int, private: bytes) -> CertSignReply:
    csr = build_csr(private, None).decode()
    request = CertSignRequest(key="db/server", version=version, csr=csr)
    return CertSignReply.model_validate(
        await rpc.call("cert_sign", request.model_dump(mode="json"))  # type: ignore[attr-defined]
    )


@pytest.mark.requirement("PCI-4.2.1")
async def test_a_key_pair_whose_certificate_was_revoked_for_compromise_is_not_certified_again(
    controller: Controller, tmp_path: Path
) -> None:
    """A host (or whoever stole its TLS key) that keeps the key pair of a certificate revoked
    for keyCompromise must not get it certified again for the next version: the CSR's public
    key is refused, a fresh one is certified. A pair whose certificate was only superseded may
    be certified again."""
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    await c.lifecycle.create(
        "db/server", "tls-cert", targets=Targets(selectors=(DB,)), install=SPEC, actor="alice"
    )
    stolen, kept = generate(KeyType.ECDSA_P256), generate(KeyType.ECDSA_P256)
    async with host_rpc(c, config) as rpc:
        first = await _sign(rpc, 1, stolen)
        await _sign(rpc, 1, kept)
        await c.lifecycle.rotate("db/server", actor="alice")
        await c.lifecycle.revoke("db/server", "keyCompromise", version=1, actor="alice")
        with pytest.raises(PermissionDeniedError, match="revoked for keyCompromise"):
            await _sign(rpc, 2, stolen)
        await _sign(rpc, 2, generate(KeyType.ECDSA_P256))
        pem, _ = await c.ca.crl(now=c.clock())
        issuing = (await c.ca.state()).active.issuing.certificate
        assert crl_reasons(pem, issuing)[int(first.serial, 16)] == "keyCompromise"
        assert c.store is not None
        audited = await c.store.fetchval(
            "SELECT count(*) FROM audit WHERE action = 'rpc.cert_sign' AND outcome != 'ok'"
        )
        assert audited >= 1
        # Every certificate of v1 was revoked for keyCompromise, so 'kept' is refused too ...
        with pytest.raises(PermissionDeniedError, match="revoked for keyCompromise"):
            await _sign(rpc, 2, kept)
        # ... while a pair whose certificate went for another reason may be certified again.
        other = generate(KeyType.ECDSA_P256)
        await _sign(rpc, 2, other)
        await c.lifecycle.rotate("db/server", actor="alice")
        await c.lifecycle.revoke("db/server", "superseded", version=2, actor="alice")
        await _sign(rpc, 3, other)


@pytest.mark.requirement("PCI-4.2.1")
@pytest.mark.parametrize(
    ("op", "reason"), [("suspend", "cessationOfOperation"), ("deactivate", "superseded")]
)
async def test_suspending_or_deactivating_a_version_revokes_its_live_certificates(
    controller: Controller, tmp_path: Path, op: str, reason: str
) -> None:
    """A version taken out of use must not leave its hosts certificates valid until expiry:
    suspend and deactivate revoke them in the same transaction, with the RFC 5280 reason that
    fits, on the CRL and in the signed key.state_changed event."""
    c = controller
    serial = await _issued(c, tmp_path)
    await getattr(c.lifecycle, op)("db/server", 1, actor="alice")
    pem, serials = await c.ca.crl(now=c.clock())
    assert serial in serials
    issuing = (await c.ca.state()).active.issuing.certificate
    assert crl_reasons(pem, issuing)[int(serial, 16)] == reason
    assert c.store is not None
    row = await c.store.fetchone(
        "SELECT payload FROM outbox WHERE type = 'key.state_changed' ORDER BY seq DESC LIMIT 1"
    )
    assert row is not None
    assert json.loads(bytes(row["payload"]))["serials"] == [serial]
    audited = await c.store.fetchone(
        "SELECT details FROM audit WHERE action = ? ORDER BY idx DESC LIMIT 1", (f"key.{op}",)
    )
    assert audited is not None and json.loads(audited["details"])["serials"] == [serial]


@pytest.mark.requirement("PCI-4.2.1")
async def test_a_deleted_certificate_row_fails_the_crl_and_audit_verify(
    controller: Controller, tmp_path: Path
) -> None:
    """Deleting a revoked certificate's row (row MACs catch edits, not deletions) would drop
    its serial from the CRL: `ckms ca crl` and `ckms audit verify` refuse instead."""
    c = controller
    serial = await _issued(c, tmp_path)
    await c.hosts.revoke("db-1", actor="alice")
    auditor = Principal("erin", "auditor", "SHA256:x")
    assert (await c.admin.audit_verify(auditor, api.Empty())).ok
    tamper(c.settings.db_path, "DELETE FROM certificates WHERE serial = ?", params=(serial,))
    with pytest.raises(IntegrityError, match="deleted"):
        await c.ca.crl(now=c.clock())
    verified = await c.admin.audit_verify(auditor, api.Empty())
    assert not verified.ok and "deleted" in (verified.reason or "")


async def test_a_relabel_that_changes_a_hosts_names_revokes_its_old_certificates(
    controller: Controller, tmp_path: Path
) -> None:
    """A host still targeted after a relabel, whose names come from a label
    (``{label:zone}``), must not keep a valid certificate for the old label's name: the
    relabel revokes it (affiliationChanged) in its own transaction; a relabel that leaves
    the names as they were keeps it."""
    c = controller
    await enroll_agent(c, tmp_path, "db-1", {**DB, "zone": "a"})
    zoned = SPEC.model_copy(update={"tls": TlsProfile(sans=("{label:zone}.db.internal",))})
    await c.lifecycle.create(
        "db/zoned", "tls-cert", targets=Targets(selectors=(DB,)), install=zoned, actor="alice"
    )
    async with host_rpc(c, tmp_path / "db-1" / "agent.toml") as rpc:
        request = CertSignRequest(
            key="db/zoned", version=1, csr=build_csr(generate(KeyType.ECDSA_P256), None).decode()
        )
        reply = CertSignReply.model_validate(
            await rpc.call("cert_sign", request.model_dump(mode="json"))
        )
    await c.hosts.set_labels("db-1", {**DB, "zone": "a", "rack": "7"}, actor="alice")
    assert reply.serial not in await _crl_serials(c)  # same names: kept
    await c.hosts.set_labels("db-1", {**DB, "zone": "b"}, actor="alice")
    pem, serials = await c.ca.crl(now=c.clock())
    assert reply.serial in serials
    issuing = (await c.ca.state()).active.issuing.certificate
    assert crl_reasons(pem, issuing)[int(reply.serial, 16)] == "affiliationChanged"


@pytest.mark.requirement("PCI-4.2.1")
@pytest.mark.parametrize("first", ["suspend", "deactivate"])
async def test_a_compromise_found_after_the_version_left_use_still_bars_its_key_pairs(
    controller: Controller, tmp_path: Path, first: str
) -> None:
    """The version was suspended (or deactivated) first, its certificates revoked for
    cessationOfOperation (superseded); then its key is found compromised and the version
    revoked for keyCompromise. The certificates already revoked must take the compromise
    reason (on the CRL, and so the pair is never certified again): else the stolen pair is
    renewed into the next version."""
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    await c.lifecycle.create(
        "db/server", "tls-cert", targets=Targets(selectors=(DB,)), install=SPEC, actor="alice"
    )
    stolen = generate(KeyType.ECDSA_P256)
    async with host_rpc(c, config) as rpc:
        issued = await _sign(rpc, 1, stolen)
        await c.lifecycle.rotate("db/server", actor="alice")
        await getattr(c.lifecycle, first)("db/server", 1, actor="alice")
        await c.lifecycle.revoke("db/server", "keyCompromise", version=1, actor="alice")
        pem, _ = await c.ca.crl(now=c.clock())
        issuing = (await c.ca.state()).active.issuing.certificate
        assert crl_reasons(pem, issuing)[int(issued.serial, 16)] == "keyCompromise"
        with pytest.raises(PermissionDeniedError, match="revoked for keyCompromise"):
            await _sign(rpc, 2, stolen)


@pytest.mark.requirement("PCI-4.2.1")
@pytest.mark.parametrize("meta_too", [False, True], ids=["row", "row-and-tally"])
async def test_an_older_copy_of_a_certificate_row_written_back_cannot_undo_its_revocation(
    controller: Controller, tmp_path: Path, meta_too: bool
) -> None:
    """The database file's owner copies a certificate row while it is valid (its MAC is the
    controller's own) and writes it back after the key was revoked for keyCompromise, with the
    CA's tally of that moment too: the serial would leave the CRL unseen and the stolen pair be
    certified again. The CRL, issuing and audit verify refuse instead."""
    c = controller
    config = await enroll_agent(c, tmp_path, "db-1", DB)
    await c.lifecycle.create(
        "db/server", "tls-cert", targets=Targets(selectors=(DB,)), install=SPEC, actor="alice"
    )
    stolen = generate(KeyType.ECDSA_P256)
    async with host_rpc(c, config) as rpc:
        serial = (await _sign(rpc, 1, stolen)).serial
        with sqlite3.connect(c.settings.db_path, timeout=60) as raw:
            copy = raw.execute("SELECT * FROM certificates WHERE serial = ?", (serial,)).fetchone()
            columns = [d[0] for d in raw.execute("SELECT * FROM certificates").description]
            tally = raw.execute("SELECT value FROM meta WHERE name = 'ca.issued'").fetchone()
        await c.lifecycle.rotate("db/server", actor="alice")
        await c.lifecycle.revoke("db/server", "keyCompromise", version=1, actor="alice")
        assert serial in (await c.ca.crl(now=c.clock()))[1]
        sets = ", ".join(f"{name} = ?" for name in columns)
        tamper(
            c.settings.db_path,
            f"UPDATE certificates SET {sets} WHERE serial = '{serial}'",  # noqa: S608
            params=tuple(copy),
        )
        if meta_too:
            tamper(
                c.settings.db_path,
                "UPDATE meta SET value = ? WHERE name = 'ca.issued'",
                params=tuple(tally),
            )
        with pytest.raises(IntegrityError, match="revocation was undone"):
            await c.ca.crl(now=c.clock())
        # issuing scans no table: the tally's compromised keys (or its audited counts) refuse
        with pytest.raises((IntegrityError, PermissionDeniedError)):
            await _sign(rpc, 2, stolen)
        auditor = Principal("erin", "auditor", "SHA256:x")
        assert not (await c.admin.audit_verify(auditor, api.Empty())).ok
