"""X.509 recipes: the internal CA, CSRs, leaf certificates, CRLs, chains and fingerprints.

Everything crosses this module's boundary as bytes (PEM or DER) or small frozen records, so no
caller outside ``ckms.crypto`` ever holds a pyca object. Choices, in one place:

- CA keys are ECDSA P-256, signatures ECDSA with SHA-256. A root (``CA:true, pathlen:1``) signs
  an intermediate (``CA:true, pathlen:0``) that signs leaves; both carry SKI and AKI so chains
  build without guessing by name, and keyUsage ``keyCertSign, cRLSign``.
- Leaves: ``CA:false`` (critical), keyUsage ``digitalSignature`` (plus ``keyEncipherment`` for
  RSA keys, which TLS 1.2 RSA key exchange needs), extendedKeyUsage ``serverAuth``,
  ``clientAuth`` or both, SAN from the caller (never copied from a CSR), SKI/AKI. A leaf never
  outlives its issuer: ``not_after`` is capped at the issuer's. ``not_before`` is backdated by
  :data:`CLOCK_SKEW` so a host whose clock runs a little behind accepts a fresh certificate.
- Serials are 159 random bits (RFC 5280 §4.1.2.2 allows 20 octets, CA/B asks for 64+ random bits).
  Events and acks name a serial as lowercase hex without separators (:func:`serial_hex`).
- Subjects follow the fleet convention ``CN=<name>,OU=<role>`` (RFC 4514 order, as Java and
  Kafka print it), with the role's OU from :class:`SubjectRole`: Kafka maps the OU to a
  principal for its ACLs.
- Accepted subject keys (CSRs and public keys): ECDSA P-256 and P-384, RSA 3072..8192 bits;
  anything else is refused with a clear error, so a host cannot get a weak or exotic key signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ckms.crypto._encoding import require_bytes
from ckms.errors import ConfigError, CryptoError, IntegrityError

CLOCK_SKEW: Final = dt.timedelta(minutes=5)
"""How far ``not_before`` is set back, so hosts whose clocks lag a little accept a new leaf."""
MAX_CSR_BYTES: Final = 16 * 1024
"""A CSR larger than this is refused before parsing (a P-256 CSR with a few names is < 1 KiB)."""
MAX_SANS: Final = 100
"""Most names one certificate may carry."""
MIN_RSA_BITS: Final = 3072
MAX_RSA_BITS: Final = 8192
_MAX_CN: Final = 64  # ub-common-name, RFC 5280 appendix A
_DNS_LABEL: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SIGNATURE_HASH: Final = hashes.SHA256()
_BAD_CSR: Final = "certificate signing request"


class SubjectRole(StrEnum):
    """Who a certificate names: the OU of ``CN=<name>,OU=<role>``, Kafka maps it to principals."""

    AGENT = "ckms-agent"
    CONTROLLER = "ckms-controller"
    SUBSCRIBER = "ckms-subscriber"
    BROKER = "ckms-broker"
    CA = "ckms-ca"


class CertUsage(StrEnum):
    """What a leaf certificate may authenticate: a TLS server, a TLS client, or both."""

    SERVER = "server"
    CLIENT = "client"
    BOTH = "both"


@dataclass(frozen=True)
class CertSubject:
    """A certificate subject of the fleet convention: a common name and an optional role OU."""

    common_name: str
    organizational_unit: str | None = None

    def rfc4514(self) -> str:
        """The subject as Kafka and OpenSSL's RFC 2253 mode print it: ``CN=<name>,OU=<role>``."""
        return _name(self).rfc4514_string()


def subject_for(role: SubjectRole, name: str) -> CertSubject:
    """The subject the fleet convention gives ``name`` in ``role`` (``CN=<name>,OU=<role>``)."""
    return CertSubject(name, SubjectRole(role).value)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA: its PKCS#8 DER private key (never in a repr) and its certificate (PEM)."""

    key: bytes = field(repr=False)
    certificate: bytes


@dataclass(frozen=True)
class CsrInfo:
    """A checked CSR: what it asks for, and its subject public key (SubjectPublicKeyInfo DER)."""

    common_name: str | None
    organizational_unit: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    public_key: bytes
    key_type: str


@dataclass(frozen=True)
class CertificateInfo:
    """What callers need to know about one certificate, read from it."""

    serial: int
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    is_ca: bool
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    public_key: bytes
    subject_key_id: str | None
    authority_key_id: str | None

    @property
    def serial_hex(self) -> str:
        """The serial as events and acks carry it."""
        return serial_hex(self.serial)


# --- names -------------------------------------------------------------------------------------


