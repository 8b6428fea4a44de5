"""The public surface of ckms.crypto is exactly what other packages build on."""

from __future__ import annotations

import ckms.crypto

EXPECTED = {
    "CLOCK_SKEW",
    "DIGEST_KEY_PURPOSE",
    "MAX_IMPORT_BYTES",
    "MIN_SECRET_BITS",
    "ROW_MAC_PURPOSE",
    "check_secret_spec",
    "derive_from_root",
    "is_keyed_digest",
    "row_mac",
    "row_mac_matches",
    "ImportFormat",
    "InstallFormat",
    "KeyType",
    "KeyringEntry",
    "WrapSuite",
    "age_decrypt_ssh",
    "age_encrypt_to_ssh",
    "allowed_formats",
    "combine_shares",
    "decode_keyring",
    "encode_for_install",
    "encode_keyring",
    "generate",
    "generate_signing_key",
    "generate_wrapping_keypair",
    "hmac_identifier",
    "import_formats",
    "import_material",
    "is_age_file",
    "kek_check_value",
    "material_digest",
    "new_data_kek",
    "new_root_kek",
    "open_sealed",
    "public_key_pem",
    "seal",
    "sign",
    "signer_key_id",
    "signing_key_openssh",
    "signing_public_key",
    "signing_public_openssh",
    "split_root_kek",
    "staged_aad",
    "unwrap_for_agent",
    "unwrap_root_kek_with_passphrase",
    "validate_material",
    "verify_signature",
    "version_aad",
    "wrap_for_agent",
    "wrap_root_kek_with_passphrase",
    "wrapping_public_key",
    "CertSubject",
    "CertUsage",
    "CertificateAuthority",
    "CertificateInfo",
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
}


def test_all_is_the_public_api() -> None:
    assert set(ckms.crypto.__all__) == EXPECTED
    assert len(ckms.crypto.__all__) == len(EXPECTED), "no duplicates in __all__"


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in ckms.crypto.__all__:
        obj = getattr(ckms.crypto, name)
        assert obj.__doc__ and obj.__doc__.strip(), name


def test_no_public_name_leaks_a_private_module() -> None:
    public = {n for n in dir(ckms.crypto) if not n.startswith("_")}
    assert public == EXPECTED


def test_enum_values_match_the_interface() -> None:
    assert {k.value for k in ckms.crypto.KeyType} == {
        "aes-256",
        "hmac-sha256",
        "ed25519",
        "ecdsa-p256",
        "ecdsa-p384",
        "rsa-3072",
        "rsa-4096",
        "x25519",
        "secret",
        "tls-cert",
    }
    assert {f.value for f in ckms.crypto.InstallFormat} == {
        "raw",
        "base64",
        "pem",
        "openssh",
        "jwk",
        "keyring-json",
        "tls-pem",
    }
    assert {s.value for s in ckms.crypto.WrapSuite} == {"x25519", "mlkem768-x25519"}
