"""The typed ``data`` of every event and of the ack (docs/architecture.md §3).

Events never carry key material: only names, versions, digests, states, targets and install
specs. Every model forbids unknown fields, so a message that grew a field it should not have
(for instance material) is refused rather than silently carried along.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from ckms.protocol._keyspec import (
    _HOST_ID_RE,
    KEY_NAME_RE,
    InstallSpec,
    RevocationReason,
    Targets,
    VersionState,
)
from ckms.protocol._roles import ApprovalOperation
from ckms.protocol._rollout import MAX_STAGES, ActivateWhen, Gate, RolloutState

KeyName = Annotated[str, Field(max_length=129, pattern=KEY_NAME_RE.pattern)]
Version = Annotated[int, Field(ge=1)]
Digest = Annotated[str, Field(pattern=r"^(hmac-sha256|sha256):[0-9a-f]{64}$")]
"""A keyed material digest (``hmac-sha256:``, see ``ckms.crypto.material_digest``); the plain
``sha256:`` form is what versions made before digests were keyed carried."""
HostId = Annotated[str, Field(pattern=_HOST_ID_RE.pattern)]


class EventType(StrEnum):
    """Every event type: on ``ckms.events``, ``fleet.acked`` on ``ckms.fleet``, and ``ack``, which
    agents sign and send over their SSH connection (never on Kafka)."""

    KEY_CREATED = "key.created"
    KEY_ROTATED = "key.rotated"
    KEY_STATE_CHANGED = "key.state_changed"
    KEY_REVOKED = "key.revoked"
    KEY_DESTROYED = "key.destroyed"
    KEY_TARGETS_CHANGED = "key.targets_changed"
    KEY_POLICY_CHANGED = "key.policy_changed"
    KEY_ROLLOUT = "key.rollout"
    HOST_REVOKED = "host.revoked"
    CA_ROTATED = "ca.rotated"
    FLEET_ACKED = "fleet.acked"
    ACK = "ack"


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


Seconds = Annotated[int, Field(ge=0)]
Serial = Annotated[str, Field(pattern=r"^[0-9a-f]{1,40}$")]
"""A certificate serial: lowercase hex, no separators (``ckms.crypto.serial_hex``)."""
Fingerprint = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


def _omit_empty(*names: str) -> Any:
    """A wrap serializer leaving out fields that are None, False or empty, so a field added
    later is absent (not null, false or []) where it is not used, and the message reads
    exactly as before it existed."""

    def serialize(self: Any, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for name in names:
                value = out.get(name)
                if value is None or value is False or value in ([], ()):
                    out.pop(name, None)
        return out

    return model_serializer(mode="wrap")(serialize)


class EventPolicy(_Data):
    """A key's policy as events carry it: durations in whole seconds, operations sorted."""

    cryptoperiod: Seconds
    grace: Seconds
    activation_delay: Seconds
    max_staleness: Seconds
    approvals_required: tuple[ApprovalOperation, ...]
    cert_lifetime: Seconds | None = None
    """A ``tls-cert`` key's certificate lifetime; absent for every other key."""
    activate_when: ActivateWhen | None = None
    """Set (with the two below) only for a policy that activates rotations when converged:
    events of every other policy stay as agents before rollouts read them."""
    activation_deadline: Seconds | None = None
    activation_threshold_pct: Annotated[int, Field(ge=1, le=100)] | None = None

    _omit = _omit_empty(
        "cert_lifetime", "activate_when", "activation_deadline", "activation_threshold_pct"
    )


class KeyCreated(_Data):
    """A key was created with its first version."""

    key: KeyName
    key_id: str
    type: str
    usage: tuple[str, ...]
    version: Version
    state: VersionState
    digest: Digest
    activation_at: str | None = None
    primary: int | None = None
    policy: EventPolicy
    targets: Targets
    install: InstallSpec


class KeyRotated(_Data):
    """A new version exists; hosts that match ``targets`` should fetch and install it."""

    key: KeyName
    key_id: str
    type: str
    version: Version
    state: VersionState
    digest: Digest
    activation_at: str | None = None
    primary: int | None = None
    previous_primary: int | None = None
    targets: Targets
    install: InstallSpec


