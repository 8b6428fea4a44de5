"""The controller's CA: made at init (or the first unseal of an older home), sealed, rotated with
overlap, and its issued certificates bound by row MACs (a cleared revocation is refused)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from ckms.controller.ca import CA_RECORD, ControllerCA, revoke_certificates
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import Host
from ckms.controller.policy import default_policy
from ckms.controller.sealing import InitResult, Vault
from ckms.crypto import (
    CertSubject,
    CertUsage,
    KeyType,
    certificate_info,
    chains_to,
    generate,
    public_key_of,
    split_certificates,
)
from ckms.errors import IntegrityError, PolicyError
from ckms.protocol import InstallSpec, RevocationReason, Targets
from ckms.store import Store
from tests.unit.controller.conftest import FakeClock

SPEC = InstallSpec(path="/etc/ckms/tls/{purpose}", format="tls-pem")


async def _issue(
    store: Store, ca: ControllerCA, key_id: str, clock: FakeClock, host: str = "db-1"
) -> str:
    async with store.write() as tx:
        issued = await ca.issue(
            tx,
            host_id=host,
            key_id=key_id,
            key_name="db/server",
            version=1,
            public_key=public_key_of(generate(KeyType.ECDSA_P256)),
            subject=CertSubject(host),
            dns_names=(f"{host}.db.internal",),
            ip_addresses=(),
            lifetime=timedelta(hours=24),
            usage=CertUsage.SERVER,
            now=clock(),
        )
    return issued.info.serial_hex


async def _raw(store: Store, sql: str, params: tuple[object, ...] = ()) -> None:
    """An edit of the database behind the controller's back (rows are not re-stamped)."""
    async with store.write() as tx:
        await tx.execute(sql, params)


async def _key(lifecycle: Lifecycle) -> str:
    key = await lifecycle.create(
        "db/server", "tls-cert", targets=Targets(hosts=("db-1",)), install=SPEC, actor="alice"
    )
    return key.id


async def test_init_makes_a_sealed_ca_whose_intermediate_chains_to_its_root(
    store: Store, vault: Vault, init_result: InitResult
) -> None:
    blob = await store.get_meta(CA_RECORD)
    assert blob is not None and b"BEGIN" not in blob and b"ckms root" not in blob
    state = await ControllerCA(store, vault).state()
    assert [g.generation for g in state.generations] == [1]
    root, issuing = state.active.root.certificate, state.active.issuing.certificate
    assert certificate_info(root).is_ca and certificate_info(issuing).is_ca
    assert chains_to(issuing, b"", root)
    assert split_certificates(state.bundle()) == [root]
    row = await store.fetchone("SELECT details FROM audit WHERE action = 'controller.init'")
    assert json.loads(row["details"])["ca_root"] == certificate_info(root).fingerprint


async def test_a_home_from_before_the_ca_gets_one_at_its_next_unseal(
    store: Store, vault: Vault, init_result: InitResult
) -> None:
    await _raw(store, "DELETE FROM meta WHERE name = ?", (CA_RECORD,))
    await vault.seal()
    await vault.unseal_with_shares(init_result.mnemonics[:2])
    assert (await ControllerCA(store, vault).state()).active.generation == 1
    await vault.seal()
    await vault.unseal_with_shares(init_result.mnemonics[1:])
    created = await store.fetchval("SELECT count(*) FROM audit WHERE action = 'ca.create'")
    assert created == 1, "made once, audited"


async def test_an_edited_ca_record_fails_to_open(store: Store, vault: Vault) -> None:
    blob = bytearray(await store.get_meta(CA_RECORD) or b"")
    blob[-5] ^= 1
    await _raw(store, "UPDATE meta SET value = ? WHERE name = ?", (bytes(blob), CA_RECORD))
    with pytest.raises(IntegrityError):
        await ControllerCA(store, vault).state()


async def test_rotation_keeps_the_old_root_trusted_until_retired(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock: FakeClock
) -> None:
    ca = ControllerCA(store, vault)
    old = (await ca.state()).active
    key_id = await _key(lifecycle)
    await _issue(store, ca, key_id, clock, host="db-2")  # on generation 1
    rotated = await ca.rotate(now=clock(), actor="alice")
    assert [g.generation for g in rotated.trusted] == [2, 1]
    assert split_certificates(await ca.bundle() or b"") == [
        rotated.active.root.certificate,
        old.root.certificate,
    ]
    serial = await _issue(store, ca, key_id, clock)
    row = await store.fetchone("SELECT ca_generation FROM certificates WHERE serial = ?", (serial,))
    assert row["ca_generation"] == 2
    # db-2 has not renewed onto the new CA: retiring now would cut it off.
    with pytest.raises(PolicyError, match=r"1 hosts still hold .*db-2"):
        await ca.retire(now=clock(), actor="alice")
    clock.advance(seconds=1)
    await _issue(store, ca, key_id, clock, host="db-2")  # db-2 renewed (generation 2)
    retired = await ca.retire(now=clock(), actor="alice")
    assert [g.generation for g in retired.trusted] == [2]
    assert split_certificates(await ca.bundle() or b"") == [rotated.active.root.certificate]
    with pytest.raises(PolicyError, match="nothing to retire"):
        await ca.retire(now=clock(), actor="alice")
    events = await store.fetchall("SELECT payload FROM outbox WHERE type = 'ca.rotated'")
    trusted = [json.loads(bytes(e["payload"]))["trusted"] for e in events]
    assert [len(t) for t in trusted] == [2, 1]


