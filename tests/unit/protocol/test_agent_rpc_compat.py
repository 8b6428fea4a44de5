"""Replies to agents from before the internal CA carry none of its fields: their models forbid
unknown fields, so a controller upgraded first must not break their sync or enrollment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ckms.protocol import EnrollReply, SyncReply, SyncRequest


class _OldSyncReply(BaseModel):
    """The sync reply as an agent from before the CA validates it (unknown fields refused)."""

    model_config = ConfigDict(extra="forbid")
    host: str
    keys: tuple[object, ...]
    remove: tuple[object, ...] = ()
    controller_time: str
    reconcile_interval_s: int = 300
    material: tuple[object, ...] = ()


def test_a_sync_reply_without_the_bundle_reads_as_it_did_before() -> None:
    reply = SyncReply(host="db-1", keys=(), controller_time="2026-01-01T00:00:00.000000Z")
    _OldSyncReply.model_validate(reply.model_dump(mode="json"))
    with_bundle = reply.model_copy(update={"ca_bundle": "-----BEGIN CERTIFICATE-----\n"})
    assert "ca_bundle" in with_bundle.model_dump(mode="json")


def test_requests_and_enroll_replies_leave_unset_fields_out() -> None:
    assert "want_ca_bundle" not in SyncRequest().model_dump(mode="json")
    assert SyncRequest(want_ca_bundle=True).model_dump(mode="json")["want_ca_bundle"] is True
    reply = EnrollReply(
        host="db-1",
        labels={},
        controller_signing_key="AA==",
        controller_key_id="ed25519:x",
        kafka_bootstrap="k:9092",
        events_topic="e",
        digest_key="AA==",
    )
    dumped = reply.model_dump(mode="json")
    assert "ca_bundle" not in dumped and "kafka_certificate" not in dumped
