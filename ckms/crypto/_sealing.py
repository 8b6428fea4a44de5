"""The root KEK: creation, check value, SLIP-39 custodian shares and passphrase wrapping.

Shares: one SLIP-39 group (group threshold 1) holding ``threshold``-of-``count`` member shares,
made and read by ``shamir_mnemonic`` with an empty SLIP-39 passphrase, the extendable flag set
and iteration exponent 1. ckms requires ``2 <= threshold <= count <= 16``: one share alone never
unseals (docs/architecture.md §5), so 1-of-N is refused, and 16 is SLIP-39's limit.
Single-custodian setups use the passphrase wrap instead. ``combine_shares`` names shares by
their 1-based position in the input, refuses a share given twice (same mnemonic, however typed,
or same member index), a share of another split, a set below its threshold (saying how many more
are needed) and any invalid mnemonic; shares beyond the threshold are checked but not used.

Check value: hex HMAC-SHA256(kek, ``b"ckms.root-kek.check.v1"``), stored beside the sealed data
so unseal can tell a wrong (but well-formed) KEK before using it.

Passphrase wrap (JSON-able dict, format version 1)::

    {"v": 1, "kdf": "scrypt", "n": 32768, "r": 8, "p": 1,
     "salt": b64(16 bytes), "nonce": b64(12 bytes), "ct": b64(AES-256-GCM(kek) || tag)}

The scrypt output (32 bytes) is the AES-256-GCM key; the GCM associated data is the canonical
JSON of ``{"ctx": "ckms.root-kek.passphrase.v1", "kdf", "n", "p", "r", "v"}`` so the parameters
cannot be swapped. The passphrase is NFC-normalised and UTF-8 encoded first, so the same words
typed on different systems give the same key. Unwrap accepts ``r=8``, ``p=1`` and ``n`` a power
of two in [2**10, 2**18], so a hostile blob cannot demand unbounded memory.
"""

from __future__ import annotations

import os
import secrets
import unicodedata
from collections.abc import Sequence
from typing import Any, Final, TypeGuard

import shamir_mnemonic
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ckms.crypto._digest import hmac_sha256
from ckms.crypto._encoding import b64, b64decode_strict, canonical, require_bytes
from ckms.errors import ConfigError, CryptoError, UnsealError

ROOT_KEK_BYTES: Final = 32
MIN_SHARE_THRESHOLD: Final = 2
MAX_SHARES: Final = 16
SLIP39_ITERATION_EXPONENT: Final = 1

PASSPHRASE_WRAP_V1: Final = 1
SCRYPT_N_DEFAULT: Final = 2**15
SCRYPT_N_MIN: Final = 2**10
SCRYPT_N_MAX: Final = 2**18  # 256 MiB with r=8; bounds the memory a hostile blob can demand
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
NONCE_BYTES: Final = 12
_CHECK_LABEL: Final = b"ckms.root-kek.check.v1"
_KDF_WRAP_CONTEXT: Final = "ckms.root-kek.passphrase.v1"
_UNLOCK_FAILED: Final = "passphrase did not unlock the root KEK"


def _require_kek(kek: bytes) -> bytes:
    """Refuse anything but a 256-bit root KEK."""
    k = require_bytes(kek, "root KEK")
    if len(k) != ROOT_KEK_BYTES:
        raise CryptoError(f"root KEK must be {ROOT_KEK_BYTES} bytes")
    return k


def new_root_kek() -> bytes:
    """Return a fresh 256-bit root KEK, made once by ``ckms init`` and never stored in plaintext."""
    return secrets.token_bytes(ROOT_KEK_BYTES)


def kek_check_value(kek: bytes) -> str:
    """Return a non-secret check value (hex HMAC-SHA256 over a fixed label) to tell a wrong KEK."""
    return hmac_sha256(_require_kek(kek), _CHECK_LABEL).hex()


