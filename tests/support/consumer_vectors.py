"""Writes docs/vectors/consumer.json: raw Kafka records and the verdict a consumer must reach.

``python -m tests.support.consumer_vectors`` (part of ``make wire``) regenerates the file from
the cases below; ``--check`` reports a stale file. Every byte is reproducible: the keys are
derived from fixed labels, ids and times are fixed, and Ed25519 is deterministic. The expected
verdicts are written here by hand, so the tests that replay these records through the Python
Subscriber and the Go consumer check both against the spec, not against each other.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckms.crypto import sign, signer_key_id, signing_public_key
from ckms.protocol import (
    KEY_ID_HEADER,
    MAX_MESSAGE_BYTES,
    SIGNATURE_HEADER,
    canonical_json,
    subject_of,
)
from ckms.protocol._events import EVENT_DATA_MODELS, EventType
from ckms.protocol.canonical import MAX_DEPTH

PATH = Path(__file__).resolve().parents[2] / "docs" / "vectors" / "consumer.json"
PARTITIONS = 2
AT = "2026-11-28T12:00:00.000000Z"
DIGEST = "hmac-sha256:" + "5e" * 32


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"ckms consumer vectors: {label}".encode()).digest()


CONTROLLER = _seed("controller")
INTRUDER = _seed("intruder")
KID = signer_key_id(signing_public_key(CONTROLLER)).encode()
INTRUDER_KID = signer_key_id(signing_public_key(INTRUDER)).encode()

INSTALL = {
    "path": "/etc/ckms/{team}/{purpose}.key",
    "format": "raw",
    "owner": "postgres",
    "group": None,
    "mode": 0o640,
    "dir_mode": 0o750,
    "reload": "reload-postgresql",  # a hook name: the host's own config says what it runs
    "health": {"argv": ["pg_isready"], "timeout_s": 30.0},  # the legacy form: a command
}
POLICY = {
    "cryptoperiod": 90 * 86400,
    "grace": 7 * 86400,
    "activation_delay": 0,
    "max_staleness": 86400,
    "approvals_required": ["destroy", "policy", "role"],
}
TARGETS = {"selectors": [{"env": "prod", "role": "db"}], "hosts": ["db-7"], "env": "prod"}

DATA: dict[str, dict[str, Any]] = {
    "key.created": {
        "key": "payments/db",
        "key_id": "k-0001",
        "type": "aes-256",
        "usage": ["encrypt", "decrypt"],
        "version": 1,
        "state": "Active",
        "digest": DIGEST,
        "activation_at": None,
        "primary": 1,
        "policy": POLICY,
        "targets": TARGETS,
        "install": INSTALL,
    },
    "key.rotated": {
        "key": "payments/db",
        "key_id": "k-0001",
        "type": "aes-256",
        "version": 2,
        "state": "Active",
        "digest": DIGEST,
        "activation_at": None,
        "primary": 2,
        "previous_primary": 1,
        "targets": TARGETS,
        "install": INSTALL,
    },
    "key.state_changed": {
        "key": "payments/db",
        "key_id": "k-0001",
        "version": 1,
        "from": "Active",
        "to": "Deactivated",
        "primary": 2,
        "reason": "superseded",
    },
    "key.revoked": {
        "key": "payments/db",
        "key_id": "k-0001",
        "version": 1,
        "from": "Deactivated",
        "to": "Compromised",
        "reason": "keyCompromise",
        "compromise": True,
        "primary": 2,
    },
    "key.destroyed": {
        "key": "payments/db",
        "key_id": "k-0001",
        "version": 1,
        "from": "Compromised",
        "to": "DestroyedCompromised",
        "digest": DIGEST,
        "primary": 2,
    },
    "key.targets_changed": {
        "key": "payments/db",
        "key_id": "k-0001",
        "targets": TARGETS,
        "install": INSTALL,
    },
    "key.policy_changed": {
        "key": "payments/db",
        "key_id": "k-0001",
        "policy": {**POLICY, "cryptoperiod": 30 * 86400},
    },
    "key.rollout": {
        "key": "payments/db",
        "key_id": "k-0001",
        "version": 3,
        "state": "running",
        "stage": 2,
        "stages": [5, 25, 100],
        "gate": "healthy",
        "released": 12,
        "targets": TARGETS,
        "reason": "stage 1 of 3 gate healthy held: 3 of 3 hosts",
    },
    "host.revoked": {"host": "db-7", "signer_key_id": "ed25519:3q2-7wAAAAAAAAAAAAAAAA"},
    "ca.rotated": {
        "generation": 2,
        "trusted": ["sha256:" + "2" * 64, "sha256:" + "1" * 64],
        "issuing": "sha256:" + "3" * 64,
    },
    "fleet.acked": {
        "key": "payments/db",
        "key_id": "k-0001",
        "acks": [
            {
                "host": "db-7",
                "version": 3,
                "status": "installed",
                "digest": DIGEST,
                "at": AT,
                "elapsed_ms": 41,
                "ack_seq": 12,
                "event_id": "00000000-0000-4000-8000-000000000030",
            },
            {
                "host": "db-8",
                "version": 3,
                "status": "failed",
                "at": AT,
                "elapsed_ms": 5003,
                "ack_seq": 9,
                "error": "health check 'pg' exited 1",
            },
        ],
    },
}


@dataclass
class Case:
    """One Kafka record and what a consumer must do with it."""

    name: str
    description: str
    value: bytes | None
    headers: list[tuple[str, bytes]]
    verdict: str  # "accept" or "reject"
    reason: str | None = None
    partition: int = 0
    key: bytes = b"payments/db"
    expect: dict[str, Any] = field(default_factory=dict)


def envelope(etype: str, seq: int, data: Any = None, **over: Any) -> dict[str, Any]:
    """An envelope of ``etype`` (data from :data:`DATA` unless given), not validated, so the
    cases can break any rule."""
    env = {
        "v": 1,
        "id": f"00000000-0000-4000-8000-{seq % 10**12:012d}",
        "seq": seq,
        "type": etype,
        "at": AT,
        "data": DATA[etype] if data is None else data,
    }
    env.update(over)
    return env


def signed(value: bytes, by: bytes = CONTROLLER, kid: bytes | None = None) -> list:
    """Headers a key holder would attach: the signature over ``value`` and the signer's id."""
    return [(SIGNATURE_HEADER, sign(by, value)), (KEY_ID_HEADER, kid or _kid(by))]