class KeyStateChanged(_Data):
    """One version moved state (activate, suspend, resume, deactivate)."""

    key: KeyName
    key_id: str
    version: Version
    from_state: VersionState = Field(alias="from")
    to_state: VersionState = Field(alias="to")
    primary: int | None = None
    reason: str | None = None
    serials: tuple[Serial, ...] = Field(default=(), max_length=10000)
    """For a ``tls-cert`` version suspended or deactivated: the serials of the hosts'
    certificates the move revoked (the CRL lists them too); absent otherwise."""

    _omit = _omit_empty("serials")


class KeyRevoked(_Data):
    """A version was revoked: hosts must remove it (and say so with a ``removed`` ack)."""

    key: KeyName
    key_id: str
    version: Version
    from_state: VersionState = Field(alias="from")
    to_state: VersionState = Field(alias="to")
    reason: RevocationReason
    compromise: bool
    primary: int | None = None
    serials: tuple[Serial, ...] = Field(default=(), max_length=10000)
    """For a ``tls-cert`` key: the serials of the hosts' certificates of this version that the
    revocation made invalid (the CRL lists them too); absent for other keys."""

    _omit = _omit_empty("serials")


class KeyDestroyed(_Data):
    """A version's material was destroyed on the controller; hosts must not hold it."""

    key: KeyName
    key_id: str
    version: Version
    from_state: VersionState = Field(alias="from")
    to_state: VersionState = Field(alias="to")
    digest: Digest
    primary: int | None = None


class KeyTargetsChanged(_Data):
    """The hosts a key goes to (or how it is installed) changed; untargeted hosts remove it."""

    key: KeyName
    key_id: str
    targets: Targets
    install: InstallSpec


class KeyPolicyChanged(_Data):
    """A key's policy changed (cryptoperiod, grace, staleness, approvals)."""

    key: KeyName
    key_id: str
    policy: EventPolicy


Percent = Annotated[int, Field(ge=1, le=100)]


class KeyRollout(_Data):
    """A rollout of a PreActive version moved: a stage went out, halted, was rolled back,
    expired, or the rollout ended.

    Hosts that hold the key (or that ``targets`` select) reconcile it: the sync reply says
    whether this host is in a released stage (then it fetches and installs the version, not as
    primary) or not (then it drops the version if it holds it). The version becomes primary only
    through the ``key.state_changed`` activation that follows ``completed``.
    """

    key: KeyName
    key_id: str
    version: Version
    state: RolloutState
    stage: Annotated[int, Field(ge=1, le=MAX_STAGES)]
    stages: Annotated[tuple[Percent, ...], Field(min_length=1, max_length=MAX_STAGES)]
    gate: Gate
    released: Annotated[int, Field(ge=0)] | None = None
    """Hosts the version is released to (None: every targeted host)."""
    targets: Targets
    reason: str | None = Field(default=None, max_length=1024)


class HostRevoked(_Data):
    """A host was revoked: its identity is no longer trusted; it must drop every key.

    ``signer_key_id`` names the identity key that was revoked, so a host re-enrolled under the
    same name (with a new key) ignores an old revocation of its predecessor. Events written
    before this field existed lack it; agents drop those by ``seq`` once re-enrolled.
    """

    host: HostId
    signer_key_id: str | None = Field(default=None, min_length=1, max_length=128)
    serials: tuple[Serial, ...] = Field(default=(), max_length=10000)
    """The serials of the host's certificates the revocation made invalid (absent if none)."""

    _omit = _omit_empty("serials")


CA_SUBJECT = "ckms:ca"
"""The subject (Kafka partitioning key) of ``ca.rotated``: no key or host can be named so."""


class CaRotated(_Data):
    """The controller's CA changed: hosts fetch the new trust bundle (and renew on the new CA).

    ``trusted`` lists the fingerprints of every root hosts must trust now (during a rotation
    both the new and the previous root; after ``ckms ca retire`` only the new one);
    ``issuing`` is the fingerprint of the intermediate that signs new certificates.
    """

    generation: int = Field(ge=1)
    trusted: tuple[Fingerprint, ...] = Field(min_length=1, max_length=8)
    issuing: Fingerprint


class AckStatus(StrEnum):
    """What an agent reports for one key version."""

    INSTALLED = "installed"
    REMOVED = "removed"
    FAILED = "failed"


def _legacy_output(schema: dict[str, Any]) -> None:
    # The schema twin of _drop_output: any value is accepted there, and ignored.
    schema["properties"]["output"] = {
        "deprecated": True,
        "description": "Sent by agents before hook names; accepted and ignored.",
    }


