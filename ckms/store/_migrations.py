"""Ordered schema migrations; each runs once, in its own transaction, recorded in schema_version.

Never edit a migration that has shipped: add a new one with the next number. A database whose
schema is newer than this code knows is refused rather than guessed at.

Schema notes (why, not what):

- ``keys.usage`` and ``keys.key_type`` are immutable: they are bound into the AES-GCM associated
  data of every version's sealed material (with the key name and version number), so editing one
  in the file makes every use of the key fail instead of using it with changed metadata.
- ``key_versions.sealed_material`` is the only place version material lives, always sealed under
  the data KEK; destroy sets it to NULL (``secure_delete`` zeroes the freed bytes).
- ``audit`` is append-only; triggers refuse UPDATE and DELETE so a bug cannot rewrite history
  (an attacker with the file can drop them; the hash chain and signed checkpoints catch edits,
  and a cut tail is caught against the anchor kept outside the database).
- ``outbox.seq`` is AUTOINCREMENT: never reused, and a rolled-back insert leaves no gap, so it is
  the controller's monotonic event sequence.
- ``fleet_state`` has one row per (host, key, version), because a host holds every version that
  is still in grace, not only the primary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change."""

    version: int
    name: str
    sql: str
    """The SQLite DDL."""
    postgresql: str | None = None
    """The PostgreSQL DDL, where it differs from ``sql`` (None: ``sql`` is valid for both)."""

    def script(self, engine: str) -> str:
        """The DDL for ``engine`` (``sqlite`` or ``postgresql``)."""
        return self.sql if engine == "sqlite" or self.postgresql is None else self.postgresql


_STATES = ",".join(
    f"'{s}'"
    for s in (
        "PreActive",
        "Active",
        "Suspended",
        "Deactivated",
        "Compromised",
        "Destroyed",
        "DestroyedCompromised",
    )
)

_INITIAL = f"""
CREATE TABLE meta (
    name        TEXT PRIMARY KEY,
    value       BLOB NOT NULL
);

CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    key_type        TEXT NOT NULL,
    usage           TEXT NOT NULL,
    params          TEXT NOT NULL DEFAULT '{{}}',
    policy          TEXT NOT NULL,
    targets         TEXT NOT NULL,
    install         TEXT NOT NULL,
    primary_version INTEGER,
    created_at      TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);

CREATE TABLE key_versions (
    key_id             TEXT NOT NULL REFERENCES keys(id),
    version            INTEGER NOT NULL CHECK (version >= 1),
    state              TEXT NOT NULL CHECK (state IN ({_STATES})),
    digest             TEXT NOT NULL,
    sealed_material    BLOB,
    created_at         TEXT NOT NULL,
    created_by         TEXT NOT NULL,
    activation_at      TEXT,
    activated_at       TEXT,
    superseded_at      TEXT,
    deactivated_at     TEXT,
    compromised_at     TEXT,
    destroyed_at       TEXT,
    revocation_reason  TEXT,
    revocation_message TEXT,
    state_changed_at   TEXT NOT NULL,
    PRIMARY KEY (key_id, version)
) WITHOUT ROWID;

CREATE TABLE version_transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id      TEXT NOT NULL REFERENCES keys(id),
    version     INTEGER NOT NULL,
    from_state  TEXT CHECK (from_state IS NULL OR from_state IN ({_STATES})),
    to_state    TEXT NOT NULL CHECK (to_state IN ({_STATES})),
    operation   TEXT NOT NULL,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT
);
CREATE INDEX version_transitions_by_key ON version_transitions(key_id, version);

CREATE TABLE hosts (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    labels              TEXT NOT NULL DEFAULT '{{}}',
    identity_public_key BLOB NOT NULL,
    wrapping_public_key BLOB NOT NULL,
    enrolled_at         TEXT NOT NULL,
    revoked             INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    revoked_at          TEXT
);

CREATE TABLE enrollment_tokens (
    token_hash   TEXT PRIMARY KEY,
    host_name    TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '{{}}',
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    used_at      TEXT,
    used_by_host TEXT REFERENCES hosts(id)
);

CREATE TABLE operators (
    name           TEXT PRIMARY KEY,
    ssh_public_key TEXT NOT NULL UNIQUE,
    role           TEXT NOT NULL
                   CHECK (role IN ('admin', 'operator', 'custodian', 'auditor')),
    created_at     TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    disabled       INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
);

CREATE TABLE approvals (
    id         TEXT PRIMARY KEY,
    operation  TEXT NOT NULL,
    params     TEXT NOT NULL,
    requester  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    approvals  TEXT NOT NULL DEFAULT '[]',
    state      TEXT NOT NULL DEFAULT 'pending'
               CHECK (state IN ('pending', 'approved', 'executed', 'rejected', 'expired'))
);

CREATE TABLE fleet_state (
    host_id    TEXT NOT NULL REFERENCES hosts(id),
    key_id     TEXT NOT NULL REFERENCES keys(id),
    version    INTEGER NOT NULL,
    status     TEXT NOT NULL,
    digest     TEXT,
    event_id   TEXT,
    updated_at TEXT NOT NULL,
    latency_ms REAL,
    PRIMARY KEY (host_id, key_id, version)
) WITHOUT ROWID;
CREATE INDEX fleet_state_by_key ON fleet_state(key_id, version);

CREATE TABLE outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL UNIQUE,
    type          TEXT NOT NULL,
    partition_key TEXT NOT NULL,
    payload       BLOB NOT NULL,
    created_at    TEXT NOT NULL,
    sent_at       TEXT
);
CREATE INDEX outbox_unsent ON outbox(seq) WHERE sent_at IS NULL;

CREATE TABLE audit (
    idx       INTEGER PRIMARY KEY CHECK (idx >= 0),
    at        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    object    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;

CREATE TABLE audit_checkpoints (
    size          INTEGER PRIMARY KEY CHECK (size >= 0),
    head_hash     TEXT NOT NULL,
    at            TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    signature     BLOB NOT NULL
);
"""