def _kid(seed: bytes) -> bytes:
    return signer_key_id(signing_public_key(seed)).encode()


def raw_envelope(env: dict[str, Any]) -> bytes:
    """Canonical bytes of an envelope that may break the rules (no model validation)."""
    return canonical_json(env)


def accept(name: str, description: str, env: dict[str, Any], partition: int = 0) -> Case:
    value = raw_envelope(env)
    model = EVENT_DATA_MODELS[EventType(env["type"])]
    key = subject_of(model.model_validate(env["data"])).encode()
    return Case(
        name,
        description,
        value,
        signed(value),
        "accept",
        partition=partition,
        key=key,
        expect={"type": env["type"], "seq": env["seq"], "id": env["id"]},
    )


def reject(
    name: str, description: str, value: bytes | None, reason: str, headers: list | None = None
) -> Case:
    if headers is None:
        headers = signed(value) if value is not None else []
    return Case(name, description, value, headers, "reject", reason)


def with_data(etype: str, seq: int, **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(DATA[etype])
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for part in parents:
            node = node[part]
        if value is _DROP:
            del node[last]
        else:
            node[last] = value
    return envelope(etype, seq, data)


_DROP = object()


def _padded_to(size: int, seq: int) -> dict[str, Any]:
    """A valid key.revoked envelope whose canonical bytes are exactly ``size`` long."""
    env = envelope("key.revoked", seq)
    base = len(raw_envelope(env))
    env["data"] = {**env["data"], "key_id": env["data"]["key_id"] + "x" * (size - base)}
    assert len(raw_envelope(env)) == size
    return env


def cases() -> list[Case]:
    """Every record, in the order it is produced (verdicts depend on what came before)."""
    out: list[Case] = []
    seq = 0

    def next_seq() -> int:
        nonlocal seq
        seq += 1
        return seq

    for etype in DATA:
        out.append(
            accept(f"valid_{etype}", f"a valid {etype} event", envelope(etype, next_seq() * 10))
        )
    last = seq * 10  # the last accepted seq on partition 0
    revoked = out[3]
    out.append(
        accept(
            "other_partition_own_sequence",
            "seq is compared per partition: a lower seq on another partition is new there",
            envelope("key.revoked", 5),
            partition=1,
        )
    )
    out.append(
        accept(
            "exactly_max_bytes",
            f"a value of exactly {MAX_MESSAGE_BYTES} bytes is within the bound",
            _padded_to(MAX_MESSAGE_BYTES, last + 1),
        )
    )
    last += 1
    # No event field holds arbitrary JSON, so a value nested exactly MAX_DEPTH deep passes the
    # depth bound and is then refused for its data; one level deeper is refused unparsed.
    out.append(
        reject(
            "max_depth",
            f"arrays and objects nested exactly {MAX_DEPTH} deep: within the bound, invalid data",
            raw_envelope(with_data("key.policy_changed", last + 1, policy=_nest(MAX_DEPTH - 3))),
            "invalid-data",
        )
    )
    good = raw_envelope(envelope("key.revoked", last + 1))
    sig = sign(CONTROLLER, good)

    # -- size and headers, checked before the signature -------------------------------------
    out += [
        reject("null_value", "a record without a value (tombstone)", None, "malformed"),
        reject(
            "oversized",
            f"{MAX_MESSAGE_BYTES + 1} bytes, validly signed: refused before verification",
            raw_envelope(_padded_to(MAX_MESSAGE_BYTES + 1, last + 1)),
            "oversized",
        ),
        reject(
            "oversized_unsigned",
            "the size bound comes before the headers",
            b"{" * (MAX_MESSAGE_BYTES + 1),
            "oversized",
            headers=[],
        ),
        reject("no_headers", "no ckms-sig and no ckms-kid", good, "unsigned", headers=[]),
        reject("no_signature", "ckms-kid only", good, "unsigned", headers=[(KEY_ID_HEADER, KID)]),
        reject(
            "no_key_id",
            "ckms-sig only",
            good,
            "unsigned",
            headers=[(SIGNATURE_HEADER, sig)],
        ),
        reject(
            "repeated_signature",
            "two ckms-sig headers (even equal ones)",
            good,
            "unsigned",
            headers=[(SIGNATURE_HEADER, sig), (SIGNATURE_HEADER, sig), (KEY_ID_HEADER, KID)],
        ),
        reject(
            "repeated_key_id",
            "two ckms-kid headers",
            good,
            "unsigned",
            headers=[(SIGNATURE_HEADER, sig), (KEY_ID_HEADER, KID), (KEY_ID_HEADER, KID)],
        ),
        reject(
            "header_name_case",
            "header names are case-sensitive: CKMS-SIG is not ckms-sig",
            good,
            "unsigned",
            headers=[("CKMS-SIG", sig), (KEY_ID_HEADER, KID)],
        ),
        reject(
            "unknown_signer",
            "signed by a key the reader does not trust, naming it",
            good,
            "unknown-signer",
            headers=signed(good, by=INTRUDER),
        ),
        reject(
            "unknown_key_id",
            "a key id nobody has",
            good,
            "unknown-signer",
            headers=[(SIGNATURE_HEADER, sig), (KEY_ID_HEADER, b"ed25519:AAAAAAAAAAAAAAAAAAAAAA")],
        ),
        reject(
            "forged_trusted_kid",
            "signed by another key but naming the trusted key id",
            good,
            "bad-signature",
            headers=signed(good, by=INTRUDER, kid=KID),
        ),
        reject(
            "tampered_byte",
            "one byte of the value changed after signing",
            good.replace(b"keyCompromise", b"keyCompromisf"),
            "bad-signature",
            headers=signed(good),
        ),
        reject(
            "short_signature",
            "a 63-byte signature",
            good,
            "bad-signature",
            headers=[(SIGNATURE_HEADER, sig[:63]), (KEY_ID_HEADER, KID)],
        ),
        reject(
            "empty_signature",
            "an empty ckms-sig header",
            good,
            "bad-signature",
            headers=[(SIGNATURE_HEADER, b""), (KEY_ID_HEADER, KID)],
        ),
    ]

    # -- canonical JSON: signed by the trusted key, still refused ---------------------------
    text = good.decode()
    noncanonical = {
        "not_json": (b"definitely not json", "not JSON at all"),
        "empty_value": (b"", "an empty value"),
        "top_level_array": (b"[1,2]", "not an object"),
        "whitespace": (text.replace(",", ", ", 1).encode(), "a space after a comma"),
        "unsorted_keys": (
            text.replace(',"v":1}', "}").replace("{", '{"v":1,', 1).encode(),
            "v first instead of last",
        ),
        "duplicate_key": (text.replace(',"v":1}', ',"v":1,"v":1}').encode(), "a key twice"),
        "escaped_solidus": (text.replace("payments/db", "payments\\/db").encode(), "\\/"),
        "escaped_ascii": (text.replace("payments", "p\\u0061yments").encode(), "\\u0061"),
        "uppercase_escape": (
            raw_envelope(with_data("key.revoked", last + 1, key_id="k\n")).replace(
                b"\\n", b"\\u000A"
            ),
            "\\u000A for a newline (canonical is \\n)",
        ),
        "float_exponent": (text.replace('"seq":', '"seq":1e1,"x":', 1).encode(), "1e1"),
        "trailing_newline": (good + b"\n", "a newline after the object"),
        "bom": (b"\xef\xbb\xbf" + good, "a byte order mark"),
        "invalid_utf8": (good.replace(b"k-0001", b"k-\xff001"), "a byte that is not UTF-8"),
        "lone_surrogate": (good.replace(b"k-0001", b"k-\\ud800"), "an escaped lone surrogate"),
        "nan": (good.replace(b'"primary":2', b'"primary":NaN'), "NaN"),
        "leading_zero": (good.replace(b'"primary":2', b'"primary":02'), "02"),
        "negative_zero": (good.replace(b'"primary":2', b'"primary":-0'), "-0 (canonical is 0)"),
        "float_trailing_zero": (
            good.replace(b'"primary":2', b'"primary":2.50'),
            "2.50 (canonical is 2.5)",
        ),
        "too_deep": (
            raw_envelope(with_data("key.policy_changed", last + 1, policy=_nest(MAX_DEPTH - 2))),
            f"arrays and objects nested {MAX_DEPTH + 1} deep",
        ),
    }
    for name, (value, what) in noncanonical.items():
        out.append(
            reject(f"noncanonical_{name}", f"signed but not canonical: {what}", value, "malformed")
        )

    # -- the envelope ----------------------------------------------------------------------
    def env_case(name: str, what: str, reason: str, **over: Any) -> Case:
        env = envelope("key.revoked", last + 1)
        for k, v in over.items():
            if v is _DROP:
                del env[k]
            else:
                env[k] = v
        return reject(name, what, raw_envelope(env), reason)

    out += [
        env_case("version_2", "v is 2", "unsupported-version", v=2),
        env_case("version_string", 'v is "1"', "unsupported-version", v="1"),
        env_case("version_true", "v is true", "unsupported-version", v=True),
        env_case("version_float", "v is 1.0", "unsupported-version", v=1.0),
        env_case("version_missing", "no v", "unsupported-version", v=_DROP),
        env_case("type_unknown", "type key.exploded", "unknown-type", type="key.exploded"),
        env_case("type_missing", "no type", "unknown-type", type=_DROP),
        env_case("type_number", "type 5", "unknown-type", type=5),
        env_case("id_missing", "no id", "malformed", id=_DROP),
        env_case("id_number", "id 5", "malformed", id=5),
        env_case("extra_field", "a field the envelope does not have", "malformed", extra=1),
        env_case("seq_missing", "no seq", "malformed", seq=_DROP),
        env_case("seq_negative", "seq -1", "malformed", seq=-1),
        env_case("seq_string", 'seq "9"', "malformed", seq="9"),
        env_case("seq_float", "seq 9.0", "malformed", seq=9.0),
        env_case("seq_true", "seq true", "malformed", seq=True),
        env_case("seq_too_big", "seq 2**63", "malformed", seq=1 << 63),
        env_case("at_missing", "no at", "malformed", at=_DROP),
        env_case("at_words", "at yesterday", "malformed", at="yesterday"),
        env_case("at_short_form", "at 2026-1-2T3:04:05.1Z", "malformed", at="2026-1-2T3:04:05.1Z"),
        env_case(
            "at_no_fraction", "at without microseconds", "malformed", at="2026-11-28T12:00:00Z"
        ),
        env_case("at_offset", "at with +00:00", "malformed", at="2026-11-28T12:00:00.000000+00:00"),
        env_case(
            "at_impossible_date", "at February 30", "malformed", at="2026-02-30T12:00:00.000000Z"
        ),
        env_case("data_missing", "no data", "malformed", data=_DROP),
        env_case("data_array", "data is an array", "invalid-data", data=[]),
    ]

    # -- data, checked against the type's schema -------------------------------------------
    n = last + 1
    data_cases = {
        "extra_field": (
            with_data("key.revoked", n, material="c2VjcmV0"),
            "a field the model lacks",
        ),
        "missing_field": (with_data("key.revoked", n, compromise=_DROP), "no compromise"),
        "version_zero": (with_data("key.revoked", n, version=0), "version 0"),
        "version_string": (with_data("key.revoked", n, version="1"), 'version "1"'),
        "version_float": (with_data("key.revoked", n, version=1.0), "version 1.0"),
        "bool_as_int": (with_data("key.revoked", n, compromise=1), "compromise 1"),
        "bad_reason": (with_data("key.revoked", n, reason="bored"), "an unknown reason"),
        "bad_state": (with_data("key.revoked", n, to="Gone"), "an unknown state"),
        "bad_key_name": (with_data("key.revoked", n, key="Payments/DB"), "upper-case key name"),
        "key_name_newline": (with_data("key.revoked", n, key="payments/db\n"), "newline"),
        "bad_digest": (with_data("key.destroyed", n, digest="sha256:" + "5E" * 32), "upper hex"),
        "bad_host": (with_data("host.revoked", n, host="db 7"), "a space in a host id"),
        "hook_shorthand": (
            with_data("key.rotated", n, install__reload="systemctl reload postgresql"),
            "a command line where a hook name belongs (the CLI's shorthand is not a wire form)",
        ),
        "hook_argv_list": (
            with_data("key.rotated", n, install__health=["pg_isready"]),
            "a bare argv list (a config shorthand) instead of a command object",
        ),
        "hook_empty_argv": (with_data("key.rotated", n, install__health__argv=[]), "argv []"),
        "world_readable_mode": (with_data("key.rotated", n, install__mode=0o644), "mode 0644"),
        "unreadable_mode": (with_data("key.rotated", n, install__mode=0o200), "mode 0200"),
        "world_writable_dir": (with_data("key.rotated", n, install__dir_mode=0o777), "0777"),
        "relative_path": (with_data("key.rotated", n, install__path="etc/k"), "relative"),
        "dotdot_path": (with_data("key.rotated", n, install__path="/etc/../k"), "a .. segment"),
        "unknown_placeholder": (
            with_data("key.rotated", n, install__path="/etc/{owner}.key"),
            "a placeholder that does not exist",
        ),
        "keyring_per_version": (
            with_data(
                "key.rotated", n, install__format="keyring-json", install__path="/k/{version}"
            ),
            "keyring-json holds every version: no {version} in its path",
        ),
        "bad_owner": (with_data("key.rotated", n, install__owner="Root"), "owner Root"),
        "empty_selector": (with_data("key.rotated", n, targets__selectors=[{}]), "{} selector"),
        "bad_label": (
            with_data("key.rotated", n, targets__selectors=[{"Env": "prod"}]),
            "an upper-case label name",
        ),
        "host_newline": (with_data("key.rotated", n, targets__hosts=["db-7\n"]), "newline"),
    }
    for name, (env, what) in data_cases.items():
        out.append(
            reject(f"data_{name}", f"data is invalid: {what}", raw_envelope(env), "invalid-data")
        )

    # -- replays: verified records whose seq is not newer than the last accepted one -------
    out += [
        Case(
            "replay_identical",
            "an accepted record sent again, byte for byte",
            revoked.value,
            revoked.headers,
            "reject",
            "replayed",
        ),
        reject(
            "replay_equal_seq",
            "a new event with the same seq as the last accepted one",
            raw_envelope(envelope("host.revoked", last)),
            "replayed",
        ),
        reject(
            "replay_lower_seq",
            "a new event with a lower seq",
            raw_envelope(envelope("host.revoked", 1)),
            "replayed",
        ),
    ]
    out.append(
        accept(
            "after_refusals",
            "refusals do not move the sequence: the next seq is still accepted, gaps are fine",
            envelope("key.revoked", last + 100),
        )
    )
    return out


def _nest(lists: int) -> Any:
    """A policy object holding ``lists`` arrays nested in each other (an event nests the policy
    object two deep, so the whole value is ``lists + 3`` deep)."""
    value: Any = []
    for _ in range(lists - 1):
        value = [value]
    return {"deep": value}


def document() -> dict[str, Any]:
    """The whole vector file."""
    public = signing_public_key(CONTROLLER)
    return {
        "description": (
            "Raw Kafka records of ckms.events and the verdict a consumer must reach (see "
            "docs/events.md). Produce 'cases' in order to a topic with 'partitions' partitions, "
            "each to its 'partition'; a consumer that trusts only 'trusted' must accept exactly "
            "the records whose verdict is 'accept' and refuse the others with 'reason'. "
            "value_hex null means a record without a value; headers are [name, value_hex] in "
            "order. Verdicts depend on order (the replay rule), so apply them in sequence."
        ),
        "partitions": PARTITIONS,
        "trusted": [{"public_hex": public.hex(), "kid": signer_key_id(public)}],
        "cases": [
            {
                "name": c.name,
                "description": c.description,
                "partition": c.partition,
                "key": c.key.decode(),
                "value_hex": None if c.value is None else c.value.hex(),
                "headers": [[name, value.hex()] for name, value in c.headers],
                "verdict": c.verdict,
                "reason": c.reason,
                **({"expect": c.expect} if c.expect else {}),
            }
            for c in cases()
        ],
    }


def render() -> str:
    """The file's exact text."""
    return json.dumps(document(), indent=1, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the vectors, or with ``--check`` exit 1 when the file is stale."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.consumer_vectors")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = render()
    current = PATH.read_text(encoding="utf-8") if PATH.exists() else None
    if current == text:
        return 0
    if args.check:
        print(f"{PATH} is stale (run `make wire`)")
        return 1
    PATH.write_text(text, encoding="utf-8")
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
