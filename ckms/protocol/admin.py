"""Typed parameters and replies of the operator (admin) RPC behind the ``ckms`` CLI.

Methods are named ``noun.verb`` (``key.rotate``, ``host.enroll``, ``request.approve``) plus the
bare ``status``, ``unseal`` and ``seal``. The controller validates every request against the
``*Params`` model of its method and answers with the matching reply model; the CLI parses replies
with the same models, so both sides agree on one shape. Durations travel as whole seconds,
times as RFC 3339 UTC. No reply ever carries key material; the only secret a reply carries is
the one-time enrollment token of ``host.enroll``, shown once.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ckms.crypto import MAX_IMPORT_BYTES, ImportFormat
from ckms.errors import ConfigError, ProtocolError
from ckms.protocol._events import HostId, KeyName
from ckms.protocol._keyspec import InstallSpec, KeyState, RevocationReason, Targets
from ckms.protocol._roles import APPROVAL_OPERATIONS, OPERATOR_ROLES, ApprovalOperation, Role
from ckms.protocol._rollout import (
    ActivateWhen,
    Gate,
    RolloutState,
    parse_gate,
    parse_stages,
)
from ckms.protocol._secret import WireSecret

__all__ = [
    "APPROVAL_OPERATIONS",
    "CREATE_MANY_MAX",
    "FLEET_KEYS_MAX",
    "FLEET_ROWS_MAX",
    "HOST_PAGE_DEFAULT",
    "HOST_PAGE_MAX",
    "KEY_PAGE_DEFAULT",
    "KEY_PAGE_MAX",
    "OPERATOR_ROLES",
    "REPORT_HOLDERS_MAX",
    "REPORT_KEYS_MAX",
    "ApproveReply",
    "AuditAnchorStatus",
    "AuditExportParams",
    "AuditExportReply",
    "AuditRecordInfo",
    "AuditTailParams",
    "AuditTailReply",
    "AuditVerifyReply",
    "BackupChunk",
    "BackupDeleted",
    "BackupInfo",
    "BackupReadParams",
    "BackupRef",
    "DueEntry",
    "Empty",
    "FleetHost",
    "FleetStatusParams",
    "FleetStatusReply",
    "HistoryEntry",
    "HostEnrollParams",
    "HostEnrollReply",
    "HostInfo",
    "HostLabelParams",
    "HostListParams",
    "HostListReply",
    "HostRef",
    "KafkaStatus",
    "KeyChangeReply",
    "KeyCreateManyParams",
    "KeyCreateManyReply",
    "KeyCreateParams",
    "KeyFleet",
    "KeyHistoryReply",
    "KeyImportParams",
    "KeyInfo",
    "KeyListParams",
    "KeyListReply",
    "KeyPolicyParams",
    "KeyRef",
    "KeyRevokeParams",
    "KeyRotateParams",
    "KeySummary",
    "KeyTargetsParams",
    "KeyVersionParams",
    "OperatorAddParams",
    "OperatorInfo",
    "OperatorListReply",
    "OperatorRef",
    "OperatorReply",
    "PolicyInfo",
    "PolicyPatch",
    "ReportApproval",
    "ReportAudit",
    "ReportKey",
    "ReportKeysParams",
    "ReportKeysReply",
    "ReportPerson",
    "ReportSummary",
    "ReportVersion",
    "RequestInfo",
    "RequestListParams",
    "RequestListReply",
    "RequestRef",
    "RequestRejectParams",
    "RolloutInfo",
    "RolloutListReply",
    "RolloutRef",
    "RolloutResumeParams",
    "RolloutStatusReply",
    "SealReply",
    "StatusReply",
    "UnsealParams",
    "VersionInfo",
    "WhoamiReply",
    "agent_enroll_command",
    "fleet_pages",
    "host_pages",
    "key_pages",
    "pages",
    "report_pages",
]


def _operator_role(role: Role) -> Role:
    if role not in OPERATOR_ROLES:
        raise ValueError(f"role {role} belongs to hosts; use one of {', '.join(OPERATOR_ROLES)}")
    return role


OperatorRole = Annotated[Role, AfterValidator(_operator_role)]
OperatorName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.-]{0,63}$")]
RequestId = Annotated[str, Field(pattern=r"^[a-z0-9-]{4,40}$")]
Text = Annotated[str, Field(max_length=1000)]
Seconds = Annotated[int, Field(ge=0, le=100 * 366 * 86400)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Reply(BaseModel):
    # Replies ignore unknown fields so a newer controller can add some without breaking a CLI.
    model_config = ConfigDict(frozen=True, extra="ignore")


# -- parameters ------------------------------------------------------------------------------


class Empty(_Model):
    """No parameters."""


class UnsealParams(_Model):
    """Exactly one of a custodian's SLIP-39 share or the passphrase."""

    share: Annotated[WireSecret, Field(min_length=1, max_length=2048)] | None = None
    passphrase: Annotated[WireSecret, Field(min_length=1, max_length=1024)] | None = None

    @model_validator(mode="after")
    def _one(self) -> UnsealParams:
        if (self.share is None) == (self.passphrase is None):
            raise ValueError("give exactly one of share or passphrase")
        return self


