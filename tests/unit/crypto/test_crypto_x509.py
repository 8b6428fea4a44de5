"""X.509 recipes: what the CA issues is accepted by OpenSSL, and bad input is refused saying why."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest

from ckms.crypto import (
    CertificateAuthority,
    CertSubject,
    CertUsage,
    KeyType,
    SubjectRole,
    build_crl,
    build_csr,
    certificate_fingerprint,
    certificate_info,
    certificate_matches_key,
    crl_serials,
    generate,
    issue_certificate,
    join_certificates,
    load_csr,
    new_intermediate_ca,
    new_root_ca,
    parse_serial,
    private_key_pem,
    serial_hex,
    split_certificates,
    subject_for,
    verify_certificate,
)
from ckms.errors import ConfigError, CryptoError, IntegrityError

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return new_root_ca("ckms root", lifetime=dt.timedelta(days=3650), now=NOW)


@pytest.fixture(scope="module")
def issuing(root: CertificateAuthority) -> CertificateAuthority:
    return new_intermediate_ca(root, "ckms issuing", lifetime=dt.timedelta(days=365), now=NOW)


def _leaf(
    issuing: CertificateAuthority, usage: CertUsage = CertUsage.BOTH, **kw: object
) -> tuple[bytes, bytes]:
    key = generate(KeyType.ECDSA_P256)
    csr = load_csr(build_csr(key, subject_for(SubjectRole.AGENT, "db-1")))
    cert = issue_certificate(
        issuing,
        csr.public_key,
        subject_for(SubjectRole.AGENT, "db-1"),
        dns_names=kw.get("dns_names", ["db-1.db.internal"]),  # type: ignore[arg-type]
        ip_addresses=kw.get("ip_addresses", ["127.0.0.1"]),  # type: ignore[arg-type]
        lifetime=kw.get("lifetime", DAY),  # type: ignore[arg-type]
        usage=usage,
        now=kw.get("now", NOW),  # type: ignore[arg-type]
    )
    return key, cert


def _openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


@needs_openssl
@pytest.mark.parametrize("usage", list(CertUsage))
def test_openssl_verify_accepts_what_the_ca_issues(
    tmp_path: Path, root: CertificateAuthority, issuing: CertificateAuthority, usage: CertUsage
) -> None:
    now = dt.datetime.now(dt.UTC)
    fresh_root = new_root_ca("r", lifetime=dt.timedelta(days=30), now=now)
    inter = new_intermediate_ca(fresh_root, "i", lifetime=dt.timedelta(days=10), now=now)
    _, cert = _leaf(inter, usage, now=now)
    (tmp_path / "root.pem").write_bytes(fresh_root.certificate)
    (tmp_path / "inter.pem").write_bytes(inter.certificate)
    (tmp_path / "leaf.pem").write_bytes(cert)
    purposes = {CertUsage.SERVER: ["sslserver"], CertUsage.CLIENT: ["sslclient"]}
    for purpose in purposes.get(usage, ["sslserver", "sslclient"]):
        out = _openssl(
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "inter.pem",
            "-purpose",
            purpose,
            "-x509_strict",
            "leaf.pem",
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "leaf.pem: OK" in out.stdout
    wrong = (
        "sslclient"
        if usage is CertUsage.SERVER
        else "sslserver"
        if usage is CertUsage.CLIENT
        else None
    )
    if wrong:
        out = _openssl(
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "inter.pem",
            "-purpose",
            wrong,
            "leaf.pem",
            cwd=tmp_path,
        )
        assert out.returncode != 0, "a certificate for one usage must not pass as the other"


@needs_openssl
def test_openssl_refuses_a_leaf_from_another_root(
    tmp_path: Path, issuing: CertificateAuthority
) -> None:
    now = dt.datetime.now(dt.UTC)
    mine = new_root_ca("mine", lifetime=DAY * 30, now=now)
    theirs = new_root_ca("theirs", lifetime=DAY * 30, now=now)
    inter = new_intermediate_ca(theirs, "i", lifetime=DAY * 10, now=now)
    _, cert = _leaf(inter, now=now)
    (tmp_path / "root.pem").write_bytes(mine.certificate)
    (tmp_path / "inter.pem").write_bytes(inter.certificate)
    (tmp_path / "leaf.pem").write_bytes(cert)
    out = _openssl(
        "verify", "-CAfile", "root.pem", "-untrusted", "inter.pem", "leaf.pem", cwd=tmp_path
    )
    assert out.returncode != 0


def test_leaf_extensions_follow_the_profile(issuing: CertificateAuthority) -> None:
    key, cert = _leaf(issuing, CertUsage.SERVER)
    info = certificate_info(cert)
    assert not info.is_ca
    assert info.subject == "CN=db-1,OU=ckms-agent"
    assert info.issuer == "CN=ckms issuing,OU=ckms-ca"
    assert info.dns_names == ("db-1.db.internal",)
    assert info.ip_addresses == ("127.0.0.1",)
    assert info.not_after - NOW == DAY
    assert info.not_before < NOW
    assert (
        info.subject_key_id
        and info.authority_key_id == certificate_info(issuing.certificate).subject_key_id
    )
    assert certificate_matches_key(cert, key)
    assert not certificate_matches_key(cert, generate(KeyType.ECDSA_P256))
    verify_certificate(
        cert,
        intermediates=issuing.certificate,
        roots=_root_of(issuing),
        now=NOW,
        dns_name="db-1.db.internal",
    )
    with pytest.raises(IntegrityError):
        verify_certificate(
            cert,
            intermediates=issuing.certificate,
            roots=_root_of(issuing),
            now=NOW,
            dns_name="db-2.db.internal",
        )
    with pytest.raises(IntegrityError, match="certificate failed verification"):
        verify_certificate(
            cert,
            intermediates=issuing.certificate,
            roots=_root_of(issuing),
            now=NOW + 2 * DAY,
            dns_name="db-1.db.internal",
        )


_ROOTS: dict[bytes, bytes] = {}


@pytest.fixture(autouse=True, scope="module")
def _remember_root(root: CertificateAuthority, issuing: CertificateAuthority) -> None:
    _ROOTS[issuing.certificate] = root.certificate


def _root_of(ca: CertificateAuthority) -> bytes:
    return _ROOTS[ca.certificate]


def test_a_leaf_never_outlives_its_issuer(issuing: CertificateAuthority) -> None:
    _, cert = _leaf(issuing, lifetime=dt.timedelta(days=5000))
    assert certificate_info(cert).not_after == certificate_info(issuing.certificate).not_after


def test_rsa_leaf_gets_key_encipherment_and_small_rsa_is_refused(
    issuing: CertificateAuthority,
) -> None:
    rsa = generate(KeyType.RSA_3072)
    csr = load_csr(build_csr(rsa, CertSubject("web-1")))
    assert csr.key_type == "rsa-3072"
    cert = issue_certificate(
        issuing, csr.public_key, CertSubject("web-1"), lifetime=DAY, usage=CertUsage.SERVER, now=NOW
    )
    assert certificate_info(cert).subject == "CN=web-1"


def test_csr_round_trip_reports_what_it_asks(issuing: CertificateAuthority) -> None:
    key = generate(KeyType.ECDSA_P384)
    pem = build_csr(
        key,
        subject_for(SubjectRole.BROKER, "kafka-1"),
        dns_names=["Kafka-1.Local."],
        ip_addresses=["::1"],
    )
    info = load_csr(pem)
    assert (info.common_name, info.organizational_unit) == ("kafka-1", "ckms-broker")
    assert info.dns_names == ("kafka-1.local",)
    assert info.ip_addresses == ("::1",)
    assert info.key_type == "ecdsa-p384"
    der_info = load_csr(_pem_to_der(pem))
    assert der_info == info


def _pem_to_der(pem: bytes) -> bytes:
    import base64

    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return base64.b64decode(body)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "could not be parsed"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "could not be parsed",
        ),
        (b"x" * 20000, "larger than"),
        ("text, not bytes", "must be bytes"),
    ],
)
def test_malformed_csrs_are_refused_with_a_clear_error(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_csr(data)  # type: ignore[arg-type]


def test_a_csr_whose_signature_was_tampered_with_is_refused() -> None:
    der = bytearray(_pem_to_der(build_csr(generate(KeyType.ECDSA_P256), CertSubject("db-1"))))
    der[-3] ^= 0x01  # inside the signature value
    with pytest.raises(ConfigError, match=r"signature is not valid|could not be parsed"):
        load_csr(bytes(der))


def test_a_csr_with_another_subject_swapped_in_fails_its_signature() -> None:
    a = _pem_to_der(build_csr(generate(KeyType.ECDSA_P256), CertSubject("aaaa")))
    forged = a.replace(b"aaaa", b"bbbb")
    with pytest.raises(ConfigError, match="signature is not valid"):
        load_csr(forged)


@pytest.mark.parametrize("kt", [KeyType.ED25519, KeyType.X25519])
def test_subject_keys_of_other_types_are_refused(
    kt: KeyType, issuing: CertificateAuthority
) -> None:
    from ckms.crypto import public_key_pem

    pub = public_key_pem(kt, generate(kt))
    assert pub is not None
    with pytest.raises(ConfigError, match="not accepted"):
        issue_certificate(
            issuing, pub, CertSubject("x"), lifetime=DAY, usage=CertUsage.SERVER, now=NOW
        )


@pytest.mark.parametrize(
    "name",
    [
        "*.db.internal",
        "bad_name.internal",
        "-lead.internal",
        "a..b",
        "10.0.0.1",
        "x" * 64 + ".a",
        "",
    ],
)
def test_bad_dns_names_are_refused(name: str, issuing: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match="DNS name"):
        _leaf(issuing, dns_names=[name])


@pytest.mark.parametrize("cn", ["", "x" * 65, "a,OU=ckms-controller", "nul\x00", "a=b"])
def test_subject_names_that_could_forge_a_principal_are_refused(
    cn: str, issuing: CertificateAuthority
) -> None:
    with pytest.raises(ConfigError):
        issue_certificate(
            issuing,
            certificate_info(_leaf(issuing)[1]).public_key,
            CertSubject(cn, "ckms-agent"),
            lifetime=DAY,
            usage=CertUsage.CLIENT,
            now=NOW,
        )


def test_issuing_with_a_key_that_is_not_the_cas_is_refused(issuing: CertificateAuthority) -> None:
    wrong = CertificateAuthority(generate(KeyType.ECDSA_P256), issuing.certificate)
    with pytest.raises(CryptoError, match="does not match"):
        _leaf(wrong)
    _, leaf = _leaf(issuing)
    not_a_ca = CertificateAuthority(generate(KeyType.ECDSA_P256), leaf)
    with pytest.raises(CryptoError):
        _leaf(not_a_ca)


def test_nonpositive_lifetime_and_naive_times_are_refused(issuing: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match="positive"):
        _leaf(issuing, lifetime=dt.timedelta(0))
    with pytest.raises(ConfigError, match="timezone"):
        _leaf(issuing, now=dt.datetime(2026, 1, 1))


@needs_openssl
def test_crl_lists_the_serials_and_openssl_checks_it(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root = new_root_ca("r", lifetime=DAY * 30, now=now)
    inter = new_intermediate_ca(root, "i", lifetime=DAY * 10, now=now)
    _, revoked = _leaf(inter, now=now)
    _, kept = _leaf(inter, now=now)
    serial = certificate_info(revoked).serial
    crl = build_crl(inter, [(serial, now), (serial, now)], crl_number=7, next_update=DAY, now=now)
    assert crl_serials(crl, inter.certificate) == {serial}
    with pytest.raises(IntegrityError):
        crl_serials(crl, root.certificate)
    (tmp_path / "chain.pem").write_bytes(join_certificates(inter.certificate, root.certificate))
    (tmp_path / "crl.pem").write_bytes(crl)
    (tmp_path / "revoked.pem").write_bytes(revoked)
    (tmp_path / "kept.pem").write_bytes(kept)
    out = _openssl("crl", "-in", "crl.pem", "-noout", "-text", cwd=tmp_path)
    assert out.returncode == 0 and "CRL Number" in out.stdout
    # -crl_check checks the leaf against the CRL only (the root-signed intermediate has none).
    bad = _openssl(
        "verify",
        "-CAfile",
        "chain.pem",
        "-CRLfile",
        "crl.pem",
        "-crl_check",
        "revoked.pem",
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "revoked" in (bad.stdout + bad.stderr)
    good = _openssl(
        "verify",
        "-CAfile",
        "chain.pem",
        "-CRLfile",
        "crl.pem",
        "-crl_check",
        "kept.pem",
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stdout + good.stderr


def test_chains_fingerprints_and_serials(
    root: CertificateAuthority, issuing: CertificateAuthority
) -> None:
    _, leaf = _leaf(issuing)
    bundle = join_certificates(leaf, issuing.certificate, root.certificate)
    assert split_certificates(bundle) == [leaf, issuing.certificate, root.certificate]
    fp = certificate_fingerprint(leaf)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert certificate_info(leaf).fingerprint == fp
    with pytest.raises(ConfigError, match="expected one certificate"):
        certificate_fingerprint(bundle)
    info = certificate_info(leaf)
    assert parse_serial(serial_hex(info.serial)) == info.serial == parse_serial(info.serial_hex)
    for bad in ["", "XYZ", "0x12", "a" * 41, 12]:
        with pytest.raises(ConfigError):
            parse_serial(bad)


def test_private_key_pem_is_pkcs8_and_the_ca_repr_hides_its_key(root: CertificateAuthority) -> None:
    key = generate(KeyType.ECDSA_P256)
    pem = private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert private_key_pem(pem) == pem
    assert "key=" not in repr(root) and root.key.hex()[:16] not in repr(root)


def test_subject_convention_matches_kafkas_principal_form() -> None:
    for role in SubjectRole:
        assert subject_for(role, "n1").rfc4514() == f"CN=n1,OU={role.value}"
    assert CertSubject("n1").rfc4514() == "CN=n1"
