"""Key purposes, usage masks and policy defaults after NIST SP 800-57 Part 1 Rev. 5, Table 1.

SP 800-57 §5.2: a key is used for one purpose only. ckms enforces that by grouping usage-mask
entries into purposes and allowing a key exactly one purpose. The purpose (with the key type)
selects the row of SP 800-57 Table 1 ("Suggested cryptoperiods for key types") that gives the
default and the maximum cryptoperiod, i.e. how long a version may be primary (its
originator-usage period, OUP), and the grace, i.e. how long a superseded version stays installed
for processing (the recipient-usage period beyond the OUP):

==============  ===============================================  =====  =====  =====  =========
purpose         SP 800-57 Table 1 row                            c.p.   max    grace  max grace
==============  ===============================================  =====  =====  =====  =========
encryption      symmetric data-encryption key, private key-      1 y    2 y    90 d   3 y
                transport key (OUP <= 2 y, RUP <= OUP + 3 y)
wrapping        symmetric key-wrapping key (OUP <= 2 y,          1 y    2 y    90 d   3 y
                RUP <= OUP + 3 y)
mac             symmetric authentication key (OUP <= 2 y,        1 y    2 y    30 d   3 y
                RUP <= OUP + 3 y)
signature       private signature key (1-3 years)                1 y    3 y    7 d    1 y
derivation      symmetric key-derivation key (about 1 year)      1 y    1 y    30 d   1 y
agreement       private static key-agreement key (1-2 years)     1 y    2 y    7 d    1 y
authentication  symmetric / private authorization key (<= 2 y)   1 y    2 y    7 d    90 d
==============  ===============================================  =====  =====  =====  =========

(c.p. = default cryptoperiod; y = 365 days.)

Grace for signing keys is short because a superseded private signing key has no processing use
on the host (verifiers hold the public key); for symmetric keys the grace lets data protected
under an old version stay readable, bounded by Table 1's recipient-usage period.

Defaults also: no activation delay, 1 day of allowed host staleness, and dual control for
``destroy``, ``policy`` and ``role``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Final

from pydantic import ValidationError

from ckms.controller.models import DEFAULT_APPROVALS, Policy, Usage
from ckms.crypto import KeyType
from ckms.errors import ConfigError, PolicyError
from ckms.protocol.admin import PolicyPatch

__all__ = [
    "ALLOWED_USAGE",
    "DEFAULT_USAGE",
    "LIMITS",
    "Limits",
    "Purpose",
    "check_policy",
    "check_usage",
    "default_policy",
    "patch_policy",
    "purpose_of",
]

YEAR: Final = timedelta(days=365)
DAY: Final = timedelta(days=1)


class Purpose(StrEnum):
    """The one thing a key is for (SP 800-57 §5.2)."""

    ENCRYPTION = "encryption"
    WRAPPING = "wrapping"
    MAC = "mac"
    SIGNATURE = "signature"
    DERIVATION = "derivation"
    AGREEMENT = "agreement"
    AUTHENTICATION = "authentication"


PURPOSE_OF_USAGE: Final[dict[Usage, Purpose]] = {
    Usage.ENCRYPT: Purpose.ENCRYPTION,
    Usage.DECRYPT: Purpose.ENCRYPTION,
    Usage.WRAP_KEY: Purpose.WRAPPING,
    Usage.UNWRAP_KEY: Purpose.WRAPPING,
    Usage.MAC_GENERATE: Purpose.MAC,
    Usage.MAC_VERIFY: Purpose.MAC,
    Usage.SIGN: Purpose.SIGNATURE,
    Usage.VERIFY: Purpose.SIGNATURE,
    Usage.DERIVE_KEY: Purpose.DERIVATION,
    Usage.KEY_AGREEMENT: Purpose.AGREEMENT,
    Usage.AUTHENTICATE: Purpose.AUTHENTICATION,
}

_SIGNING: Final = frozenset({Usage.SIGN, Usage.VERIFY})

ALLOWED_USAGE: Final[dict[KeyType, frozenset[Usage]]] = {
    KeyType.AES_256: frozenset({Usage.ENCRYPT, Usage.DECRYPT, Usage.WRAP_KEY, Usage.UNWRAP_KEY}),
    KeyType.HMAC_SHA256: frozenset({Usage.MAC_GENERATE, Usage.MAC_VERIFY, Usage.DERIVE_KEY}),
    KeyType.ED25519: _SIGNING,
    KeyType.ECDSA_P256: _SIGNING,
    KeyType.ECDSA_P384: _SIGNING,
    KeyType.RSA_3072: _SIGNING | {Usage.ENCRYPT, Usage.DECRYPT, Usage.WRAP_KEY, Usage.UNWRAP_KEY},
    KeyType.RSA_4096: _SIGNING | {Usage.ENCRYPT, Usage.DECRYPT, Usage.WRAP_KEY, Usage.UNWRAP_KEY},
    KeyType.X25519: frozenset({Usage.KEY_AGREEMENT}),
    KeyType.SECRET: frozenset(Usage),
    KeyType.TLS_CERT: frozenset({Usage.AUTHENTICATE}),
}
"""Usage entries each key type can serve at all."""

DEFAULT_USAGE: Final[dict[KeyType, frozenset[Usage]]] = {
    KeyType.AES_256: frozenset({Usage.ENCRYPT, Usage.DECRYPT}),
    KeyType.HMAC_SHA256: frozenset({Usage.MAC_GENERATE, Usage.MAC_VERIFY}),
    KeyType.ED25519: _SIGNING,
    KeyType.ECDSA_P256: _SIGNING,
    KeyType.ECDSA_P384: _SIGNING,
    KeyType.RSA_3072: _SIGNING,
    KeyType.RSA_4096: _SIGNING,
    KeyType.X25519: frozenset({Usage.KEY_AGREEMENT}),
    KeyType.SECRET: frozenset({Usage.AUTHENTICATE}),
    KeyType.TLS_CERT: frozenset({Usage.AUTHENTICATE}),
}
"""Usage a key gets when create names none."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Default and maximum cryptoperiod and grace of one purpose (one row of the table above)."""

    table1_row: str
    cryptoperiod: timedelta
    max_cryptoperiod: timedelta
    grace: timedelta
    max_grace: timedelta