_INITIAL_PG = f"""
CREATE TABLE meta (
    name        TEXT PRIMARY KEY,
    value       BYTEA NOT NULL
);

CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    key_type        TEXT NOT NULL,
    usage           TEXT NOT NULL,
    params          TEXT NOT NULL DEFAULT '{{}}',
    policy          TEXT NOT NULL,
    targets         TEXT NOT NULL,
    install         TEXT NOT NULL,
    primary_version BIGINT,
    created_at      TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);

CREATE TABLE key_versions (
    key_id             TEXT NOT NULL REFERENCES keys(id),
    version            BIGINT NOT NULL CHECK (version >= 1),
    state              TEXT NOT NULL CHECK (state IN ({_STATES})),
    digest             TEXT NOT NULL,
    sealed_material    BYTEA,
    created_at         TEXT NOT NULL,
    created_by         TEXT NOT NULL,
    activation_at      TEXT,
    activated_at       TEXT,
    superseded_at      TEXT,
    deactivated_at     TEXT,
    compromised_at     TEXT,
    destroyed_at       TEXT,
    revocation_reason  TEXT,
    revocation_message TEXT,
    state_changed_at   TEXT NOT NULL,
    PRIMARY KEY (key_id, version)
);

CREATE TABLE version_transitions (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    key_id      TEXT NOT NULL REFERENCES keys(id),
    version     BIGINT NOT NULL,
    from_state  TEXT CHECK (from_state IS NULL OR from_state IN ({_STATES})),
    to_state    TEXT NOT NULL CHECK (to_state IN ({_STATES})),
    operation   TEXT NOT NULL,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT
);
CREATE INDEX version_transitions_by_key ON version_transitions(key_id, version);

CREATE TABLE hosts (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    labels              TEXT NOT NULL DEFAULT '{{}}',
    identity_public_key BYTEA NOT NULL,
    wrapping_public_key BYTEA NOT NULL,
    enrolled_at         TEXT NOT NULL,
    revoked             INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    revoked_at          TEXT
);

CREATE TABLE enrollment_tokens (
    token_hash   TEXT PRIMARY KEY,
    host_name    TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '{{}}',
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    used_at      TEXT,
    used_by_host TEXT REFERENCES hosts(id)
);

CREATE TABLE operators (
    name           TEXT PRIMARY KEY,
    ssh_public_key TEXT NOT NULL UNIQUE,
    role           TEXT NOT NULL
                   CHECK (role IN ('admin', 'operator', 'custodian', 'auditor')),
    created_at     TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    disabled       INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
);

CREATE TABLE approvals (
    id         TEXT PRIMARY KEY,
    operation  TEXT NOT NULL,
    params     TEXT NOT NULL,
    requester  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    approvals  TEXT NOT NULL DEFAULT '[]',
    state      TEXT NOT NULL DEFAULT 'pending'
               CHECK (state IN ('pending', 'approved', 'executed', 'rejected', 'expired'))
);

CREATE TABLE fleet_state (
    host_id    TEXT NOT NULL REFERENCES hosts(id),
    key_id     TEXT NOT NULL REFERENCES keys(id),
    version    BIGINT NOT NULL,
    status     TEXT NOT NULL,
    digest     TEXT,
    event_id   TEXT,
    updated_at TEXT NOT NULL,
    latency_ms DOUBLE PRECISION,
    PRIMARY KEY (host_id, key_id, version)
);
CREATE INDEX fleet_state_by_key ON fleet_state(key_id, version);

CREATE TABLE outbox (
    seq           BIGINT PRIMARY KEY,
    event_id      TEXT NOT NULL UNIQUE,
    type          TEXT NOT NULL,
    partition_key TEXT NOT NULL,
    payload       BYTEA NOT NULL,
    created_at    TEXT NOT NULL,
    sent_at       TEXT
);
CREATE INDEX outbox_unsent ON outbox(seq) WHERE sent_at IS NULL;

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters(name, value) VALUES ('outbox', 0), ('changes', 0);

CREATE TABLE audit (
    idx       BIGINT PRIMARY KEY CHECK (idx >= 0),
    at        TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    object    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only';
END
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

CREATE TABLE audit_checkpoints (
    size          BIGINT PRIMARY KEY CHECK (size >= 0),
    head_hash     TEXT NOT NULL,
    at            TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    signature     BYTEA NOT NULL
);
"""  # noqa: S608
"""Migration 1 for PostgreSQL: BYTEA for BLOB, BIGINT for 64-bit integers, an identity column
for AUTOINCREMENT, and ``counters``: the outbox's sequence (``outbox``, kept in the writing
transaction, so like AUTOINCREMENT it is never reused and a rollback leaves no gap; a
PostgreSQL sequence would leave one) and the change counter other replicas poll (``changes``,
see ``ckms.store._pg``). TRUNCATE is refused on the audit log too."""

