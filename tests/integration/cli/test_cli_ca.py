"""``ckms ca`` and tls-cert keys from the operator CLI: create, fleet status with expiry, the
status warning for a certificate that missed its renewal, rotate (admins only), crl."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from ckms.controller.service import Controller
from ckms.crypto import certificate_info, split_certificates
from tests.support.cli import MovableClock, Operators
from tests.support.fleet import enroll_agent, running_agent, wait_until
from tests.support.tls import needs_openssl, openssl

pytestmark = [pytest.mark.kafka, needs_openssl]

DB = {"env": "prod", "role": "db"}


async def test_tls_cert_keys_and_the_ca_from_the_cli(
    controller: Controller, ops: Operators, clock: MovableClock, tmp_path: Path
) -> None:
    c = controller
    shown = await ops.ckms("ca", "show", "--json", who="erin")
    assert shown.rc == 0, shown.stderr
    (generation,) = shown.json()["generations"]
    assert generation["active"] and generation["trusted"]
    refused = await ops.ckms("ca", "rotate", who="dave")
    assert refused.rc == 1 and "ca.rotate" in refused.stderr + refused.stdout

    config = await enroll_agent(c, tmp_path, "db-1", DB)
    run = await ops.ckms(
        "key", "create", "db/server", "--type", "tls-cert", "--target", "env=prod,role=db",
        "--path", "/keys/tls/{purpose}", "--san", "{host}.db.internal", "--cert-lifetime", "1h",
        who="dave",
    )  # fmt: skip
    assert run.rc == 0, run.stderr
    cert = tmp_path / "db-1" / "root" / "keys/tls/server/cert.pem"
    async with running_agent(config):
        await wait_until(lambda: _installed(c), what="certificate installed and acked")
    serial = certificate_info(cert.read_bytes()).serial_hex
    fleet = await ops.ckms("fleet", "status", "db/server", who="erin")
    assert fleet.rc == 0, fleet.stderr
    assert "certificate" in fleet.stdout and serial[:12] in fleet.stdout.replace("\n", "")

    healthy = await ops.ckms("status", who="erin")
    assert "certificate not renewed" not in healthy.stdout
    clock.advance(timedelta(minutes=51))  # past 2/3 + 1/6 of the hour: the agent is stopped
    warned = await ops.ckms("status", who="erin")
    assert "certificate not renewed" in warned.stdout, warned.stdout
    assert "db-1" in warned.stdout and serial in warned.stdout.replace("\n", "")

    rotated = await ops.ckms("ca", "rotate", "--bundle", str(tmp_path / "bundle.pem"), who="alice")
    assert rotated.rc == 0, rotated.stderr
    assert len(split_certificates((tmp_path / "bundle.pem").read_bytes())) == 2

    revoked = await ops.ckms(
        "key", "revoke", "db/server", "--reason", "keyCompromise", "-m", "test", who="dave"
    )
    assert revoked.rc == 0, revoked.stderr
    crl = tmp_path / "ckms.crl"
    written = await ops.ckms("ca", "crl", "--out", str(crl), who="erin")
    assert written.rc == 0 and "1 revoked serials" in written.stdout, written.stdout
    # One CRL per trusted generation, newest first: the certificate came from generation 1.
    end = "-----END X509 CRL-----\n"
    blocks = [b + end for b in crl.read_text().split(end) if b.strip()]
    assert len(blocks) == 2
    listed = []
    for i, block in enumerate(blocks):
        (tmp_path / f"crl-{i}.pem").write_text(block)
        text = openssl("crl", "-in", str(tmp_path / f"crl-{i}.pem"), "-noout", "-text")
        assert text.returncode == 0, text.stderr
        listed.append(serial.upper() in text.stdout.replace(":", "").replace(" ", "").upper())
    assert listed == [False, True]


async def _installed(c: Controller) -> bool:
    assert c.store is not None
    return bool(
        await c.store.fetchval(
            "SELECT count(*) FROM certificates WHERE host_id = 'db-1' AND kind = 'tls-cert' "
            "AND installed_at IS NOT NULL"
        )
    )


async def test_crl_out_replaces_the_file_atomically(ops: Operators, tmp_path: Path) -> None:
    """`ckms ca crl -o FILE` writes a temp file beside FILE and renames it over: a reader of the
    old file (here: a hard link to it) never sees it truncated or half-written, and nothing of
    the temp file is left behind."""
    out = tmp_path / "crls" / "ckms.crl"
    out.parent.mkdir()
    out.write_text("old CRL\n")
    (out.parent / "reader").hardlink_to(out)
    written = await ops.ckms("ca", "crl", "-o", str(out), who="erin")
    assert written.rc == 0, written.stderr
    assert out.read_text().startswith("-----BEGIN X509 CRL-----")
    assert (out.parent / "reader").read_text() == "old CRL\n"  # a new file, not rewritten
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckms.crl", "reader"]