def _check_cn(text: object, what: str) -> str:
    if not isinstance(text, str) or not text or len(text) > _MAX_CN:
        raise ConfigError(f"{what} must be 1..{_MAX_CN} characters")
    if not text.isprintable() or any(c in text for c in ',+="\\<>;#'):
        raise ConfigError(f"{what} {text!r} holds characters a subject name may not carry")
    return text


def _name(subject: CertSubject) -> x509.Name:
    # ASN.1 order OU then CN: RFC 4514 strings list the last RDN first, giving "CN=...,OU=...".
    attrs = []
    if subject.organizational_unit is not None:
        ou = _check_cn(subject.organizational_unit, "organizational unit")
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    cn = _check_cn(subject.common_name, "common name")
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def check_dns_name(name: object) -> str:
    """Return a lowercase DNS name fit for a SAN, refusing wildcards, IPs and malformed names."""
    if not isinstance(name, str):
        raise ConfigError("DNS name must be a string")
    text = name.strip().rstrip(".").lower()
    if not text or len(text) > 253:
        raise ConfigError(f"DNS name {name!r} must be 1..253 characters")
    if "*" in text:
        raise ConfigError(f"DNS name {name!r}: wildcard names are not issued")
    labels = text.split(".")
    if not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(f"DNS name {name!r} is not a valid host name (a-z, 0-9, '-', dots)")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text
    raise ConfigError(f"DNS name {name!r} is an IP address; give it as an IP SAN")


def check_ip_address(address: object) -> str:
    """Return an IP address in its compressed text form, refusing anything else."""
    try:
        return str(ipaddress.ip_address(str(address).strip()))
    except ValueError:
        raise ConfigError(f"{address!r} is not an IP address") from None


def _sans(dns_names: Iterable[str], ip_addresses: Iterable[str]) -> list[x509.GeneralName]:
    dns = list(dict.fromkeys(check_dns_name(n) for n in dns_names))
    ips = list(dict.fromkeys(check_ip_address(a) for a in ip_addresses))
    if len(dns) + len(ips) > MAX_SANS:
        raise ConfigError(f"a certificate carries at most {MAX_SANS} names")
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    return names


# --- keys --------------------------------------------------------------------------------------


def _load_private(key: bytes) -> PrivateKeyTypes:
    data = require_bytes(key, "private key")
    try:
        if data.lstrip().startswith(b"-----"):
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CryptoError("private key could not be loaded") from None


def _ca_key(authority: CertificateAuthority) -> ec.EllipticCurvePrivateKey:
    key = _load_private(authority.key)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CryptoError("CA key must be an ECDSA key")
    return key


def _check_subject_key(key: object) -> str:
    """Refuse subject keys ckms does not certify; return the key's type name."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ecdsa-p256"
        if isinstance(key.curve, ec.SECP384R1):
            return "ecdsa-p384"
        raise ConfigError(f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise ConfigError(
                f"RSA key of {key.key_size} bits is not accepted ({MIN_RSA_BITS}..{MAX_RSA_BITS})"
            )
        return f"rsa-{key.key_size}"
    raise ConfigError("subject key type is not accepted (ECDSA P-256/P-384 or RSA 3072+)")


def _load_public(public_key: bytes) -> CertificateIssuerPublicKeyTypes:
    data = require_bytes(public_key, "public key")
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("public key could not be parsed") from None
    _check_subject_key(key)
    return key  # type: ignore[return-value]  # checked: EC or RSA


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def new_ca_key() -> bytes:
    """A fresh ECDSA P-256 private key for a CA, as unencrypted PKCS#8 DER."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_pem(key: bytes) -> bytes:
    """A private key (PKCS#8 DER or PEM) as unencrypted PKCS#8 PEM, which nginx, HAProxy,
    PostgreSQL and Kafka all read."""
    return _load_private(key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a public key's SubjectPublicKeyInfo DER (PEM or DER given, normalised
    first): the same key pair has the same fingerprint in every CSR and certificate."""
    return hashlib.sha256(_spki(_load_public(public_key))).hexdigest()


def public_key_of(key: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key (PKCS#8 DER or PEM)."""
    return _spki(_load_private(key).public_key())


# --- CA ----------------------------------------------------------------------------------------


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ConfigError("time must be timezone-aware")
    return now.astimezone(dt.UTC)


def _lifetime(lifetime: dt.timedelta) -> dt.timedelta:
    if not isinstance(lifetime, dt.timedelta) or lifetime <= dt.timedelta(0):
        raise ConfigError("certificate lifetime must be a positive duration")
    return lifetime