_FLEET = """
ALTER TABLE hosts ADD COLUMN wrap_suite TEXT NOT NULL DEFAULT 'x25519';
ALTER TABLE hosts ADD COLUMN signer_key_id TEXT;
ALTER TABLE hosts ADD COLUMN last_ack_seq INTEGER;
ALTER TABLE hosts ADD COLUMN last_seen_at TEXT;
ALTER TABLE hosts ADD COLUMN reported TEXT;
CREATE UNIQUE INDEX hosts_by_signer ON hosts(signer_key_id);

CREATE TABLE consumer_positions (
    topic      TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
"""
_FLEET_PG = """
ALTER TABLE hosts ADD COLUMN wrap_suite TEXT NOT NULL DEFAULT 'x25519';
ALTER TABLE hosts ADD COLUMN signer_key_id TEXT;
ALTER TABLE hosts ADD COLUMN last_ack_seq BIGINT;
ALTER TABLE hosts ADD COLUMN last_seen_at TEXT;
ALTER TABLE hosts ADD COLUMN reported TEXT;
CREATE UNIQUE INDEX hosts_by_signer ON hosts(signer_key_id);

CREATE TABLE consumer_positions (
    topic      TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""
"""Fleet view: how a host wraps keys, which key signs its acks and the last ack seq applied
(replays are refused), when it was last seen and what it last reported (digests only); and the
ack consumer's Kafka positions, stored in the same transaction as the acks they cover."""

_FLEET_ERRORS = """
ALTER TABLE fleet_state ADD COLUMN error TEXT;
"""
"""Why a host failed a key (the agent's reason: a path or hook its policy refuses, a failed
health check), shown by ``ckms fleet status``; never hook output."""

