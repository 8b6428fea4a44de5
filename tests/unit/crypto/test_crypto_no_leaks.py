"""No exception message, traceback, repr or log line of ckms.crypto carries secret bytes."""

from __future__ import annotations

import base64
import itertools
import logging
import secrets
import traceback
from collections.abc import Callable, Iterator

import pytest

from ckms.crypto import (
    InstallFormat,
    KeyringEntry,
    KeyType,
    WrapSuite,
    combine_shares,
    encode_for_install,
    encode_keyring,
    generate_signing_key,
    generate_wrapping_keypair,
    new_data_kek,
    new_root_kek,
    open_sealed,
    seal,
    sign,
    signing_public_key,
    split_root_kek,
    unwrap_for_agent,
    unwrap_root_kek_with_passphrase,
    validate_material,
    verify_signature,
    wrap_for_agent,
    wrap_root_kek_with_passphrase,
)
from ckms.errors import CKMSError


def _forms(secret: bytes) -> Iterator[str]:
    """Every way a secret could plausibly be rendered into text."""
    yield secret.hex()
    yield secret.hex().upper()
    yield base64.b64encode(secret).decode().rstrip("=")
    yield base64.urlsafe_b64encode(secret).decode().rstrip("=")
    yield repr(secret)[2:-1]
    try:
        text = secret.decode("utf-8")
    except UnicodeDecodeError:
        return
    if len(text) >= 8:
        yield text


def _assert_clean(exc: BaseException, secret_values: list[bytes]) -> None:
    rendered = "\n".join(
        [str(exc), repr(exc), *traceback.format_exception(exc), *map(str, exc.args)]
    )
    for secret in secret_values:
        for form in _forms(secret):
            # Short fragments match by chance; 16+ characters of a secret rendering do not.
            if len(form) >= 16:
                assert form not in rendered, f"secret leaked via {type(exc).__name__}"


def _failure(fn: Callable[[], object]) -> BaseException:
    with pytest.raises(CKMSError) as info:
        fn()
    return info.value


@pytest.mark.parametrize("key_type", list(KeyType))
def test_material_never_appears_in_errors(
    key_type: KeyType, materials: dict[KeyType, bytes]
) -> None:
    material = materials[key_type]
    errors: list[BaseException] = []
    for other in KeyType:
        try:
            validate_material(other, material)
        except CKMSError as exc:
            errors.append(exc)
    assert errors, "some other type must refuse this material"
    for fmt in InstallFormat:
        try:
            encode_for_install(key_type, material, fmt, key_name="k", version=1)
        except CKMSError as exc:
            errors.append(exc)
    # Truncated material: the error must not echo what it got.
    errors.append(_failure(lambda: validate_material(key_type, material[:-1] + b"\x00\x00")))
    entries = [KeyringEntry(1, material, False, "Active")]
    errors.append(_failure(lambda: encode_keyring(key_type, entries, key_name="k")))
    for exc in errors:
        _assert_clean(exc, [material, material[:-1]])


def test_sealing_errors_do_not_show_keys_or_plaintext() -> None:
    key, plaintext = new_data_kek(), b"the plaintext must not leak!!"
    blob = seal(key, plaintext, b"aad")
    errors = [
        _failure(lambda: open_sealed(new_data_kek(), blob, b"aad")),
        _failure(lambda: open_sealed(key, blob, b"other")),
        _failure(lambda: open_sealed(key[:16], blob, b"aad")),
        _failure(lambda: seal(key[:31], plaintext, b"aad")),
    ]
    for exc in errors:
        _assert_clean(exc, [key, key[:16], key[:31], plaintext])


@pytest.mark.parametrize("suite", list(WrapSuite))
def test_wrapping_errors_do_not_show_keys_or_material(suite: WrapSuite) -> None:
    private, public = generate_wrapping_keypair(suite)
    material = b"wrapped material that must not leak"
    blob = wrap_for_agent(public, material, key_name="k", version=1, agent_id="a", suite=suite)
    errors = [
        _failure(lambda: unwrap_for_agent(private, blob, key_name="k", version=1, agent_id="b")),
        _failure(
            lambda: unwrap_for_agent(private[:-1], blob, key_name="k", version=1, agent_id="a")
        ),
        _failure(
            lambda: wrap_for_agent(
                public[:-1], material, key_name="k", version=1, agent_id="a", suite=suite
            )
        ),
    ]
    for exc in errors:
        _assert_clean(exc, [private, private[:-1], material])


def test_signing_errors_do_not_show_private_keys() -> None:
    private = generate_signing_key()
    public = signing_public_key(private)
    errors = [
        _failure(lambda: verify_signature(public, b"x", sign(private, b"y"))),
        _failure(lambda: sign(private[:31], b"x")),
        _failure(lambda: sign(private + private, b"x")),
    ]
    for exc in errors:
        _assert_clean(exc, [private, private[:31], private + private])


def test_unseal_errors_do_not_show_shares_keks_or_passphrases() -> None:
    kek = new_root_kek()
    shares = split_root_kek(kek, 2, 3)
    words = shares[1].split()
    words[7] = "acid" if words[7] != "acid" else "academic"
    errors = [
        _failure(lambda: combine_shares([shares[0], " ".join(words)])),
        _failure(lambda: combine_shares([shares[0]])),
        _failure(lambda: combine_shares([shares[0], shares[0]])),
    ]
    # Made at run time: a literal would show up in the traceback's source lines.
    right, wrong = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    blob = wrap_root_kek_with_passphrase(kek, right, n=2**10)
    errors.append(_failure(lambda: unwrap_root_kek_with_passphrase(blob, wrong)))
    for exc in errors:
        _assert_clean(exc, [kek, right.encode(), wrong.encode()])
        text = str(exc).split()
        for share in shares:
            share_words = share.split()
            # No two consecutive words of any share, nor the corrupted one, appear in a message.
            for a, b in itertools.pairwise(share_words):
                assert not any(text[i : i + 2] == [a, b] for i in range(len(text) - 1))


def test_crypto_logs_nothing_secret(
    caplog: pytest.LogCaptureFixture, materials: dict[KeyType, bytes]
) -> None:
    caplog.set_level(logging.DEBUG)
    key = new_data_kek()
    material = materials[KeyType.ED25519]
    private, public = generate_wrapping_keypair()
    blob = wrap_for_agent(public, material, key_name="k", version=1, agent_id="a")
    unwrap_for_agent(private, blob, key_name="k", version=1, agent_id="a")
    open_sealed(key, seal(key, material, b""), b"")
    for fmt in (InstallFormat.PEM, InstallFormat.JWK, InstallFormat.OPENSSH):
        encode_for_install(KeyType.ED25519, material, fmt, key_name="k", version=1)
    with pytest.raises(CKMSError):
        unwrap_for_agent(private, blob, key_name="k", version=2, agent_id="a")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (key, material, private):
        for form in _forms(secret):
            assert form not in logged
