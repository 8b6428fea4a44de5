"""ckms.crypto: the named cryptographic recipes of ckms, the only user of ``cryptography.hazmat``.

Everything else in ckms calls these recipes instead of primitives: key generation and
canonical encodings, install formats, sealing at rest, the root KEK and its shares, HPKE
wrapping for agents, Ed25519 signing, digests, and the X.509 CA (CSRs, leaves, CRLs). Formats
are documented in the private modules and pinned by the known-answer vectors in
``docs/vectors/``. Failures to open, unwrap or verify raise one
:class:`~ckms.errors.IntegrityError` per kind of object; no message, repr or log line carries
key material.
"""

from ckms._lazy import lazy_exports

# Each submodule loads on first use of one of its names (ckms._lazy says why).
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "_aead": (
            "new_data_kek",
            "open_sealed",
            "seal",
            "staged_aad",
            "version_aad",
        ),
        "_age": (
            "age_decrypt_ssh",
            "age_encrypt_to_ssh",
            "is_age_file",
        ),
        "_derive": (
            "DIGEST_KEY_PURPOSE",
            "ROW_MAC_PURPOSE",
            "derive_from_root",
        ),
        "_digest": (
            "hmac_identifier",
            "is_keyed_digest",
            "material_digest",
            "row_mac",
            "row_mac_matches",
        ),
        "_formats": (
            "InstallFormat",
            "KeyringEntry",
            "allowed_formats",
            "decode_keyring",
            "encode_for_install",
            "encode_keyring",
        ),
        "_hpke": (
            "WrapSuite",
            "generate_wrapping_keypair",
            "unwrap_for_agent",
            "wrap_for_agent",
            "wrapping_public_key",
        ),
        "_import": (
            "MAX_IMPORT_BYTES",
            "ImportFormat",
            "import_formats",
            "import_material",
        ),
        "_keytypes": (
            "MIN_SECRET_BITS",
            "KeyType",
            "check_secret_spec",
            "generate",
            "public_key_pem",
            "validate_material",
        ),
        "_sealing": (
            "combine_shares",
            "kek_check_value",
            "new_root_kek",
            "split_root_kek",
            "unwrap_root_kek_with_passphrase",
            "wrap_root_kek_with_passphrase",
        ),
        "_signing": (
            "generate_signing_key",
            "sign",
            "signer_key_id",
            "signing_public_key",
            "verify_signature",
        ),
        "_sshkeys": (
            "signing_key_openssh",
            "signing_public_openssh",
        ),
        "_x509": (
            "CLOCK_SKEW",
            "CertificateAuthority",
            "CertificateInfo",
            "CertSubject",
            "CertUsage",
            "CsrInfo",
            "SubjectRole",
            "build_crl",
            "build_csr",
            "certificate_fingerprint",
            "certificate_info",
            "certificate_matches_key",
            "chains_to",
            "check_dns_name",
            "check_ip_address",
            "crl_reasons",
            "crl_serials",
            "issue_certificate",
            "join_certificates",
            "load_csr",
            "new_ca_key",
            "new_intermediate_ca",
            "new_root_ca",
            "parse_serial",
            "private_key_pem",
            "public_key_fingerprint",
            "public_key_of",
            "serial_hex",
            "split_certificates",
            "subject_for",
            "verify_certificate",
        ),
    },
)
del lazy_exports