class HookResult(_Data):
    """The outcome of a reload or health-check hook: its name, exit status and duration.

    A hook's output never leaves the host (it may print anything, key material included); it
    goes to the agent's local log only.
    """

    model_config = ConfigDict(json_schema_extra=_legacy_output)

    command: Literal["reload", "health"]
    name: str | None = Field(default=None, max_length=64)
    exit_code: int | None
    timed_out: bool = False
    duration_ms: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _drop_output(cls, value: Any) -> Any:
        # Agents before hook names sent the hook's output; it is dropped here, never kept.
        if isinstance(value, dict) and "output" in value:
            return {k: v for k, v in value.items() if k != "output"}
        return value


class Ack(_Data):
    """An agent's signed statement of what it did for one key version."""

    agent: HostId
    key: KeyName
    version: Version
    status: AckStatus
    digest: Digest | None = None
    hooks: tuple[HookResult, ...] = ()
    event_id: str | None = None
    elapsed_ms: int = Field(ge=0)
    error: str | None = Field(default=None, max_length=1024)
    cert_serial: Serial | None = None
    """For a ``tls-cert`` key: the serial of the certificate now installed (absent otherwise)."""
    cert_not_after: str | None = Field(default=None, max_length=64)
    """...and when it expires (RFC 3339 UTC)."""

    _omit = _omit_empty("cert_serial", "cert_not_after")


AckSeq = Annotated[int, Field(ge=1, le=(1 << 63) - 1)]


class AckedVersion(_Data):
    """One host's ack as the controller verified and applied it: what the host said, with the
    host's own times (``at``: when it signed the ack; ``elapsed_ms``: how long the work took)."""

    host: HostId
    version: Version
    status: AckStatus
    digest: Digest | None = None
    at: str = Field(max_length=64)
    elapsed_ms: int = Field(ge=0)
    ack_seq: AckSeq
    """The host's ack sequence number: (host, ack_seq) names one ack, so a consumer that sees it
    twice (a relay retry) can tell."""
    event_id: str | None = Field(default=None, max_length=64)
    """The controller event the ack answers, if any."""
    error: str | None = Field(default=None, max_length=1024)
    cert_serial: Serial | None = None
    cert_not_after: str | None = Field(default=None, max_length=64)

    _omit = _omit_empty("digest", "event_id", "error", "cert_serial", "cert_not_after")


MAX_FLEET_ACKS = 200
"""Most acks one ``fleet.acked`` event carries (the controller also keeps each event well under
the message size bound, so a batch of long error texts is split sooner)."""


class FleetAcked(_Data):
    """Hosts' acks of one key that the controller verified and applied in one commit.

    Republished, signed by the controller, so a service that wants to know which host holds
    which version trusts one signer instead of every host's key. Acks naming a key the
    controller does not know are kept in its audit log only.
    """

    key: KeyName
    key_id: str = Field(max_length=64)
    acks: tuple[AckedVersion, ...] = Field(min_length=1, max_length=MAX_FLEET_ACKS)


EVENT_DATA_MODELS: dict[EventType, type[_Data]] = {
    EventType.KEY_CREATED: KeyCreated,
    EventType.KEY_ROTATED: KeyRotated,
    EventType.KEY_STATE_CHANGED: KeyStateChanged,
    EventType.KEY_REVOKED: KeyRevoked,
    EventType.KEY_DESTROYED: KeyDestroyed,
    EventType.KEY_TARGETS_CHANGED: KeyTargetsChanged,
    EventType.KEY_POLICY_CHANGED: KeyPolicyChanged,
    EventType.KEY_ROLLOUT: KeyRollout,
    EventType.HOST_REVOKED: HostRevoked,
    EventType.CA_ROTATED: CaRotated,
    EventType.FLEET_ACKED: FleetAcked,
    EventType.ACK: Ack,
}
"""The data model of each type; an unknown type is refused."""

_TYPE_OF: dict[type[BaseModel], EventType] = {m: t for t, m in EVENT_DATA_MODELS.items()}


def event_type_of(data: BaseModel) -> EventType:
    """The event type a data model announces (ValueError for a model that is no event data)."""
    try:
        return _TYPE_OF[type(data)]
    except KeyError:
        raise ValueError(f"{type(data).__name__} is not event data") from None


EventData = (
    KeyCreated
    | KeyRotated
    | KeyStateChanged
    | KeyRevoked
    | KeyDestroyed
    | KeyTargetsChanged
    | KeyPolicyChanged
    | KeyRollout
    | HostRevoked
    | CaRotated
    | FleetAcked
    | Ack
)