def _ca_extensions(
    builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, path_length: int
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def new_root_ca(
    common_name: str,
    *,
    lifetime: dt.timedelta,
    key: bytes | None = None,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """Create a self-signed ECDSA P-256 root CA (``CA:true, pathlen:1``), ``OU=ckms-ca``."""
    at = _utc(now)
    ca_key_der = key if key is not None else new_ca_key()
    ca_key = _ca_key(CertificateAuthority(ca_key_der, b""))
    name = _name(CertSubject(common_name, SubjectRole.CA.value))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - CLOCK_SKEW)
        .not_valid_after(at + _lifetime(lifetime))
    )
    builder = _ca_extensions(builder, ca_key, path_length=1)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    cert = builder.sign(ca_key, _SIGNATURE_HASH)
    return CertificateAuthority(ca_key_der, cert.public_bytes(serialization.Encoding.PEM))


def new_intermediate_ca(
    root: CertificateAuthority,
    common_name: str,
    *,
    lifetime: dt.timedelta,
    key: bytes | None = None,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """Create an ECDSA P-256 intermediate (``CA:true, pathlen:0``) signed by ``root``."""
    at = _utc(now)
    root_key = _ca_key(root)
    root_cert = _load_one(root.certificate)
    _check_issuer(root_cert, root_key)
    inter_der = key if key is not None else new_ca_key()
    inter_key = _ca_key(CertificateAuthority(inter_der, b""))
    not_after = min(at + _lifetime(lifetime), root_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(CertSubject(common_name, SubjectRole.CA.value)))
        .issuer_name(root_cert.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(at - CLOCK_SKEW, root_cert.not_valid_before_utc))
        .not_valid_after(not_after)
    )
    builder = _ca_extensions(builder, inter_key, path_length=0)
    builder = builder.add_extension(_aki(root_cert), critical=False)
    cert = builder.sign(root_key, _SIGNATURE_HASH)
    return CertificateAuthority(inter_der, cert.public_bytes(serialization.Encoding.PEM))


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_issuer(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Refuse a CA whose key is not the one its certificate names, or that is not a CA."""
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise CryptoError("CA key does not match the CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CryptoError("CA certificate has no basicConstraints") from None
    if not bc.ca:
        raise CryptoError("issuer certificate is not a CA")


# --- CSR ---------------------------------------------------------------------------------------


def build_csr(
    private_key: bytes,
    subject: CertSubject | None,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> bytes:
    """Build a PEM CSR signed by ``private_key`` (PKCS#8 DER or PEM) for ``subject`` and SANs.

    ``subject=None`` asks for no name at all: the CA decides every name (as the ckms controller
    does for ``tls-cert`` keys); the CSR then only proves the requester holds the key.
    """
    key = _load_private(private_key)
    _check_subject_key(key.public_key())
    name = x509.Name([]) if subject is None else _name(subject)
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    sans = _sans(dns_names, ip_addresses)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, _SIGNATURE_HASH)  # type: ignore[arg-type]  # EC or RSA, checked
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(data: bytes) -> CsrInfo:
    """Parse and check a CSR (PEM or DER): well formed, self-signature valid, subject key accepted.

    Raises ConfigError saying what is wrong; the CSR's requested extensions other than its SAN
    are ignored, since :func:`issue_certificate` decides every extension itself.
    """
    raw = require_bytes(data, _BAD_CSR)
    if len(raw) > MAX_CSR_BYTES:
        raise ConfigError(f"{_BAD_CSR} is larger than {MAX_CSR_BYTES} bytes")
    try:
        if raw.lstrip().startswith(b"-----"):
            csr = x509.load_pem_x509_csr(raw)
        else:
            csr = x509.load_der_x509_csr(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{_BAD_CSR} could not be parsed") from None
    try:
        valid = csr.is_signature_valid
        public = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType):
        raise ConfigError(f"{_BAD_CSR} has an unsupported key or signature") from None
    if not valid:
        raise ConfigError(f"{_BAD_CSR} signature is not valid")
    key_type = _check_subject_key(public)
    try:
        cn = _single_attr(csr.subject, NameOID.COMMON_NAME)
        ou = _single_attr(csr.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        dns, ips = _read_sans(csr.extensions)
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise ConfigError(f"{_BAD_CSR} has malformed subject or extensions") from None
    return CsrInfo(cn, ou, dns, ips, _spki(public), key_type)


def _single_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    if len(attrs) > 1:
        raise ValueError("repeated attribute")
    value = attrs[0].value
    if not isinstance(value, str):
        raise ValueError("non-text attribute")
    return value


def _read_sans(extensions: x509.Extensions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    return dns, ips


# --- leaves ------------------------------------------------------------------------------------


def _leaf_usage(usage: CertUsage, key: object) -> tuple[x509.KeyUsage, x509.ExtendedKeyUsage]:
    u = CertUsage(usage)
    ekus = {
        CertUsage.SERVER: [ExtendedKeyUsageOID.SERVER_AUTH],
        CertUsage.CLIENT: [ExtendedKeyUsageOID.CLIENT_AUTH],
        CertUsage.BOTH: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    }[u]
    ku = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    return ku, x509.ExtendedKeyUsage(ekus)


def issue_certificate(
    issuer: CertificateAuthority,
    public_key: bytes,
    subject: CertSubject,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    lifetime: dt.timedelta,
    usage: CertUsage,
    now: dt.datetime | None = None,
) -> bytes:
    """Issue a leaf certificate (PEM) for ``public_key`` (SPKI DER or PEM: ``CsrInfo.public_key``).

    Names come only from the arguments: a CSR's requested SANs are the caller's to check and pass
    on, never copied. ``not_after`` is capped at the issuer's own.
    """
    at = _utc(now)
    ca_key = _ca_key(issuer)
    ca_cert = _load_one(issuer.certificate)
    _check_issuer(ca_cert, ca_key)
    subject_key = _load_public(public_key)
    key_usage, eku = _leaf_usage(usage, subject_key)
    sans = _sans(dns_names, ip_addresses)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(at - CLOCK_SKEW, ca_cert.not_valid_before_utc))
        .not_valid_after(min(at + _lifetime(lifetime), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, _SIGNATURE_HASH)
    return cert.public_bytes(serialization.Encoding.PEM)


# --- CRL ---------------------------------------------------------------------------------------


def build_crl(
    issuer: CertificateAuthority,
    revoked: Iterable[tuple[int, dt.datetime] | tuple[int, dt.datetime, str | None]],
    *,
    crl_number: int,
    next_update: dt.timedelta,
    now: dt.datetime | None = None,
) -> bytes:
    """Build a PEM CRL signed by ``issuer`` listing ``(serial, revoked_at[, reason])`` entries.

    ``reason`` is an RFC 5280 reason name (``keyCompromise``, ``superseded``, ...); it becomes
    the entry's reasonCode extension, left out for none or ``unspecified`` (as RFC 5280 asks)."""
    at = _utc(now)
    ca_key = _ca_key(issuer)
    ca_cert = _load_one(issuer.certificate)
    _check_issuer(ca_cert, ca_key)
    if isinstance(crl_number, bool) or not isinstance(crl_number, int) or crl_number < 0:
        raise ConfigError("CRL number must be a non-negative integer")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(at)
        .next_update(at + _lifetime(next_update))
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    seen: set[int] = set()
    for serial, when, *why in revoked:
        if serial in seen:
            continue
        seen.add(serial)
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_utc(when))
        reason = why[0] if why else None
        if reason is not None and reason != "unspecified":
            try:
                flag = x509.ReasonFlags(reason)
            except ValueError:
                raise ConfigError(f"unknown CRL reason {reason!r}") from None
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, _SIGNATURE_HASH).public_bytes(serialization.Encoding.PEM)