async def test_clearing_a_revocation_in_the_file_is_refused(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock: FakeClock
) -> None:
    ca = ControllerCA(store, vault)
    serial = await _issue(store, ca, await _key(lifecycle), clock)
    async with store.write() as tx:
        revoked = await revoke_certificates(
            tx, now=clock(), reason=RevocationReason.SUPERSEDED, host_id="db-1"
        )
        assert revoked == (serial,)
    _, listed = await ca.crl(now=clock())
    assert listed == (serial,)
    # The DB file's owner clears the revocation to drop the serial from the CRL.
    await _raw(store, "UPDATE certificates SET revoked_at = NULL WHERE serial = ?", (serial,))
    store.invalidate()
    with pytest.raises(IntegrityError, match=f"certificate {serial}"):
        await ca.latest()
    # ...or forges a certificate row of their own.
    await _raw(
        store,
        "INSERT INTO certificates(serial, host_id, key_id, version, ca_generation, fingerprint, "
        "not_before, not_after, issued_at, revoked_at) SELECT 'abc', host_id, key_id, version, "
        "ca_generation, fingerprint, not_before, not_after, issued_at, issued_at "
        "FROM certificates WHERE serial = ?",
        (serial,),
    )
    with pytest.raises(IntegrityError):
        await ca.crl(now=clock())


@pytest.mark.requirement("PCI-4.2.1")
async def test_a_certificate_past_its_renewal_is_flagged_before_it_expires(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock: FakeClock
) -> None:
    ca = ControllerCA(store, vault)
    await lifecycle.create(
        "db/server",
        "tls-cert",
        targets=Targets(hosts=("db-1",)),
        install=SPEC,
        policy=default_policy(KeyType.TLS_CERT),
        actor="alice",
    )
    keys = list((await lifecycle.current_keys()).values())
    serial = await _issue(store, ca, keys[0].id, clock)
    host = Host(
        id="db-1",
        name="db-1",
        labels={},
        identity_public_key=b"\x01" * 32,
        wrapping_public_key=b"\x02" * 32,
        enrolled_at=clock(),
    )
    clock.advance(hours=16)  # the renewal point: the host still has time
    assert await ca.overdue(keys, [host], clock()) == []
    clock.advance(hours=4, minutes=1)  # half of the remaining margin gone, not renewed
    (flag,) = await ca.overdue(keys, [host], clock())
    assert (flag.host, flag.serial, flag.expired) == ("db-1", serial, False)
    clock.advance(hours=4)
    (flag,) = await ca.overdue(keys, [host], clock())
    assert flag.expired
    revoked = host.model_copy(update={"revoked": True})
    assert await ca.overdue(keys, [revoked], clock()) == [], "revoked hosts are not nagged"


async def test_deleting_a_revoked_certificate_row_is_refused_by_the_crl(
    store: Store, vault: Vault, lifecycle: Lifecycle, clock: FakeClock
) -> None:
    """Row MACs catch edits, not deletions: the DB file's owner who deletes a revoked row
    would drop its serial from the CRL. The CA's MAC'd tally of what it issued refuses that,
    and so does putting back an older tally with the row (the audit log counts too)."""
    ca = ControllerCA(store, vault)
    key_id = await _key(lifecycle)
    await _issue(store, ca, key_id, clock)
    tally = await store.get_meta("ca.issued")
    serial = await _issue(store, ca, key_id, clock, host="db-2")
    async with store.write() as tx:
        await revoke_certificates(
            tx, now=clock(), reason=RevocationReason.KEY_COMPROMISE, host_id="db-2"
        )
    assert (await ca.crl(now=clock()))[1] == (serial,)
    await _raw(store, "DELETE FROM certificates WHERE serial = ?", (serial,))
    store.invalidate()
    with pytest.raises(IntegrityError, match="deleted"):
        await ca.crl(now=clock())
    assert tally is not None
    await _raw(store, "UPDATE meta SET value = ? WHERE name = 'ca.issued'", (tally,))
    store.invalidate()
    with pytest.raises(IntegrityError, match="deleted"):
        await ca.crl(now=clock())
    with pytest.raises(IntegrityError, match="deleted"):
        await _issue(store, ca, key_id, clock, host="db-3")  # nor does it issue on top
