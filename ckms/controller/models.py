"""Typed models of the controller's key lifecycle: keys, versions, policies, targets, install specs.

Models validate their own fields (pydantic raises ``ValidationError``, a ``ValueError``); checks
that need two fields of different models (a format allowed for a type, a cryptoperiod within
the limits of a type) live in :mod:`ckms.controller.lifecycle` and :mod:`ckms.controller.policy`
and raise :mod:`ckms.errors` exceptions. Policy durations serialise as whole seconds.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from ckms.crypto import KeyType
from ckms.errors import ConfigError, NotFoundError
from ckms.protocol._keyspec import (
    HookSpec,
    InstallSpec,
    KeyState,
    RevocationReason,
    Targets,
)
from ckms.protocol._names import validate_key_name
from ckms.protocol._roles import DEFAULT_APPROVALS, ApprovalOperation
from ckms.protocol._rollout import ActivateWhen, Gate, RolloutState
from ckms.store.audit import AuditRecord

__all__ = [
    "ApprovalOperation",
    "AuditRecord",
    "HookSpec",
    "Host",
    "InstallSpec",
    "Key",
    "KeyState",
    "KeyVersion",
    "Origin",
    "Policy",
    "RevocationReason",
    "Rollout",
    "Targets",
    "Usage",
    "validate_key_name",
]
# ApprovalOperation, DEFAULT_APPROVALS and validate_key_name are wire rules
# (:mod:`ckms.protocol`); they are re-exported here for the controller's own modules.


Origin = Literal["generated", "imported"]
"""Where a version's material came from: made by ckms, or brought by an operator."""


class Usage(StrEnum):
    """Cryptographic usage mask entries (after KMIP's Cryptographic Usage Mask)."""

    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    WRAP_KEY = "wrap-key"
    UNWRAP_KEY = "unwrap-key"
    SIGN = "sign"
    VERIFY = "verify"
    MAC_GENERATE = "mac-generate"
    MAC_VERIFY = "mac-verify"
    DERIVE_KEY = "derive-key"
    KEY_AGREEMENT = "key-agreement"
    AUTHENTICATE = "authenticate"


# -- policy ----------------------------------------------------------------------------------


DEFAULT_CERT_LIFETIME = timedelta(hours=24)
"""A host certificate's lifetime unless the key's policy sets one: short, so a lost key or a
revoked host stops mattering within a day even where no one checks a CRL."""
MIN_CERT_LIFETIME = timedelta(seconds=30)
MAX_CERT_LIFETIME = timedelta(days=397)
"""The CA/Browser Forum's ceiling for a TLS server certificate."""


class Policy(BaseModel):
    """How long a key's versions live and who must agree to change them.

    ``cryptoperiod``: how long a version is primary (its originator-usage period) before it is
    due to rotate. ``grace``: how long a superseded version stays installed for processing
    (decrypt/verify) before it is deactivated. ``activation_delay``: how long a new version
    waits in PreActive (pre-distributed to hosts) before it becomes primary. ``max_staleness``:
    how long a targeted host may go without acknowledging the current versions before the fleet
    view flags it. ``approvals_required``: operations that need a second person.
    ``cert_lifetime``: how long each host's certificate of a ``tls-cert`` key is valid (None:
    :data:`DEFAULT_CERT_LIFETIME`); hosts renew at two thirds of it.
    ``activate_when``: a rotation's default, ``delay`` (the activation delay above) or
    ``converged`` (primary once the fleet acknowledged it, see :class:`Rollout`);
    ``activation_deadline``: how long a converging rotation may wait before it is reported
    expired (it then stays PreActive); ``activation_threshold_pct``: the share of the counted
    hosts whose acknowledgement makes a stage's gate hold (100: all of them).
    Defaults per key type: :func:`ckms.controller.policy.default_policy`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cryptoperiod: timedelta
    grace: timedelta
    activation_delay: timedelta = timedelta(0)
    max_staleness: timedelta = timedelta(days=1)
    approvals_required: frozenset[ApprovalOperation] = DEFAULT_APPROVALS
    cert_lifetime: timedelta | None = None
    activate_when: ActivateWhen = ActivateWhen.DELAY
    activation_deadline: timedelta = timedelta(days=7)
    activation_threshold_pct: int = Field(default=100, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> Policy:
        if self.cert_lifetime is not None and not (
            MIN_CERT_LIFETIME <= self.cert_lifetime <= MAX_CERT_LIFETIME
        ):
            raise ValueError(
                f"cert_lifetime must be between {int(MIN_CERT_LIFETIME.total_seconds())} s and "
                f"{MAX_CERT_LIFETIME.days} days"
            )
        if self.cryptoperiod < timedelta(hours=1):
            raise ValueError("cryptoperiod must be at least 1 hour")
        if self.grace < timedelta(0):
            raise ValueError("grace must not be negative")
        if self.activation_delay < timedelta(0):
            raise ValueError("activation_delay must not be negative")
        if self.activation_delay >= self.cryptoperiod:
            raise ValueError("activation_delay must be shorter than the cryptoperiod")
        if self.max_staleness <= timedelta(0):
            raise ValueError("max_staleness must be positive")
        if self.activation_deadline <= timedelta(0):
            raise ValueError("activation_deadline must be positive")
        return self

    @field_serializer("approvals_required")
    def _sorted(self, value: frozenset[ApprovalOperation]) -> list[str]:
        return sorted(str(v) for v in value)

    @field_serializer(
        "cryptoperiod", "grace", "activation_delay", "max_staleness", "activation_deadline"
    )
    def _seconds(self, value: timedelta) -> int:
        # Whole seconds: unambiguous on the wire (ISO 8601 "P1Y" could mean a calendar year).
        return value // timedelta(seconds=1)

    @field_serializer("cert_lifetime")
    def _optional_seconds(self, value: timedelta | None) -> int | None:
        return None if value is None else value // timedelta(seconds=1)

    @property
    def effective_cert_lifetime(self) -> timedelta:
        """The lifetime a ``tls-cert`` key's certificates get."""
        return self.cert_lifetime or DEFAULT_CERT_LIFETIME