def crl_serials(crl_pem: bytes, issuer_certificate: bytes) -> frozenset[int]:
    """The serials a CRL lists, after checking it is signed by ``issuer_certificate``."""
    try:
        crl = x509.load_pem_x509_crl(require_bytes(crl_pem, "CRL"))
    except ValueError:
        raise ConfigError("CRL could not be parsed") from None
    issuer = _load_one(issuer_certificate)
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise IntegrityError("CRL failed integrity check")
    return frozenset(r.serial_number for r in crl)


def crl_reasons(crl_pem: bytes, issuer_certificate: bytes) -> dict[int, str | None]:
    """Each serial a CRL lists with its reasonCode's name (None: no reason given), after
    checking it is signed by ``issuer_certificate``."""
    crl_serials(crl_pem, issuer_certificate)
    out: dict[int, str | None] = {}
    for entry in x509.load_pem_x509_crl(crl_pem):
        try:
            ext = entry.extensions.get_extension_for_class(x509.CRLReason)
            out[entry.serial_number] = ext.value.reason.value
        except x509.ExtensionNotFound:
            out[entry.serial_number] = None
    return out


# --- reading, chains, fingerprints -------------------------------------------------------------


def _load_one(pem: bytes) -> x509.Certificate:
    certs = _load_many(pem)
    if len(certs) != 1:
        raise ConfigError(f"expected one certificate, found {len(certs)}")
    return certs[0]