_AUDIT_CHAIN = """
ALTER TABLE audit_checkpoints ADD COLUMN v INTEGER NOT NULL DEFAULT 1 CHECK (v IN (1, 2));
ALTER TABLE audit_checkpoints ADD COLUMN prev_size INTEGER;
ALTER TABLE audit_checkpoints ADD COLUMN prev_head TEXT;
ALTER TABLE audit_checkpoints ADD COLUMN prev_sig_hash TEXT;
"""
_AUDIT_CHAIN_PG = """
ALTER TABLE audit_checkpoints ADD COLUMN v INTEGER NOT NULL DEFAULT 1 CHECK (v IN (1, 2));
ALTER TABLE audit_checkpoints ADD COLUMN prev_size BIGINT;
ALTER TABLE audit_checkpoints ADD COLUMN prev_head TEXT;
ALTER TABLE audit_checkpoints ADD COLUMN prev_sig_hash TEXT;
"""
"""Checkpoints chain: each (v2) names the one before it by size, head and signature hash, so a
deleted checkpoint row shows; existing rows stay v1 and the first v2 names the last of them."""

_NEXT_DUE = """
ALTER TABLE keys ADD COLUMN next_due_at TEXT;
CREATE INDEX keys_by_next_due ON keys(next_due_at);
"""
"""When a key next has something due (rotate, activate, deactivate), kept in every key change's
transaction, so the scheduler reads only the keys due instead of every key; NULL until computed
(keys stored before this migration are filled in by the scheduler)."""

_ROW_MACS = """
ALTER TABLE keys ADD COLUMN mac TEXT;
ALTER TABLE key_versions ADD COLUMN mac TEXT;
ALTER TABLE operators ADD COLUMN mac TEXT;
"""
"""Rows whose meaning matters carry a MAC under a key derived from the root KEK (see
``ckms.controller.rowmac``); existing rows get theirs at the first unseal after this."""

_HOST_MACS = """
ALTER TABLE hosts ADD COLUMN mac TEXT;
ALTER TABLE enrollment_tokens ADD COLUMN mac TEXT;
"""
"""Hosts and enrollment tokens carry a row MAC too (binding level 2, see
``ckms.controller.rowmac``); existing rows get theirs at the first unseal after this."""

_APPROVAL_MACS = """
ALTER TABLE approvals ADD COLUMN mac TEXT;
"""
"""Dual-control requests carry a row MAC (binding level 3, see ``ckms.controller.rowmac``);
existing rows get theirs at the first unseal after this."""

_VERSION_ORIGIN = """
ALTER TABLE key_versions ADD COLUMN origin TEXT CHECK (origin IS NULL OR origin = 'imported');
"""
"""Where a version's material came from: NULL when ckms generated it, ``imported`` when an
operator brought it (``key.import``). Covered by the version's row MAC once set."""
_CERTIFICATES = """
CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,
    kind          TEXT NOT NULL DEFAULT 'tls-cert' CHECK (kind IN ('tls-cert', 'kafka-client')),
    host_id       TEXT NOT NULL,
    key_id        TEXT REFERENCES keys(id),
    version       INTEGER NOT NULL,
    ca_generation INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL,
    not_before    TEXT NOT NULL,
    not_after     TEXT NOT NULL,
    issued_at     TEXT NOT NULL,
    revoked_at    TEXT,
    installed_at  TEXT,
    mac           TEXT
);
CREATE INDEX certificates_by_version ON certificates(key_id, version);
CREATE INDEX certificates_by_host ON certificates(host_id);
"""
"""Host certificates the internal CA issued: ``tls-cert`` keys' (which host, key version) and
each agent's Kafka client certificate (``kafka-client``: no key, version 0), their CA
generation, validity, and revocation, bound by a row MAC (a cleared ``revoked_at`` would drop a
serial from the CRL). ``installed_at`` is the fleet view's (the host's ack), not bound. Never a
private key: hosts make theirs and send only CSRs."""

_ROLLOUTS = """
CREATE TABLE rollouts (
    key_id           TEXT PRIMARY KEY REFERENCES keys(id),
    version          INTEGER NOT NULL CHECK (version >= 1),
    stages           TEXT NOT NULL,
    gate             TEXT NOT NULL,
    spread           TEXT,
    stage            INTEGER NOT NULL CHECK (stage >= 1),
    state            TEXT NOT NULL,
    released         TEXT,
    threshold_pct    INTEGER NOT NULL CHECK (threshold_pct BETWEEN 1 AND 100),
    started_at       TEXT NOT NULL,
    started_by       TEXT NOT NULL,
    stage_started_at TEXT NOT NULL,
    deadline_at      TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    reason           TEXT,
    mac              TEXT
);
"""
"""A key's current or last rollout of a PreActive version (``ckms.controller.rollouts``): the
stages, the gate, the stage out now and the hosts it released (JSON, NULL: every targeted host),
its state and deadline; bound by a row MAC (``ckms.controller.rowmac``)."""

