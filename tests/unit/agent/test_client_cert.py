"""The agent renews only the Kafka client certificate the controller's CA issued it, at two
thirds of its lifetime; files from another CA are the operator's and are left alone."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ckms.crypto import (
    CertUsage,
    KeyType,
    SubjectRole,
    generate,
    issue_certificate,
    join_certificates,
    new_intermediate_ca,
    new_root_ca,
    public_key_of,
    subject_for,
)
from ckms_agent import certs
from ckms_agent.certs import ClientCertKeeper

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def _pki(name: str) -> tuple[bytes, bytes]:
    """(root bundle, leaf + chain) of a fresh CA issuing one 24 h client certificate at NOW."""
    root = new_root_ca(name, lifetime=dt.timedelta(days=30), now=NOW - dt.timedelta(days=1))
    inter = new_intermediate_ca(root, name, lifetime=dt.timedelta(days=10), now=NOW)
    leaf = issue_certificate(
        inter,
        public_key_of(generate(KeyType.ECDSA_P256)),
        subject_for(SubjectRole.AGENT, "db-1"),
        lifetime=dt.timedelta(hours=24),
        usage=CertUsage.CLIENT,
        now=NOW,
    )
    return root.certificate, join_certificates(leaf, inter.certificate)


def _keeper(tmp_path: Path) -> ClientCertKeeper:
    return ClientCertKeeper(
        cert_path=tmp_path / "kafka" / "client.pem",
        key_path=tmp_path / "kafka" / "client.key",
        bundle_path=tmp_path / "ca-bundle.pem",
        host_id="db-1",
        clock=lambda: NOW.timestamp(),
    )


def test_the_ckms_issued_certificate_renews_at_two_thirds(tmp_path: Path) -> None:
    bundle, chain = _pki("ckms")
    (tmp_path / "ca-bundle.pem").write_bytes(bundle)
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "client.pem").write_bytes(chain)
    due = _keeper(tmp_path).renew_at()
    assert due == (NOW + dt.timedelta(hours=16)).timestamp()


def test_an_expired_certificate_of_ours_is_renewed_at_once(tmp_path: Path) -> None:
    bundle, chain = _pki("ckms")
    (tmp_path / "ca-bundle.pem").write_bytes(bundle)
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "client.pem").write_bytes(chain)
    later = ClientCertKeeper(
        cert_path=tmp_path / "kafka" / "client.pem",
        key_path=tmp_path / "kafka" / "client.key",
        bundle_path=tmp_path / "ca-bundle.pem",
        host_id="db-1",
        clock=lambda: (NOW + dt.timedelta(days=3)).timestamp(),
    )
    due = later.renew_at()
    assert due is not None and due < (NOW + dt.timedelta(days=3)).timestamp()


def test_another_cas_certificate_is_left_alone(tmp_path: Path) -> None:
    ours, _ = _pki("ckms")
    _, theirs = _pki("operator's own CA")
    (tmp_path / "ca-bundle.pem").write_bytes(ours)
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "client.pem").write_bytes(theirs)
    assert _keeper(tmp_path).renew_at() is None


def test_a_host_without_one_asks_once_the_controller_has_a_ca(tmp_path: Path) -> None:
    assert _keeper(tmp_path).renew_at() is None, "no CA bundle: nothing to ask for"
    bundle, _ = _pki("ckms")
    (tmp_path / "ca-bundle.pem").write_bytes(bundle)
    assert _keeper(tmp_path).renew_at() == NOW.timestamp()


def test_the_certificate_is_judged_again_only_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every sync and renewal check asks; parsing and checking the chain each time was most of
    # an idle agent's renewal work.
    checked = []
    real = certs.chains_to
    monkeypatch.setattr(certs, "chains_to", lambda *a, **k: checked.append(1) or real(*a, **k))
    bundle, chain = _pki("ckms")
    (tmp_path / "ca-bundle.pem").write_bytes(bundle)
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "client.pem").write_bytes(chain)
    keeper = _keeper(tmp_path)
    due = keeper.renew_at()
    assert keeper.renew_at() == keeper.renew_at() == due and len(checked) == 1
    _, theirs = _pki("operator's own CA")
    (tmp_path / "kafka" / "client.pem").write_bytes(theirs)
    assert keeper.renew_at() is None and len(checked) == 2
    (tmp_path / "ca-bundle.pem").write_bytes(bundle + _pki("ckms next")[0])
    keeper.renew_at()
    assert len(checked) == 3