def _load_many(pem: bytes) -> list[x509.Certificate]:
    data = require_bytes(pem, "certificate")
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError("certificate could not be parsed") from None


def split_certificates(pem: bytes) -> list[bytes]:
    """Split a PEM bundle into one PEM block per certificate, in order."""
    return [c.public_bytes(serialization.Encoding.PEM) for c in _load_many(pem)]


def join_certificates(*pems: bytes) -> bytes:
    """Join certificates (each PEM, or PEM bundles) into one bundle: leaf first, then issuers."""
    return b"".join(b"".join(split_certificates(p)) for p in pems)


def certificate_fingerprint(pem: bytes) -> str:
    """``"sha256:" + hex`` of the certificate's DER, the form ckms shows and compares."""
    der = _load_one(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def serial_hex(serial: int) -> str:
    """A serial as lowercase hex without separators, the form events and acks carry."""
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise ConfigError("serial must be a non-negative integer")
    return format(serial, "x")


def parse_serial(text: object) -> int:
    """The inverse of :func:`serial_hex`, refusing anything that is not 1..40 hex digits."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-f]{1,40}", text):
        raise ConfigError("serial must be 1..40 lowercase hex digits")
    return int(text, 16)


def certificate_info(pem: bytes) -> CertificateInfo:
    """Read one certificate (PEM or DER) into a :class:`CertificateInfo`."""
    cert = _load_one(pem)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        dns, ips = _read_sans(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise ConfigError("certificate has malformed extensions") from None
    return CertificateInfo(
        serial=cert.serial_number,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=certificate_fingerprint(cert.public_bytes(serialization.Encoding.PEM)),
        is_ca=is_ca,
        dns_names=dns,
        ip_addresses=ips,
        public_key=_spki(_certified_key(cert)),
        subject_key_id=_key_id(cert, x509.SubjectKeyIdentifier),
        authority_key_id=_key_id(cert, x509.AuthorityKeyIdentifier),
    )


def _key_id(cert: x509.Certificate, kind: type) -> str | None:
    try:
        value = cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    raw = value.digest if kind is x509.SubjectKeyIdentifier else value.key_identifier
    return raw.hex() if raw is not None else None


def certificate_matches_key(certificate: bytes, private_key: bytes) -> bool:
    """Say whether ``private_key`` (PKCS#8 DER or PEM) is the key ``certificate`` names."""
    return _spki(_certified_key(_load_one(certificate))) == public_key_of(private_key)


def _certified_key(cert: x509.Certificate) -> object:
    """A certificate's subject public key; ConfigError for an algorithm or curve pyca cannot
    load (its own exception must not cross this module's boundary)."""
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("certificate has an unsupported subject key") from None


def chains_to(leaf: bytes, chain: bytes, roots: bytes, *, now: dt.datetime | None = None) -> bool:
    """Whether ``leaf`` is signed by the first certificate of ``chain`` (or by a root), each
    link by the next, ending at one of ``roots``, every one valid at ``now``.

    Usage-agnostic (no EKU or name check): what an agent checks of a certificate the
    controller just issued it, before installing it.
    """
    at = _utc(now)
    try:
        path = [_load_one(leaf), *(_load_many(chain) if chain.strip() else [])]
        anchors = _load_many(roots)
    except ConfigError:
        return False
    if any(not (c.not_valid_before_utc <= at <= c.not_valid_after_utc) for c in path):
        return False
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            return False
    return any(
        _issued_by(path[-1], root) and root.not_valid_before_utc <= at <= root.not_valid_after_utc
        for root in anchors
    )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def verify_certificate(
    leaf: bytes,
    *,
    intermediates: bytes = b"",
    roots: bytes,
    now: dt.datetime | None = None,
    dns_name: str | None = None,
) -> None:
    """Check that ``leaf`` chains through ``intermediates`` to one of ``roots`` at ``now``.

    With ``dns_name`` the leaf is checked as a TLS server certificate for that name, without it
    as a TLS client certificate (RFC 5280 path validation with the Web PKI profile of pyca).
    Any failure raises IntegrityError.
    """
    leaf_cert = _load_one(leaf)
    inter = _load_many(intermediates) if intermediates.strip() else []
    store = Store(_load_many(roots))
    builder = PolicyBuilder().store(store).time(_utc(now))
    try:
        if dns_name is not None:
            verifier = builder.build_server_verifier(x509.DNSName(check_dns_name(dns_name)))
            verifier.verify(leaf_cert, inter)
        else:
            builder.build_client_verifier().verify(leaf_cert, inter)
    except VerificationError:
        raise IntegrityError("certificate failed verification") from None