_CERT_KEYS = """
ALTER TABLE certificates ADD COLUMN public_key_sha256 TEXT;
ALTER TABLE certificates ADD COLUMN revocation_reason TEXT;
CREATE INDEX certificates_by_public_key ON certificates(public_key_sha256);
"""
"""Each certificate's certified public key (SHA-256 of its SubjectPublicKeyInfo), so a key pair
once revoked for keyCompromise is never certified again, and why it was revoked (the RFC 5280
reason on the CRL). Both bound by the row MAC whenever set (NULL in rows issued before)."""

_LEADER_LEASE = """
CREATE TABLE leader_lease (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    holder_name TEXT NOT NULL,
    epoch       INTEGER NOT NULL CHECK (epoch >= 1),
    acquired_at TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);

CREATE TABLE replicas (
    name         TEXT PRIMARY KEY,
    incarnation  TEXT NOT NULL,
    address      TEXT NOT NULL,
    version      TEXT NOT NULL,
    sealed       INTEGER NOT NULL CHECK (sealed IN (0, 1)),
    started_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL
);
"""
"""Replicas of one controller on one store (``ckms.store.lease``): the one leader lease (its
holder, the process incarnation that holds it, and ``epoch``, the fencing token, which only
ever grows) and each replica's heartbeat for ``ckms status``. No row MAC: the lease orders
honest replicas, it does not hold a secret or a permission; whoever can write rows can
already do worse than take the lease (and a sealed replica cannot lead anyway)."""

_LEADER_LEASE_PG = _LEADER_LEASE.replace(
    "epoch       INTEGER NOT NULL", "epoch       BIGINT NOT NULL"
)
"""Migration 13 for PostgreSQL: the epoch is a 64-bit fencing token (INTEGER is 32-bit there)."""

_FLEET_MACS = """
ALTER TABLE fleet_state ADD COLUMN mac TEXT;
ALTER TABLE hosts ADD COLUMN seen_mac TEXT;
ALTER TABLE rollouts ADD COLUMN max_failures TEXT;
"""
"""What a rollout's gate trusts, bound to the root KEK: each ``fleet_state`` row's status,
digest, time and error (``mac``), and each host's ``last_seen_at`` (``seen_mac``, apart from
the host row's MAC because it changes on every heartbeat). NULL in rows from before: an
``installed`` row without a MAC counts for no gate, a host without one is never stale. And a
rollout's failure budget (``max_failures``: a count or a percent of the stage's hosts; NULL is
0, one failure halts), under the rollout row's MAC whenever set."""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _INITIAL, _INITIAL_PG),
    Migration(2, "fleet view and consumer positions", _FLEET, _FLEET_PG),
    Migration(3, "fleet: a host's reason for a failed key", _FLEET_ERRORS),
    Migration(4, "chained audit checkpoints", _AUDIT_CHAIN, _AUDIT_CHAIN_PG),
    Migration(5, "keys: indexed next due time", _NEXT_DUE),
    Migration(6, "row MACs bound to the root KEK", _ROW_MACS),
    Migration(7, "row MACs on hosts and enrollment tokens", _HOST_MACS),
    Migration(8, "row MACs on approval requests", _APPROVAL_MACS),
    Migration(9, "key versions: origin of the material", _VERSION_ORIGIN),
    Migration(10, "certificates issued by the internal CA", _CERTIFICATES),
    Migration(11, "rollouts of PreActive versions", _ROLLOUTS),
    Migration(12, "certificates: certified public key and revocation reason", _CERT_KEYS),
    Migration(13, "leader lease and replica heartbeats", _LEADER_LEASE, _LEADER_LEASE_PG),
    Migration(14, "fleet view MACs; rollout failure budgets", _FLEET_MACS),
)
"""Every migration, in order; numbers start at 1 and have no gaps. Each gives PostgreSQL DDL
of its own where SQLite's is not valid there (BLOB, AUTOINCREMENT, WITHOUT ROWID, triggers) or
means less (INTEGER is 32-bit in PostgreSQL: BIGINT for counters, offsets and sizes)."""
