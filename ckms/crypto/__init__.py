"""ckms.crypto: the named cryptographic recipes of ckms, the only user of ``cryptography.hazmat``.

Everything else in ckms calls these recipes instead of primitives: key generation and
canonical encodings, install formats, sealing at rest, the root KEK and its shares, HPKE
wrapping for agents, Ed25519 signing, digests, and the X.509 CA (CSRs, leaves, CRLs). Formats
are documented in the private modules and pinned by the known-answer vectors in
``docs/vectors/``. Failures to open, unwrap or verify raise one
:class:`~ckms.errors.IntegrityError` per kind of object; no message, repr or log line carries
key material.
"""

from ckms.crypto._aead import new_data_kek, open_sealed, seal, version_aad
from ckms.crypto._age import age_decrypt_ssh, age_encrypt_to_ssh, is_age_file
from ckms.crypto._derive import DIGEST_KEY_PURPOSE, ROW_MAC_PURPOSE, derive_from_root
from ckms.crypto._digest import (
    hmac_identifier,
    is_keyed_digest,
    material_digest,
    row_mac,
    row_mac_matches,
)
from ckms.crypto._formats import (
    InstallFormat,
    KeyringEntry,
    allowed_formats,
    decode_keyring,
    encode_for_install,
    encode_keyring,
)
from ckms.crypto._hpke import (
    WrapSuite,
    generate_wrapping_keypair,
    unwrap_for_agent,
    wrap_for_agent,
    wrapping_public_key,
)
from ckms.crypto._keytypes import (
    MIN_SECRET_BITS,
    KeyType,
    check_secret_spec,
    generate,
    public_key_pem,
    validate_material,
)
from ckms.crypto._sealing import (
    combine_shares,
    kek_check_value,
    new_root_kek,
    split_root_kek,
    unwrap_root_kek_with_passphrase,
    wrap_root_kek_with_passphrase,
)
from ckms.crypto._signing import (
    generate_signing_key,
    sign,
    signer_key_id,
    signing_public_key,
    verify_signature,
)
from ckms.crypto._sshkeys import signing_key_openssh, signing_public_openssh
from ckms.crypto._x509 import (
    CertificateAuthority,
    CertificateInfo,
    CertSubject,
    CertUsage,
    CsrInfo,
    SubjectRole,
    build_crl,
    build_csr,
    certificate_fingerprint,
    certificate_info,
    certificate_matches_key,
    check_dns_name,
    check_ip_address,
    crl_serials,
    issue_certificate,
    join_certificates,
    load_csr,
    new_ca_key,
    new_intermediate_ca,
    new_root_ca,
    parse_serial,
    private_key_pem,
    public_key_of,
    serial_hex,
    split_certificates,
    subject_for,
    verify_certificate,
)

__all__ = [
    "DIGEST_KEY_PURPOSE",
    "MIN_SECRET_BITS",
    "ROW_MAC_PURPOSE",
    "CertSubject",
    "CertUsage",
    "CertificateAuthority",
    "CertificateInfo",
    "CsrInfo",
    "InstallFormat",
    "KeyType",
    "KeyringEntry",
    "SubjectRole",
    "WrapSuite",
    "age_decrypt_ssh",
    "age_encrypt_to_ssh",
    "allowed_formats",
    "build_crl",
    "build_csr",
    "certificate_fingerprint",
    "certificate_info",
    "certificate_matches_key",
    "check_dns_name",
    "check_ip_address",
    "check_secret_spec",
    "combine_shares",
    "crl_serials",
    "decode_keyring",
    "derive_from_root",
    "encode_for_install",
    "encode_keyring",
    "generate",
    "generate_signing_key",
    "generate_wrapping_keypair",
    "hmac_identifier",
    "is_age_file",
    "is_keyed_digest",
    "issue_certificate",
    "join_certificates",
    "kek_check_value",
    "load_csr",
    "material_digest",
    "new_ca_key",
    "new_data_kek",
    "new_intermediate_ca",
    "new_root_ca",
    "new_root_kek",
    "open_sealed",
    "parse_serial",
    "private_key_pem",
    "public_key_of",
    "public_key_pem",
    "row_mac",
    "row_mac_matches",
    "seal",
    "serial_hex",
    "sign",
    "signer_key_id",
    "signing_key_openssh",
    "signing_public_key",
    "signing_public_openssh",
    "split_certificates",
    "split_root_kek",
    "subject_for",
    "unwrap_for_agent",
    "unwrap_root_kek_with_passphrase",
    "validate_material",
    "verify_certificate",
    "verify_signature",
    "version_aad",
    "wrap_for_agent",
    "wrap_root_kek_with_passphrase",
    "wrapping_public_key",
]