LIMITS: Final[dict[Purpose, Limits]] = {
    Purpose.ENCRYPTION: Limits(
        "symmetric data-encryption / private key-transport key", YEAR, 2 * YEAR, 90 * DAY, 3 * YEAR
    ),
    Purpose.WRAPPING: Limits("symmetric key-wrapping key", YEAR, 2 * YEAR, 90 * DAY, 3 * YEAR),
    Purpose.MAC: Limits("symmetric authentication key", YEAR, 2 * YEAR, 30 * DAY, 3 * YEAR),
    Purpose.SIGNATURE: Limits("private signature key", YEAR, 3 * YEAR, 7 * DAY, YEAR),
    Purpose.DERIVATION: Limits("symmetric key-derivation key", YEAR, YEAR, 30 * DAY, YEAR),
    Purpose.AGREEMENT: Limits("private static key-agreement key", YEAR, 2 * YEAR, 7 * DAY, YEAR),
    Purpose.AUTHENTICATION: Limits(
        "symmetric / private authorization key", YEAR, 2 * YEAR, 7 * DAY, 90 * DAY
    ),
}


def check_usage(key_type: KeyType, usage: frozenset[Usage] | None) -> frozenset[Usage]:
    """Return the usage mask for a new key (the type's default if None), or raise ConfigError.

    The mask must be non-empty, allowed for the type, and serve exactly one purpose.
    """
    if usage is None:
        return DEFAULT_USAGE[key_type]
    try:
        mask = frozenset(Usage(u) for u in usage)
    except ValueError:
        raise ConfigError(f"unknown usage in {sorted(map(str, usage))}") from None
    if not mask:
        raise ConfigError("usage mask must not be empty")
    not_allowed = mask - ALLOWED_USAGE[key_type]
    if not_allowed:
        raise ConfigError(
            f"usage {sorted(map(str, not_allowed))} is not available for key type '{key_type}'"
        )
    purposes = {PURPOSE_OF_USAGE[u] for u in mask}
    if len(purposes) != 1:
        raise ConfigError(
            f"a key serves one purpose only (NIST SP 800-57 §5.2); usage {sorted(map(str, mask))} "
            f"mixes {sorted(map(str, purposes))}"
        )
    return mask