# -- rollouts --------------------------------------------------------------------------------


class Rollout(BaseModel):
    """How a PreActive version of a key goes out to the fleet before it becomes primary.

    One row per key (``rollouts``, row MAC): the key's current or last rollout. ``stages`` are
    cumulative percents of the targeted hosts (the last is 100); ``stage`` is the 1-based stage
    out now (or, rolled back, the one withdrawn). ``released`` are the hosts that may hold the
    version (None: every targeted host, the last stage), chosen by a deterministic sample
    (:mod:`ckms.controller.rollout_plan`) and kept, so retries and restarts release the same
    hosts. ``stage_started_at`` is when the stage went out: only failures acknowledged since
    count against its gate.
    """

    model_config = ConfigDict(frozen=True)

    key_id: str
    version: int = Field(ge=1)
    stages: tuple[int, ...]
    gate: Gate
    spread: str | None = None
    stage: int = Field(ge=1)
    state: RolloutState
    released: frozenset[str] | None = None
    threshold_pct: int = Field(default=100, ge=1, le=100)
    max_failures: str | None = None
    """The stage's failure budget: a count or a percent of its hosts (None: 0, one halts)."""
    started_at: datetime
    started_by: str
    stage_started_at: datetime
    deadline_at: datetime
    updated_at: datetime
    reason: str | None = None

    @property
    def live(self) -> bool:
        """True while the rollout still decides who holds the version (not ended)."""
        return self.state not in (RolloutState.COMPLETED, RolloutState.CANCELLED)

    @property
    def final_stage(self) -> bool:
        """True when the stage out now is the last one (every targeted host)."""
        return self.stage == len(self.stages)

    def releases(self, host_id: str) -> bool:
        """True when ``host_id`` may hold the version now."""
        return self.released is None or host_id in self.released


# -- hosts -----------------------------------------------------------------------------------


class Host(BaseModel):
    """An enrolled host as the controller knows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    identity_public_key: bytes = b""
    wrapping_public_key: bytes = b""
    enrolled_at: datetime | None = None
    revoked: bool = False


# -- keys and versions -----------------------------------------------------------------------


class KeyVersion(BaseModel):
    """One version of a key: its state, the digest of its material and its lifecycle times."""

    model_config = ConfigDict(frozen=True)

    key: str
    version: int = Field(ge=1)
    state: KeyState
    digest: str
    has_material: bool
    created_at: datetime
    created_by: str
    state_changed_at: datetime
    activation_at: datetime | None = None
    activated_at: datetime | None = None
    superseded_at: datetime | None = None
    deactivated_at: datetime | None = None
    compromised_at: datetime | None = None
    destroyed_at: datetime | None = None
    revocation_reason: RevocationReason | None = None
    revocation_message: str | None = None
    origin: Origin = "generated"
    """``imported`` when an operator brought the material (``key.import``), else ckms made it."""


class _Numbered(Protocol):
    @property
    def version(self) -> int: ...


_V = TypeVar("_V", bound=_Numbered)


class KeyHelpers(Generic[_V]):
    """What a key answers from its own fields: the same for the pydantic :class:`Key` and the
    key view's slim :class:`~ckms.controller.keyview.KeyView` (one definition for both)."""

    __slots__ = ()

    if TYPE_CHECKING:
        name: str
        usage: frozenset[Usage]
        primary_version: int | None
        versions: tuple[_V, ...]

    @property
    def team(self) -> str:
        """The part of the name before the slash."""
        return self.name.partition("/")[0]

    @property
    def purpose(self) -> str:
        """The part of the name after the slash."""
        return self.name.partition("/")[2]

    @property
    def usage_list(self) -> list[str]:
        """The usage mask as a sorted list of strings (the form bound into sealing AAD)."""
        return sorted(str(u) for u in self.usage)

    def version(self, number: int) -> _V:
        """Return one version, or raise NotFoundError."""
        for v in self.versions:
            if v.version == number:
                return v
        raise NotFoundError(f"key {self.name} has no version {number}")

    @property
    def primary(self) -> _V | None:
        """The version used to protect new data, or None while no version is Active."""
        return None if self.primary_version is None else self.version(self.primary_version)

    @property
    def latest_version(self) -> int:
        """The highest version number (0 if none)."""
        return max((v.version for v in self.versions), default=0)


class Key(BaseModel, KeyHelpers[KeyVersion]):
    """A named key with its type, usage, policy, targets, install spec and versions."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    type: KeyType
    usage: frozenset[Usage]
    policy: Policy
    targets: Targets
    install: InstallSpec
    secret_length: int | None = None
    secret_alphabet: str | None = None
    primary_version: int | None = None
    created_at: datetime
    created_by: str
    updated_at: datetime
    versions: tuple[KeyVersion, ...] = ()
    rollout: Rollout | None = None
    """The key's current or last rollout (see :class:`Rollout`)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validate_key_name(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_serializer("usage")
    def _sorted_usage(self, value: frozenset[Usage]) -> list[str]:
        return sorted(str(u) for u in value)
