"""Typed parameters and replies of the agent's SSH requests: enroll, sync, heartbeat, fetch,
digest_key, cert_sign, ack.

Replies carry install specs, digests and states; only ``fetch`` carries material, and only
HPKE-wrapped for the one agent that asked (docs/architecture.md §5), inside SSH. The fleet's
digest key (what material digests are keyed with) comes the same way: HPKE-wrapped to the
agent, with the key name :data:`DIGEST_KEY_WRAP_NAME` and version :data:`DIGEST_KEY_WRAP_VERSION`
bound into the wrap (no real key can have that name or version), in the enroll reply and, for
agents enrolled before digests were keyed, from ``digest_key``. ``cert_sign`` carries a CSR
one way and a certificate the other: the private key behind it never leaves the host.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ckms.protocol._events import (
    Digest,
    HostId,
    KeyName,
    Serial,
    Version,
    VersionState,
    _omit_empty,
)
from ckms.protocol._keyspec import InstallSpec
from ckms.protocol._secret import WireSecret

B64 = Annotated[str, Field(max_length=8192, pattern=r"^[A-Za-z0-9+/=_-]*$")]
Pem = Annotated[str, Field(max_length=65536, pattern=r"^[A-Za-z0-9+/=\n\r -]*$")]
"""PEM text (certificates, CSRs, bundles): base64 lines between ``-----BEGIN/END`` markers."""

DIGEST_KEY_WRAP_NAME = "ckms:digest-key"
DIGEST_KEY_WRAP_VERSION = 0


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EnrollRequest(_Model):
    """First connection of a new agent: its one-time token and its freshly made public keys.

    ``identity_key`` (OpenSSH public line) is the key the SSH connection authenticated with;
    ``signing_key`` is the same Ed25519 key as 32 raw bytes (base64), used to verify acks.
    """

    token: Annotated[WireSecret, Field(min_length=16, max_length=256)]
    identity_key: str = Field(min_length=16, max_length=1024)
    signing_key: B64
    wrapping_key: B64
    wrap_suite: str = "x25519"
    agent_version: str = Field(default="", max_length=64)
    kafka_csr: Pem | None = None
    """A CSR (naming nothing) for the host's Kafka client key, made on the host; the reply
    carries the certificate ``CN=<host>,OU=ckms-agent`` when the controller has a CA."""


class EnrollReply(_Model):
    """What the agent pins and needs to run."""

    host: HostId
    labels: dict[str, str]
    controller_signing_key: B64
    controller_key_id: str
    kafka_bootstrap: str
    events_topic: str
    event_seq: int = Field(default=0, ge=0)
    """The controller's last event ``seq`` when this host enrolled: the agent drops every event
    at or below it (all older than the enrollment, e.g. a predecessor's ``host.revoked``)."""
    digest_key: B64
    """The fleet's digest key, HPKE-wrapped to this host (base64 of the blob)."""
    ca_bundle: Pem | None = None
    """The roots of the controller's CA this host trusts (PEM), from a controller that has one."""
    kafka_certificate: Pem | None = None
    """The host's Kafka client certificate and its chain (PEM), for ``kafka_csr``."""

    # Absent, not null, when unset: an agent from before the CA (which forbids unknown fields)
    # still enrolls with a newer controller, which sends them only to agents that sent a CSR.
    _omit = _omit_empty("ca_bundle", "kafka_certificate")


class DigestKeyRequest(_Model):
    """Ask for the fleet's digest key (no parameters)."""


class DigestKeyReply(_Model):
    """The fleet's digest key, HPKE-wrapped to the asking host (base64 of the blob)."""

    suite: str
    wrapped: B64


class InstalledVersion(_Model):
    """One version the agent holds on disk, with the digest of its canonical material."""

    key: KeyName
    version: Version
    digest: Digest


class FetchRequest(_Model):
    """Ask for one version's material."""

    key: KeyName
    version: Version


class FetchReply(_Model):
    """One version's material, HPKE-wrapped for the asking agent (base64 of the blob)."""

    key: KeyName
    version: Version
    digest: Digest
    suite: str
    wrapped: B64


MAX_PREFETCH = 32
"""Most versions one ``sync`` may ask to receive with its reply."""


class SyncRequest(_Model):
    """The agent's report of what it holds (also sent as the heartbeat).

    ``fetch`` asks for versions the agent already knows it needs (named by the event that woke
    it) to come back wrapped in the same reply, so a rotation costs one request, not two. Each
    is authorized exactly like a ``fetch``; one that is refused is left out of the reply, and the
    agent's own ``fetch`` of it then gets the reason.
    """

    installed: tuple[InstalledVersion, ...] = Field(default=(), max_length=4096)
    fetch: tuple[FetchRequest, ...] = Field(default=(), max_length=MAX_PREFETCH)
    want_ca_bundle: bool = False
    """Set by agents that keep the CA's trust bundle: only they get ``ca_bundle`` back (an
    older agent's reply model has no such field)."""

    _omit = _omit_empty("want_ca_bundle")


class DesiredVersion(_Model):
    """One version the host should hold."""

    version: Version
    state: VersionState
    primary: bool
    digest: Digest


class DesiredKey(_Model):
    """One key the host should hold: how to install it and which versions."""

    key: KeyName
    key_type: str
    install: InstallSpec
    versions: tuple[DesiredVersion, ...]
    max_staleness_s: int | None = None
    names: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    """For a ``tls-cert`` key: the digest of the names this host's certificate carries now
    (``tls_names_digest``); the agent re-issues when its certificate was issued under another."""

    _omit = _omit_empty("names")


class RemoveItem(_Model):
    """Versions the host may still hold and must remove."""

    key: KeyName
    versions: tuple[Version, ...]


class SyncReply(_Model):
    """The host's desired state. Anything the host holds that is not listed must be removed."""

    host: HostId
    keys: tuple[DesiredKey, ...]
    remove: tuple[RemoveItem, ...] = ()
    controller_time: str
    reconcile_interval_s: int = 300
    material: tuple[FetchReply, ...] = Field(default=(), max_length=MAX_PREFETCH)
    """The versions the request's ``fetch`` asked for that the host may have, wrapped for it."""
    ca_bundle: Pem | None = None
    """The CA roots hosts trust now (both during a CA rotation); the agent keeps its copy."""

    _omit = _omit_empty("ca_bundle")


class CertSignRequest(_Model):
    """Ask the controller to certify the host's own key for one ``tls-cert`` version.

    ``csr`` is a PEM PKCS#10 request signed by the key the host just made; the controller
    issues exactly the names the key's install spec renders for this host and refuses a CSR
    asking for any other.
    """

    key: KeyName
    version: Version
    csr: Pem


class ClientCertRequest(_Model):
    """Renew the host's Kafka client certificate: a CSR (naming nothing, or exactly the
    host's subject) signed by a key the host just made."""

    csr: Pem


class ClientCertReply(_Model):
    """The host's Kafka client certificate (``CN=<host>,OU=ckms-agent``) with its chain."""

    certificate: Pem
    """The certificate followed by the intermediate (what a TLS client presents)."""
    ca_bundle: Pem
    serial: Serial
    not_after: str


class CertSignReply(_Model):
    """The issued certificate, the chain to a root, and the roots the host should trust."""

    key: KeyName
    version: Version
    certificate: Pem
    chain: Pem
    ca_bundle: Pem
    serial: Serial
    not_after: str


MAX_ACK_BATCH = 32
"""Most signed acks one ``ack`` request carries."""

MAX_ACK_BATCH_BYTES = 24 * 1024
"""Most bytes of encoded acks (``value`` + ``sig`` + ``kid``) one ``ack`` request carries, so
the request stays under the RPC request bound (32 KiB) with room for its framing."""

MAX_SIGNED_ACK_CHARS = 16 * 1024
"""Longest base64 ``value`` of one ack (12 KiB of canonical JSON; a real ack is ~400 bytes)."""

B64Ack = Annotated[
    str, Field(min_length=4, max_length=MAX_SIGNED_ACK_CHARS, pattern=r"^[A-Za-z0-9+/=]*$")
]


class SignedAck(_Model):
    """One ack exactly as the agent signed it: the canonical envelope bytes (base64), the
    Ed25519 signature over them (base64) and the signer's key id. The controller verifies the
    signature over the bytes before it parses them."""

    value: B64Ack
    sig: Annotated[str, Field(min_length=4, max_length=128, pattern=r"^[A-Za-z0-9+/=]*$")]
    kid: str = Field(min_length=1, max_length=128)


class AckRequest(_Model):
    """A batch of the agent's queued signed acks, oldest first (bounded in count and bytes)."""

    acks: tuple[SignedAck, ...] = Field(min_length=1, max_length=MAX_ACK_BATCH)


class AckRefused(_Model):
    """One ack of the batch the controller refused (``index`` into the request's ``acks``), with
    the reason code (``bad-signature``, ``unknown-signer``, ``invalid-data``, ...)."""

    index: Annotated[int, Field(ge=0, lt=MAX_ACK_BATCH)]
    reason: str = Field(max_length=64)


class AckReply(_Model):
    """What the controller made of an ``ack`` batch, answered only after its commit.

    ``applied``: the ack seqs applied in this commit; ``duplicates``: seqs at or below the last
    one already applied for this host (a retransmission after a lost reply; harmless). Both are
    durable: the agent forgets them. ``refused``: acks that can never be applied (the agent
    logs and forgets them too, or its queue would be stuck behind them).
    """

    applied: tuple[int, ...] = Field(default=(), max_length=MAX_ACK_BATCH)
    duplicates: tuple[int, ...] = Field(default=(), max_length=MAX_ACK_BATCH)
    refused: tuple[AckRefused, ...] = Field(default=(), max_length=MAX_ACK_BATCH)


class HeartbeatReply(_Model):
    """The controller's view of the heartbeat: which keys it sees drift on for this host."""

    drift: tuple[KeyName, ...] = ()
    controller_time: str
