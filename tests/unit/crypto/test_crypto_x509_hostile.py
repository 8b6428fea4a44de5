"""Hostile input to the X.509 recipes: a CSR (from a host) or a certificate (to an agent) with a
key algorithm or curve pyca does not support must be refused with ckms's own error, never a
raw ``cryptography`` exception (which the controller's RPC server reports as an internal error
with a traceback, and a caller outside ``ckms.crypto`` cannot catch by type)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from ckms.crypto import (
    CertSubject,
    CertUsage,
    KeyType,
    build_csr,
    certificate_info,
    certificate_matches_key,
    chains_to,
    generate,
    issue_certificate,
    load_csr,
    new_root_ca,
    public_key_of,
)
from ckms.errors import ConfigError

EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # OID id-ecPublicKey
P256 = bytes.fromhex("06082a8648ce3d030107")  # OID prime256v1


def _der(pem: bytes) -> bytes:
    """The DER inside one PEM block."""
    return base64.b64decode(b"".join(ln for ln in pem.splitlines() if not ln.startswith(b"-----")))


def _csr_der() -> bytes:
    return _der(build_csr(generate(KeyType.ECDSA_P256), None))


@pytest.mark.parametrize(
    ("oid", "unknown"),
    [
        (EC_PUBLIC_KEY, bytes.fromhex("06072a8648ce3d0209")),  # an unknown key algorithm
        (P256, bytes.fromhex("06082a8648ce3d030109")),  # an unknown curve
    ],
)
def test_a_csr_with_an_unsupported_key_is_refused_as_config_error(
    oid: bytes, unknown: bytes
) -> None:
    der = _csr_der()
    assert oid in der
    with pytest.raises(ConfigError, match="certificate signing request"):
        load_csr(der.replace(oid, unknown))


def test_a_certificate_with_an_unsupported_key_is_refused_as_config_error() -> None:
    """What an agent checks of a reply: a certificate whose key pyca cannot load (a hostile
    controller, or a corrupted reply) is refused, not an exception the agent does not expect."""
    root = new_root_ca("t root", lifetime=timedelta(days=1))
    key = generate(KeyType.ECDSA_P256)
    leaf = issue_certificate(
        root,
        public_key_of(key),
        CertSubject("h"),
        dns_names=["h.example"],
        lifetime=timedelta(hours=1),
        usage=CertUsage.SERVER,
    )
    der = _der(leaf)
    bad = der.replace(P256, bytes.fromhex("06082a8648ce3d030109"), 1)
    assert bad != der
    with pytest.raises(ConfigError):
        certificate_info(bad)
    with pytest.raises(ConfigError):
        certificate_matches_key(bad, key)
    assert not chains_to(bad, b"", root.certificate)