class PolicyPatch(_Model):
    """Policy fields to set; unset fields keep the current (or the type's default) value."""

    cryptoperiod_s: Seconds | None = None
    grace_s: Seconds | None = None
    activation_delay_s: Seconds | None = None
    max_staleness_s: Seconds | None = None
    approvals_required: tuple[ApprovalOperation, ...] | None = None
    cert_lifetime_s: Seconds | None = None
    activate_when: ActivateWhen | None = None
    activation_deadline_s: Seconds | None = None
    activation_threshold_pct: Annotated[int | None, Field(ge=1, le=100)] = None

    @property
    def empty(self) -> bool:
        """True when the patch changes nothing."""
        return all(v is None for v in self.model_dump().values())


class KeyRef(_Model):
    """One key by name."""

    name: KeyName


class KeyCreateParams(_Model):
    """A new key: name, type and optionally usage, policy, targets, install spec."""

    name: KeyName
    type: Annotated[str, Field(max_length=32)]
    usage: tuple[Annotated[str, Field(max_length=32)], ...] | None = None
    policy: PolicyPatch = PolicyPatch()
    targets: Targets = Targets()
    install: InstallSpec | None = None
    secret_length: Annotated[int, Field(ge=1, le=4096)] | None = None
    secret_alphabet: Annotated[str, Field(min_length=2, max_length=256)] | None = None


CREATE_MANY_MAX = 1000
"""Most keys in one ``key.create_many`` request (the request bound, 32 KiB, usually binds first:
the CLI sends as many as fit)."""


class KeyCreateManyParams(_Model):
    """Several new keys at once (onboarding), each as ``key.create`` takes it."""

    keys: Annotated[tuple[KeyCreateParams, ...], Field(min_length=1, max_length=CREATE_MANY_MAX)]


class KeyCreateManyReply(_Reply):
    """The keys created, in request order."""

    created: tuple[str, ...]