def split_root_kek(kek: bytes, threshold: int, count: int) -> list[str]:
    """Split the root KEK into ``count`` SLIP-39 mnemonics of which any ``threshold`` recover it."""
    k = _require_kek(kek)
    for value, name in ((threshold, "threshold"), (count, "share count")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer")
    if not MIN_SHARE_THRESHOLD <= threshold <= count <= MAX_SHARES:
        raise ConfigError(
            f"need {MIN_SHARE_THRESHOLD} <= threshold <= count <= {MAX_SHARES} "
            f"(got {threshold}-of-{count}); one share alone must never unseal"
        )
    groups = shamir_mnemonic.generate_mnemonics(
        group_threshold=1,
        groups=[(threshold, count)],
        master_secret=k,
        passphrase=b"",
        extendable=True,
        iteration_exponent=SLIP39_ITERATION_EXPONENT,
    )
    return list(groups[0])


def combine_shares(mnemonics: Sequence[str]) -> bytes:
    """Recover the root KEK from custodian mnemonics, refusing repeats, strangers and too few."""
    if isinstance(mnemonics, str):
        raise UnsealError("shares must be given as a list of mnemonics")
    if not mnemonics:
        raise UnsealError("no shares given")
    shares: list[shamir_mnemonic.Share] = []
    for position, mnemonic in enumerate(mnemonics, start=1):
        if not isinstance(mnemonic, str):
            raise UnsealError(f"share {position} is not a mnemonic")
        try:
            share = shamir_mnemonic.Share.from_mnemonic(mnemonic)
        except Exception:  # MnemonicError text may quote words of the share: never pass it on
            raise UnsealError(f"share {position} is not a valid SLIP-39 mnemonic") from None
        if share.group_count != 1 or share.group_threshold != 1:
            raise UnsealError(f"share {position} is not from a ckms root KEK split")
        shares.append(share)

    first = shares[0]
    seen: dict[int, int] = {}
    for position, share in enumerate(shares, start=1):
        if share.group_parameters() != first.group_parameters():
            raise UnsealError(f"share {position} belongs to a different split than share 1")
        if share.index in seen:
            raise UnsealError(
                f"a share was given twice: share {position} repeats share {seen[share.index]}"
            )
        seen[share.index] = position

    threshold = first.member_threshold
    if threshold < MIN_SHARE_THRESHOLD:
        raise UnsealError("share set has threshold 1; ckms never unseals from one share")
    if len(shares) < threshold:
        missing = threshold - len(shares)
        raise UnsealError(
            f"{missing} more share{'s' if missing != 1 else ''} needed "
            f"({len(shares)} of {threshold} given)"
        )
    # recover_ems wants exactly `threshold` shares; the extra ones were still checked above.
    chosen = [share.mnemonic() for share in shares[:threshold]]
    try:
        kek = shamir_mnemonic.combine_mnemonics(chosen, passphrase=b"")
    except Exception:
        raise UnsealError("shares do not reconstruct a root KEK") from None
    if len(kek) != ROOT_KEK_BYTES:
        raise UnsealError("shares do not reconstruct a root KEK")
    return kek


def _passphrase_bytes(passphrase: str) -> bytes:
    """NFC-normalise and encode a passphrase so equal-looking input derives the same key."""
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _passphrase_aad(n: int, r: int, p: int) -> bytes:
    """Bind the scrypt parameters and format version into the GCM associated data."""
    return canonical(
        {
            "ctx": _KDF_WRAP_CONTEXT,
            "v": PASSPHRASE_WRAP_V1,
            "kdf": "scrypt",
            "n": n,
            "r": r,
            "p": p,
        }
    )


def _valid_n(n: object) -> TypeGuard[int]:
    """Say whether a scrypt cost is an allowed power of two."""
    return (
        isinstance(n, int)
        and not isinstance(n, bool)
        and SCRYPT_N_MIN <= n <= SCRYPT_N_MAX
        and n & (n - 1) == 0
    )


def _derive(passphrase: bytes, salt: bytes, n: int) -> bytes:
    """Derive the 256-bit wrapping key with scrypt."""
    return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def wrap_root_kek_with_passphrase(
    kek: bytes, passphrase: str, *, n: int = SCRYPT_N_DEFAULT
) -> dict[str, Any]:
    """Wrap the root KEK under a passphrase (scrypt + AES-256-GCM) for single-custodian setups."""
    k = _require_kek(kek)
    if not isinstance(passphrase, str) or not passphrase:
        raise ConfigError("passphrase must be a non-empty string")
    if not _valid_n(n):
        raise ConfigError(f"scrypt n must be a power of two in [{SCRYPT_N_MIN}, {SCRYPT_N_MAX}]")
    salt = os.urandom(SALT_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    wrapping_key = _derive(_passphrase_bytes(passphrase), salt, n)
    ct = AESGCM(wrapping_key).encrypt(nonce, k, _passphrase_aad(n, SCRYPT_R, SCRYPT_P))
    return {
        "v": PASSPHRASE_WRAP_V1,
        "kdf": "scrypt",
        "n": n,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": b64(salt),
        "nonce": b64(nonce),
        "ct": b64(ct),
    }


def unwrap_root_kek_with_passphrase(blob: dict[str, Any], passphrase: str) -> bytes:
    """Recover the root KEK from a passphrase wrap; every failure raises the same UnsealError."""
    error = UnsealError(_UNLOCK_FAILED)
    if not isinstance(blob, dict) or not isinstance(passphrase, str) or not passphrase:
        raise error
    n = blob.get("n")
    if (
        blob.get("v") != PASSPHRASE_WRAP_V1
        or blob.get("kdf") != "scrypt"
        or not _valid_n(n)
        or blob.get("r") != SCRYPT_R
        or blob.get("p") != SCRYPT_P
    ):
        raise error
    salt = b64decode_strict(blob.get("salt"))
    nonce = b64decode_strict(blob.get("nonce"))
    ct = b64decode_strict(blob.get("ct"))
    if salt is None or len(salt) != SALT_BYTES or nonce is None or len(nonce) != NONCE_BYTES:
        raise error
    if ct is None or len(ct) != ROOT_KEK_BYTES + 16:
        raise error
    try:
        wrapping_key = _derive(_passphrase_bytes(passphrase), salt, n)
        kek = AESGCM(wrapping_key).decrypt(nonce, ct, _passphrase_aad(n, SCRYPT_R, SCRYPT_P))
    except Exception:
        raise error from None
    return kek