def purpose_of(usage: frozenset[Usage]) -> Purpose:
    """Return the one purpose a (checked) usage mask serves."""
    return PURPOSE_OF_USAGE[min(usage)]


def default_policy(key_type: KeyType, usage: frozenset[Usage] | None = None) -> Policy:
    """Return the default policy of a key type and usage (the type's default usage if None)."""
    limits = LIMITS[purpose_of(check_usage(key_type, usage))]
    return Policy(
        cryptoperiod=limits.cryptoperiod,
        grace=limits.grace,
        activation_delay=timedelta(0),
        max_staleness=DAY,
        approvals_required=DEFAULT_APPROVALS,
    )


def check_policy(key_type: KeyType, usage: frozenset[Usage], policy: Policy) -> None:
    """Raise PolicyError if ``policy`` exceeds the SP 800-57 limits of the key's purpose."""
    if policy.cert_lifetime is not None and key_type is not KeyType.TLS_CERT:
        raise PolicyError(f"cert_lifetime applies to tls-cert keys only, not {key_type}")
    purpose = purpose_of(usage)
    limits = LIMITS[purpose]
    if policy.cryptoperiod > limits.max_cryptoperiod:
        raise PolicyError(
            f"cryptoperiod {policy.cryptoperiod.days} days exceeds the maximum of "
            f"{limits.max_cryptoperiod.days} days for a {limits.table1_row} "
            "(NIST SP 800-57 Part 1, Table 1)"
        )
    if policy.grace > limits.max_grace:
        raise PolicyError(
            f"grace {policy.grace.days} days exceeds the maximum of {limits.max_grace.days} days "
            f"for a {limits.table1_row} (NIST SP 800-57 Part 1, Table 1)"
        )


def patch_policy(base: Policy, patch: PolicyPatch) -> Policy:
    """``base`` with the fields of ``patch`` that are set; ConfigError if the result is invalid."""
    values: dict[str, Any] = {
        "cryptoperiod": base.cryptoperiod,
        "grace": base.grace,
        "activation_delay": base.activation_delay,
        "max_staleness": base.max_staleness,
        "approvals_required": base.approvals_required,
        "cert_lifetime": base.cert_lifetime,
        "activate_when": base.activate_when,
        "activation_deadline": base.activation_deadline,
        "activation_threshold_pct": base.activation_threshold_pct,
    }
    if patch.activate_when is not None:
        values["activate_when"] = patch.activate_when
    if patch.activation_threshold_pct is not None:
        values["activation_threshold_pct"] = patch.activation_threshold_pct
    for field in (
        "cryptoperiod",
        "grace",
        "activation_delay",
        "max_staleness",
        "cert_lifetime",
        "activation_deadline",
    ):
        seconds = getattr(patch, f"{field}_s")
        if seconds is not None:
            values[field] = timedelta(seconds=seconds)
    if patch.approvals_required is not None:
        values["approvals_required"] = frozenset(patch.approvals_required)
    try:
        return Policy(**values)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]["msg"]
        raise ConfigError(f"invalid policy: {first.removeprefix('Value error, ')}") from None