IMPORT_MATERIAL_MAX = 4 * ((MAX_IMPORT_BYTES + 2) // 3)
"""Longest base64 text of an imported file (:data:`ckms.crypto.MAX_IMPORT_BYTES` bytes)."""

ImportMaterial = Annotated[WireSecret, Field(min_length=1, max_length=IMPORT_MATERIAL_MAX)]
"""An operator's key file, standard base64, in a request body (hidden from reprs and logs)."""

Staged = Annotated[str, Field(min_length=1, max_length=IMPORT_MATERIAL_MAX + 64)]


class _Importing(_Model):
    """The material of an import: the file (``material``, from the operator) or, set only by
    the controller in a stored dual-control request, that material checked and sealed under
    the data KEK (``staged``); a caller sending ``staged`` is refused."""

    material: ImportMaterial | None = None
    format: ImportFormat = ImportFormat.AUTO
    staged: Staged | None = None


class KeyImportParams(_Importing):
    """A new key whose version 1 is the operator's material (KMIP Register)."""

    name: KeyName
    type: Annotated[str, Field(max_length=32)]
    usage: tuple[Annotated[str, Field(max_length=32)], ...] | None = None
    policy: PolicyPatch = PolicyPatch()
    targets: Targets = Targets()
    install: InstallSpec | None = None


def _stages(value: Any) -> Any:
    if value is None:
        return None
    try:
        return parse_stages(value if isinstance(value, str) else tuple(value))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _gate(value: Any) -> Any:
    if value is None or isinstance(value, Gate):
        return value
    try:
        return parse_gate(str(value))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class KeyRotateParams(_Importing):
    """Add a version to a key, generated or the operator's ``material``: primary at once or
    after the policy's delay, when the fleet holds it (``activate_when`` converged, the
    policy's default when unset), or through ``stages`` (cumulative percents, the last 100)
    that each pass ``gate`` first."""

    name: KeyName
    reason: Text | None = None
    activate_when: ActivateWhen | None = None
    stages: Annotated[tuple[int, ...] | None, AfterValidator(_stages)] = None
    gate: Annotated[Gate | None, AfterValidator(_gate)] = None
    spread: Annotated[str | None, Field(min_length=1, max_length=63)] = None
    """A host label (``zone``) the stage samples spread over."""
    deadline_s: Annotated[int | None, Field(gt=0)] = None
    """How long the rollout may wait for its gates (default: the policy's)."""
    threshold_pct: Annotated[int | None, Field(ge=1, le=100)] = None
    max_failures: Annotated[str | None, Field(pattern=r"^\d{1,6}%?$")] = None
    """The stage's failure budget: hosts (``2``) or a percent of the stage's (``10%``) that may
    fail before it halts; they are named as holdouts (default 0: one failure halts)."""

    @model_validator(mode="after")
    def _coherent(self) -> KeyRotateParams:
        staged = self.stages is not None or self.gate is not None or self.spread is not None
        if staged and self.activate_when is ActivateWhen.DELAY:
            raise ValueError("stages activate when the last stage converges, not on a delay")
        return self

    @property
    def rolls_out(self) -> bool:
        """True when the rotation names rollout options beyond ``activate_when``."""
        return any(
            v is not None
            for v in (
                self.stages,
                self.gate,
                self.spread,
                self.deadline_s,
                self.threshold_pct,
                self.max_failures,
            )
        )


class RolloutRef(_Model):
    """A key's rollout, with the operator's reason for the move."""

    name: KeyName
    reason: Text | None = None


class RolloutResumeParams(_Model):
    """Go on with a halted, rolled-back or expired rollout."""

    name: KeyName
    reason: Text | None = None
    deadline_s: Annotated[int | None, Field(gt=0)] = None
    version: Annotated[int, Field(ge=1)] | None = None
    """The version rolling out: the controller pins it when the call (or its dual-control
    request) arrives, so an approval given later resumes that rollout or nothing."""
    max_failures: Annotated[str | None, Field(pattern=r"^\d{1,6}%?$")] = None
    """The failure budget from now on (to go on past the hosts it halted on): hosts (``2``)
    or a percent of the stage's (``10%``) that may
    fail before it halts; they are named as holdouts (default 0: one failure halts)."""


class KeyVersionParams(_Model):
    """A per-version transition (activate, suspend, resume, destroy)."""

    name: KeyName
    version: Annotated[int, Field(ge=1)]
    reason: Text | None = None


class KeyRevokeParams(_Model):
    """Revoke one version, or every version the reason applies to."""

    name: KeyName
    reason: RevocationReason
    version: Annotated[int, Field(ge=1)] | None = None
    message: Text | None = None


class KeyPolicyParams(_Model):
    """Change a key's policy."""

    name: KeyName
    policy: PolicyPatch


class KeyTargetsParams(_Model):
    """Replace a key's targets (and optionally its install spec)."""

    name: KeyName
    targets: Targets
    install: InstallSpec | None = None


class HostEnrollParams(_Model):
    """Make a one-time enrollment token for a host."""

    name: HostId
    labels: dict[str, str] = Field(default_factory=dict)
    ttl_s: Annotated[int, Field(ge=1, le=7 * 86400)] = 3600


class HostRef(_Model):
    """One host by id."""

    name: HostId


class HostLabelParams(_Model):
    """Change a host's labels: set some, unset some, or replace them all."""

    name: HostId
    set: dict[str, str] = Field(default_factory=dict)
    unset: tuple[str, ...] = ()
    replace: bool = False


FLEET_ROWS_MAX = 5000
"""Most host rows one ``fleet.status`` reply carries (about 2 MB at most, under the reply bound):
the per-key ``limit`` and the rows of one page of every key both stop there."""
FLEET_KEYS_MAX = 500
"""Most keys one ``fleet.status`` page carries (keys without hosts cost a row of their own)."""


class FleetStatusParams(_Model):
    """Fleet view of one key, or one page of every key (by name, after ``after``); at most
    ``limit`` host rows per key, failures and drift first."""

    key: KeyName | None = None
    limit: Annotated[int, Field(ge=1, le=FLEET_ROWS_MAX)] = 1000
    after: KeyName | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> FleetStatusParams:
        if self.key is not None and self.after is not None:
            raise ValueError("after pages every key's view; it does not go with key")
        return self


class AuditTailParams(_Model):
    """The last ``count`` audit records."""

    count: Annotated[int, Field(ge=1, le=1000)] = 20


class AuditExportParams(_Model):
    """One page of the export: records ``start`` .. ``upto`` (fixed by the first page)."""

    start: Annotated[int, Field(ge=0)] = 0
    upto: Annotated[int, Field(ge=0)] | None = None
    limit: Annotated[int, Field(ge=1, le=5000)] = 2000


class OperatorAddParams(_Model):
    """A new operator: name, role and their SSH public key (OpenSSH one-line form)."""

    name: OperatorName
    role: OperatorRole
    ssh_public_key: Annotated[str, Field(min_length=16, max_length=16384)]


class OperatorRef(_Model):
    """One operator by name."""

    name: OperatorName


class RequestListParams(_Model):
    """Pending requests, or every request with ``all``."""

    all: bool = False


class RequestRef(_Model):
    """One approval request by id."""

    id: RequestId


class RequestRejectParams(_Model):
    """Reject (or, for its requester, withdraw) a pending request."""

    id: RequestId
    reason: Text | None = None


# -- replies ---------------------------------------------------------------------------------


class PolicyInfo(_Reply):
    """A key's policy, durations in seconds."""

    cryptoperiod_s: int
    grace_s: int
    activation_delay_s: int
    max_staleness_s: int
    approvals_required: tuple[str, ...]
    cert_lifetime_s: int | None = None
    activate_when: ActivateWhen = ActivateWhen.DELAY
    activation_deadline_s: int | None = None
    activation_threshold_pct: int = 100


class VersionInfo(_Reply):
    """One version of a key (never its material)."""

    version: int
    state: KeyState
    primary: bool
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
    revocation_reason: str | None = None
    revocation_message: str | None = None
    origin: str = "generated"


class KeyInfo(_Reply):
    """A key with its policy, targets, install spec and versions."""

    name: str
    type: str
    usage: tuple[str, ...]
    policy: PolicyInfo
    targets: Targets
    install: InstallSpec
    primary_version: int | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    versions: tuple[VersionInfo, ...]
    next_rotation_at: datetime | None = None
    hosts_targeted: int | None = None


class KeySummary(_Reply):
    """One line of ``key list``."""

    name: str
    type: str
    primary_version: int | None
    primary_state: str | None
    versions: int
    states: dict[str, int]
    targets: tuple[str, ...]
    next_rotation_at: datetime | None = None
    updated_at: datetime


KEY_PAGE_MAX = 2000
"""Most keys one ``key.list`` reply carries (about 0.5 MB, well under the reply bound)."""
KEY_PAGE_DEFAULT = 1000
"""The page :func:`key_pages` asks for by default: about 0.25 MB, a short hold of the loop."""


class KeyListParams(_Model):
    """One page of ``key.list``: the keys named after ``after`` (by name), at most ``limit``."""

    after: KeyName | None = None
    limit: Annotated[int, Field(ge=1, le=KEY_PAGE_MAX)] = KEY_PAGE_DEFAULT


class _Page(_Reply):
    """A reply of a paged method: ``next`` is the cursor of the next page (None: last page)."""

    next: str | None = None


class KeyListReply(_Page):
    """One page of keys, by name."""

    keys: tuple[KeySummary, ...]


_R = TypeVar("_R", bound=_Page)

PageCall = Callable[[str, Any, type[Any]], Awaitable[Any]]
"""An admin RPC call (CLI session, console client) as :func:`pages` makes it."""


async def pages(
    call: PageCall, method: str, reply: type[_R], params: Callable[[str | None], BaseModel]
) -> AsyncIterator[_R]:
    """Every page of a paged method, following the reply's ``next`` cursor to the last page.

    Each page is read in its own snapshot: an item added meanwhile shows when it sorts after
    the cursor; no item present throughout is missed or shown twice. A cursor that does not
    advance is the controller's fault, refused rather than followed forever.

    The next page is asked for as soon as a page arrives, before it is handed on: the
    controller reads it while the caller shows this one (one request in flight at a time).
    """
    after: str | None = None
    ahead: asyncio.Future[_R] | None = asyncio.ensure_future(call(method, params(after), reply))
    try:
        while ahead is not None:
            page = await ahead
            ahead = None
            cursor = page.next
            if cursor is not None:
                if after is not None and cursor <= after:
                    raise ProtocolError(f"the controller's {method} cursor did not advance")
                after = cursor
                ahead = asyncio.ensure_future(call(method, params(after), reply))
                await asyncio.sleep(0)  # the request is on its way before the page is shown
            yield page
    finally:
        if ahead is not None:
            ahead.cancel()


def key_pages(call: PageCall, *, limit: int = KEY_PAGE_DEFAULT) -> AsyncIterator[KeyListReply]:
    """Every page of ``key.list`` in name order."""
    return pages(call, "key.list", KeyListReply, lambda a: KeyListParams(after=a, limit=limit))


class KeyChangeReply(_Reply):
    """The key after a change, and the versions the change touched."""

    key: KeyInfo
    versions: tuple[int, ...] = ()


class HistoryEntry(_Reply):
    """One state transition of one version."""

    version: int
    from_state: str | None
    to_state: str
    operation: str
    at: datetime
    actor: str
    reason: str | None = None


class KeyHistoryReply(_Reply):
    """Every transition of a key's versions, oldest first."""

    key: str
    history: tuple[HistoryEntry, ...]


class HostInfo(_Reply):
    """An enrolled host as the controller sees it."""

    id: str
    labels: dict[str, str]
    enrolled_at: datetime | None
    revoked: bool
    last_seen_at: datetime | None = None
    stale: bool = False
    wrap_suite: str | None = None
    keys: tuple[str, ...] = ()


HOST_PAGE_MAX = 2000
"""Most hosts one ``host.list`` reply carries (about 1 MB, well under the reply bound)."""
HOST_PAGE_DEFAULT = 500


class HostListParams(_Model):
    """One page of ``host.list``: the hosts whose id sorts after ``after``, at most ``limit``."""

    after: HostId | None = None
    limit: Annotated[int, Field(ge=1, le=HOST_PAGE_MAX)] = HOST_PAGE_DEFAULT


class HostListReply(_Page):
    """One page of hosts by id (revoked ones included)."""

    hosts: tuple[HostInfo, ...]


def host_pages(call: PageCall, *, limit: int = HOST_PAGE_DEFAULT) -> AsyncIterator[HostListReply]:
    """Every page of ``host.list`` in id order."""
    return pages(call, "host.list", HostListReply, lambda a: HostListParams(after=a, limit=limit))


class HostEnrollReply(_Reply):
    """A one-time token (shown once) and what the agent must pin."""

    host: str
    labels: dict[str, str]
    token: WireSecret
    expires_at: datetime
    host_key_fingerprint: str
    listen: str


class FleetHost(_Reply):
    """One targeted host's standing for one key."""

    host: str
    versions: dict[int, str]
    converged: bool
    failed: bool
    drift: bool
    digests_ok: bool
    updated_at: datetime | None = None
    age_s: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    """The host's reason for its latest failure (e.g. a path its policy refuses)."""
    cert_serial: str | None = None
    """``tls-cert`` keys: the serial of the host's newest unrevoked certificate..."""
    cert_not_after: datetime | None = None
    """...when it expires..."""
    cert_installed: bool | None = None
    """...and whether the host acked installing it."""


class RolloutInfo(_Reply):
    """A key's rollout and the gate of its stage out now (who holds it up, who failed)."""

    key: str
    version: int
    state: RolloutState
    stage: int
    stages: tuple[int, ...]
    gate: Gate
    spread: str | None = None
    released: int | None = None
    """Hosts the version is released to (None: every targeted host)."""
    threshold_pct: int = 100
    max_failures: str | None = None
    primary_version: int | None = None
    started_at: datetime
    started_by: str
    stage_started_at: datetime
    deadline_at: datetime
    updated_at: datetime
    reason: str | None = None
    hosts: int | None = None
    """Hosts of the stage out now (None once the rollout ended)."""
    acked: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    """Hosts of the stage that have not acknowledged the version: they hold the gate up."""
    failed: tuple[str, ...] = ()
    uncounted: tuple[str, ...] = ()
    """Silent hosts not seen for longer than max staleness (their agents dropped the key)."""
    gate_holds: bool | None = None


class RolloutStatusReply(_Reply):
    """One key's rollout."""

    rollout: RolloutInfo


class RolloutListReply(_Reply):
    """Every rollout not ended."""

    rollouts: tuple[RolloutInfo, ...]


class KeyFleet(_Reply):
    """The fleet view of one key: failures and drift first, then pending, then converged."""

    key: str
    primary_version: int | None
    wanted_versions: tuple[int, ...]
    targeted: int
    converged: int
    failed: int
    drift: int
    converged_pct: float
    hosts: tuple[FleetHost, ...]
    truncated: int = 0
    rollout: RolloutInfo | None = None
    """The key's rollout while one is not ended."""

    @property
    def not_converged(self) -> list[str]:
        """Hosts that have not acknowledged what they should hold."""
        return [h.host for h in self.hosts if not h.converged]


class FleetStatusReply(_Page):
    """The fleet view of one key, or one page of every key by name."""

    keys: tuple[KeyFleet, ...]


def fleet_pages(call: PageCall, *, limit: int = 1000) -> AsyncIterator[FleetStatusReply]:
    """Every page of ``fleet.status`` over every key, in name order."""
    return pages(
        call,
        "fleet.status",
        FleetStatusReply,
        lambda a: FleetStatusParams(limit=limit, after=a),
    )


class KafkaStatus(_Reply):
    """The publisher's view of Kafka, and the hosts' acks the controller applied or refused."""

    bootstrap: str
    connected: bool
    published: int
    failures: int
    last_error: str | None = None
    backlog: int
    acks_applied: int
    acks_dropped: dict[str, int] = Field(default_factory=dict)


class AuditAnchorStatus(_Reply):
    """The audit anchor: the last checkpoint signed and published outside the database."""

    loaded: bool
    """False until the anchor was read back from its topic (nothing is signed before)."""
    size: int | None = None
    head: str | None = None
    published_size: int | None = None
    broken: str | None = None
    """Why the stored log does not extend the anchor; audited operations are refused."""


class ReplicaInfo(_Reply):
    """One controller replica on the store, from its heartbeat."""

    name: str
    address: str
    version: str
    sealed: bool
    last_seen_at: datetime
    leader: bool = False
    """Holds the leader lease (publisher, scheduler, checkpoints, rollouts run there)."""
    alive: bool = True
    """Seen within three lease periods."""


class LeadershipStatus(_Reply):
    """Which replica leads, with which lease epoch (the fencing token), as this one sees it."""

    replica: str
    """The replica that answered."""
    leading: bool
    leader: str | None = None
    epoch: int | None = None
    expires_at: datetime | None = None
    replicas: tuple[ReplicaInfo, ...] = ()


class DueEntry(_Reply):
    """A version whose rotation is due at ``due_at``."""

    key: str
    version: int
    due_at: datetime


class WhoamiReply(_Reply):
    """Who the controller says the caller is (the console shows only what the role may do)."""

    name: str
    role: str


class CaRetireParams(_Model):
    """End a CA rotation's overlap; ``force`` even while hosts hold old certificates."""

    force: bool = False


class CertWarning(_Reply):
    """A host certificate that was due for renewal and was not renewed."""

    host: str
    key: str
    version: int
    serial: str
    not_after: datetime
    renew_at: datetime
    expired: bool


class CaGenerationInfo(_Reply):
    """One CA generation: a root and the intermediate that signs for it."""

    generation: int
    root_fingerprint: str
    root_subject: str
    root_not_after: datetime
    issuing_fingerprint: str
    issuing_subject: str
    issuing_not_after: datetime
    active: bool
    trusted: bool


class CaReply(_Reply):
    """The controller's CA: its generations, and the trust bundle hosts hold (PEM)."""

    generations: tuple[CaGenerationInfo, ...]
    bundle: str


class CrlReply(_Reply):
    """One CRL per trusted CA generation (PEM, concatenated) and the serials they list."""

    crl: str
    serials: tuple[str, ...]


class StatusReply(_Reply):
    """Health of the controller: sealing, Kafka, due work, stale hosts, pending requests."""

    now: datetime
    initialized: bool
    sealed: bool
    mode: str | None = None
    threshold: int | None = None
    shares_given: int = 0
    signer_key_id: str | None = None
    signing_public_key: str | None = None
    host_key_fingerprint: str
    listen: str
    kafka: KafkaStatus
    keys: int
    hosts: int
    hosts_revoked: int
    rotations_due: tuple[DueEntry, ...] = ()
    """Rotations due within 30 days (overdue ones included), soonest first."""
    due_counts: dict[str, int] = Field(default_factory=dict)
    """Cumulative counts: ``overdue``, ``1d``, ``7d``, ``30d``."""
    activations_due: int = 0
    deactivations_due: int = 0
    stale_hosts: tuple[str, ...] = ()
    pending_requests: int = 0
    audit_anchor: AuditAnchorStatus | None = None
    cert_warnings: tuple[CertWarning, ...] = ()
    """Host certificates that missed their renewal and will expire (or did) unless renewed."""
    rollouts: tuple[RolloutInfo, ...] = ()
    """Rollouts not ended (running, halted, rolled back, expired), with who holds each up."""
    leadership: LeadershipStatus | None = None
    """Replicas on this store and which one leads (None from a controller before replicas)."""


class SealReply(_Reply):
    """Sealing state after ``unseal`` or ``seal``."""

    sealed: bool
    mode: str | None = None
    threshold: int | None = None
    given: int = 0
    replica: str | None = None
    """The replica that answered (among replicas)."""
    unsealed_replicas: tuple[str, ...] = ()
    """After ``seal``: the other replicas alive and unsealed by their last heartbeat, which
    this seal did not reach (each replica keeps its own seal)."""


class AuditRecordInfo(_Reply):
    """One audit record."""

    index: int
    at: str
    actor: str
    action: str
    object: str
    outcome: str
    details: dict[str, Any]
    hash: str


class AuditTailReply(_Reply):
    """The newest audit records, oldest first."""

    size: int
    records: tuple[AuditRecordInfo, ...]


class AuditVerifyReply(_Reply):
    """The outcome of verifying the stored audit log."""

    ok: bool
    size: int
    head_hash: str
    checkpoints_verified: int
    first_bad_index: int | None = None
    bad_checkpoint_size: int | None = None
    reason: str | None = None
    checkpoint_size: int | None = None
    """Size of the checkpoint signed just before verifying (None while sealed)."""
    anchor_size: int | None = None
    """Size of the anchor the log was verified against (None: no anchor)."""


class AuditExportReply(_Reply):
    """One page of JSON lines; the last page ends with every checkpoint up to ``upto``."""

    lines: tuple[str, ...]
    upto: int
    next_start: int | None = None


class OperatorInfo(_Reply):
    """An operator (a person), their role and key fingerprint."""

    name: str
    role: str
    fingerprint: str
    created_at: datetime
    created_by: str
    disabled: bool


class OperatorListReply(_Reply):
    """Every operator."""

    operators: tuple[OperatorInfo, ...]


class OperatorReply(_Reply):
    """An operator after a change."""

    operator: OperatorInfo


class RequestInfo(_Reply):
    """A dual-control request and its decisions."""

    id: str
    operation: str
    object: str
    params: dict[str, Any]
    requester: str
    created_at: datetime
    expires_at: datetime
    state: str
    expired: bool = False
    decisions: tuple[dict[str, Any], ...] = ()


class RequestListReply(_Reply):
    """Requests, newest first."""

    requests: tuple[RequestInfo, ...]


class ApproveReply(_Reply):
    """An approved request and the reply of the operation it ran."""

    request: RequestInfo
    result: dict[str, Any]


def agent_enroll_command(controller: str, fingerprint: str) -> str:
    """The ``ckms-agent enroll`` command an operator runs on the new host.

    The token is not in it: a command line shows in ``ps`` and shell history, so the agent
    reads the token from ``CKMS_AGENT_ENROLL_TOKEN`` (or ``--token-file``).
    """
    return shlex.join(
        ["ckms-agent", "enroll", "--controller", controller, "--host-key-fingerprint", fingerprint]
    )


# -- backups ---------------------------------------------------------------------------------

BackupId = Annotated[str, Field(pattern=r"^b-[0-9a-f]{16}$")]


class BackupRef(_Model):
    """One backup the controller made and keeps until it is fetched."""

    id: BackupId


class BackupReadParams(_Model):
    """A chunk of a backup file (at most 1 MiB a chunk)."""

    id: BackupId
    offset: Annotated[int, Field(ge=0)] = 0
    length: Annotated[int, Field(ge=1, le=1024 * 1024)] = 1024 * 1024


class BackupInfo(_Reply):
    """A consistent copy of the controller's store (material sealed) and what it holds."""

    id: str
    size: int
    sha256: str
    schema_version: int
    keys: int
    versions: int
    audit_size: int
    audit_head: str
    checkpoint_size: int | None = None
    checkpoint_head: str | None = None
    signer_key_id: str | None = None


class BackupChunk(_Reply):
    """Bytes of a backup file, base64, from ``offset``; ``size`` is the whole file's."""

    offset: int
    size: int
    data: str


class BackupDeleted(_Reply):
    """A backup removed from the controller's home."""

    id: str


# -- reports ---------------------------------------------------------------------------------

REPORT_KEYS_MAX = 500
"""Most keys in one ``report.keys`` page."""
REPORT_HOLDERS_MAX = 5000
"""Most holder host names in one ``report.keys`` page (a page ends before the key that would
pass it; a key alone past it has each version's holders cut to what fits, with the count)."""


class ReportKeysParams(_Model):
    """One page of the key inventory, by name after ``after``."""

    after: KeyName | None = None
    limit: Annotated[int, Field(ge=1, le=REPORT_KEYS_MAX)] = 200


class ReportVersion(_Reply):
    """One version in the inventory: its state and origin, and which hosts hold it now."""

    version: int
    state: str
    primary: bool
    origin: str
    created_at: datetime
    activated_at: datetime | None = None
    deactivated_at: datetime | None = None
    compromised_at: datetime | None = None
    destroyed_at: datetime | None = None
    holders: tuple[str, ...] = ()
    """Hosts whose acks say ``installed`` for this version, by name (cut: ``holders_total``)."""
    holders_total: int = 0


class ReportApproval(_Reply):
    """One dual-control request on a key: who asked, who decided, how it ended."""

    id: str
    operation: str
    requester: str
    state: str
    created_at: datetime
    decisions: tuple[dict[str, Any], ...] = ()


class ReportKey(_Reply):
    """A key as the inventory (PCI DSS 3.6.1.1) lists it, with the findings that apply."""

    name: str
    type: str
    purpose: str
    usage: tuple[str, ...]
    cryptoperiod_s: int
    max_cryptoperiod_s: int
    grace_s: int
    approvals_required: tuple[str, ...]
    targets: tuple[str, ...]
    env: str | None = None
    created_at: datetime
    created_by: str
    rotated_at: datetime | None = None
    """When the newest version was made (None: never rotated)."""
    next_rotation_at: datetime | None = None
    overdue: bool = False
    primary_version: int | None = None
    hosts_targeted: int = 0
    hosts_converged: int = 0
    versions: tuple[ReportVersion, ...] = ()
    approvals: tuple[ReportApproval, ...] = ()
    findings: tuple[str, ...] = ()


class ReportKeysReply(_Reply):
    """One page of the inventory; ``next`` continues after the last key."""

    keys: tuple[ReportKey, ...]
    next: str | None = None


class ReportPerson(_Reply):
    """An operator who holds a share or may approve dual-control requests."""

    name: str
    role: str
    disabled: bool


class ReportAudit(_Reply):
    """The audit verification the report ran: what it verified, up to which head."""

    ok: bool
    size: int
    head_hash: str
    checkpoints_verified: int
    checkpoint_size: int | None = None
    checkpoint_head: str | None = None
    checkpoint_at: str | None = None
    anchor_size: int | None = None
    reason: str | None = None
    first_bad_index: int | None = None


class ReportSummary(_Reply):
    """The report's header, from the live controller at ``generated_at``."""

    generated_at: datetime
    signer_key_id: str | None = None
    keys: int
    hosts: int
    hosts_revoked: int
    stale_hosts: tuple[str, ...] = ()
    rotations_overdue: int
    pending_requests: int
    custodians: tuple[ReportPerson, ...] = ()
    approvers: tuple[ReportPerson, ...] = ()
    audit: ReportAudit
    findings: tuple[str, ...] = ()


def report_pages(call: PageCall, *, limit: int = 200) -> AsyncIterator[ReportKeysReply]:
    """Every page of ``report.keys`` in name order."""
    return pages(
        call, "report.keys", ReportKeysReply, lambda a: ReportKeysParams(after=a, limit=limit)
    )
