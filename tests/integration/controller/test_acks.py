"""Hosts' signed acks over their own SSH connection: who may say what, replays, bad batches,
group commits, and the controller-signed ``fleet.acked`` events (real SSH, real Kafka)."""

from __future__ import annotations

import asyncio
import base64

import pytest

from ckms.consumer import Subscriber
from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole, generate_signing_key
from ckms.errors import ProtocolError
from ckms.protocol import (
    MAX_ACK_BATCH,
    Ack,
    AckRequest,
    AckStatus,
    EventType,
    FleetAcked,
    SignedAck,
    Targets,
)
from ckms.store import audit as audit_log
from ckms.store import outbox
from tests.support.acks import host_client, send_ack, send_acks, signed_ack
from tests.support.cli import enroll_host
from tests.support.kafka import link_as

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}


def _ack(agent: str, digest: str, status: AckStatus = AckStatus.INSTALLED) -> Ack:
    return Ack(agent=agent, key="web/tls", version=1, status=status, digest=digest, elapsed_ms=5)


async def _fleet(c: Controller) -> dict[str, dict[int, str]]:
    assert c.store is not None
    statuses = await key_fleet_status(c.store, c.lifecycle, c.hosts, "web/tls")
    return {s.host: dict(s.versions) for s in statuses}


async def _ack_records(c: Controller) -> list[audit_log.AuditRecord]:
    assert c.store is not None
    return [r for r in await audit_log.load_records(c.store) if r.action == "fleet.ack"]


@pytest.mark.requirement("ISO27002-8.20")
async def test_a_host_cannot_ack_for_another_host(controller: Controller) -> None:
    """web-2, logged in as itself, hands in acks about web-1: signed by web-1 (stolen from the
    wire or a log), signed by web-2 but naming web-1, or signed by a key nobody enrolled. Each
    is refused; only web-1's own ack, on web-1's own connection, changes the fleet view."""
    c = controller
    key = await c.lifecycle.create(
        "web/tls", "ed25519", targets=Targets(selectors=(WEB,)), actor="alice"
    )
    digest = key.version(1).digest
    assert digest is not None
    web1 = await enroll_host(c, "web-1", WEB)
    web2 = await enroll_host(c, "web-2", WEB)

    stolen = await send_ack(c, web1, _ack("web-1", digest), 1, host="web-2", login_key=web2)
    claimed = await send_ack(c, web2, _ack("web-1", digest), 1, host="web-2")
    unknown = await send_ack(
        c, generate_signing_key(), _ack("web-1", digest), 1, host="web-1", login_key=web1
    )
    for reply in (stolen, claimed, unknown):
        assert reply.applied == () and reply.duplicates == ()
        assert [r.reason for r in reply.refused] == ["unknown-signer"]
    assert await _fleet(c) == {"web-1": {}, "web-2": {}}
    assert await _ack_records(c) == []

    own = await send_ack(c, web1, _ack("web-1", digest), 1)
    assert own.applied == (1,) and own.refused == ()
    assert await _fleet(c) == {"web-1": {1: "installed"}, "web-2": {}}
    assert c.acks.stats.dropped == {"unknown-signer": 3}


async def test_a_replayed_or_resent_ack_is_confirmed_and_changes_nothing(
    controller: Controller,
) -> None:
    """A reply lost on the way makes the agent send a batch again; an attacker may replay an
    old ack. Either way (agent, seq) was applied already: confirmed, not applied twice."""
    c = controller
    key = await c.lifecycle.create(
        "web/tls", "ed25519", targets=Targets(selectors=(WEB,)), actor="alice"
    )
    digest = key.version(1).digest
    assert digest is not None
    web1 = await enroll_host(c, "web-1", WEB)
    first = [signed_ack(web1, _ack("web-1", digest), 1)]
    assert (await send_acks(c, "web-1", web1, first)).applied == (1,)
    again = await send_acks(c, "web-1", web1, first)
    assert again.applied == () and again.duplicates == (1,) and again.refused == ()
    # An old seq carrying a different status (a replay dressed up): still only a duplicate.
    failed = [signed_ack(web1, _ack("web-1", digest, AckStatus.FAILED), 1)]
    assert (await send_acks(c, "web-1", web1, failed)).duplicates == (1,)
    # The same seq twice in one batch, then a newer one: the newer one applies.
    newer = signed_ack(web1, _ack("web-1", digest, AckStatus.REMOVED), 2)
    mixed = await send_acks(c, "web-1", web1, [newer, newer, first[0]])
    assert mixed.applied == (2,) and sorted(mixed.duplicates) == [1, 2]
    assert await _fleet(c) == {"web-1": {1: "removed"}}
    assert [r.details["ack_seq"] for r in await _ack_records(c)] == [1, 2]


async def test_malformed_and_oversized_batches_are_refused_whole(controller: Controller) -> None:
    """A batch past the count or size bound, or with a field that is not base64, gets a clear
    error and applies nothing; the acks in it are still the agent's to send again."""
    c = controller
    key = await c.lifecycle.create(
        "web/tls", "ed25519", targets=Targets(selectors=(WEB,)), actor="alice"
    )
    digest = key.version(1).digest
    assert digest is not None
    web1 = await enroll_host(c, "web-1", WEB)
    good = signed_ack(web1, _ack("web-1", digest), 1)
    async with host_client(c, "web-1", web1) as rpc:
        with pytest.raises(ProtocolError, match="acks"):
            await rpc.call("ack", {"acks": [good.model_dump()] * (MAX_ACK_BATCH + 1)})
        with pytest.raises(ProtocolError, match="acks"):
            await rpc.call("ack", {"acks": []})
        with pytest.raises(ProtocolError, match="value"):
            await rpc.call("ack", {"acks": [{**good.model_dump(), "value": "not base64!"}]})
        with pytest.raises(ProtocolError, match="exceeds"):
            big = {**good.model_dump(), "value": "A" * 15000}
            await rpc.call("ack", {"acks": [big, big, big]})
        # A signature over other bytes: refused by itself, the rest of the batch applies.
        forged = SignedAck(value=base64.b64encode(b"{}").decode(), sig=good.sig, kid=good.kid)
        raw = await rpc.call(
            "ack", AckRequest(acks=(forged, good)).model_dump(mode="json")
        )
    assert raw["applied"] == [1] and raw["refused"] == [{"index": 0, "reason": "bad-signature"}]
    assert await _fleet(c) == {"web-1": {1: "installed"}}


async def test_acks_of_many_hosts_share_one_commit_and_one_fleet_event(
    controller: Controller,
) -> None:
    """Concurrent batches coalesce into one store transaction, and what it applied is
    republished as one controller-signed ``fleet.acked`` per key, in that transaction."""
    c = controller
    key = await c.lifecycle.create(
        "web/tls", "ed25519", targets=Targets(selectors=(WEB,)), actor="alice"
    )
    digest = key.version(1).digest
    assert digest is not None
    names = [f"web-{i}" for i in range(12)]
    signers = {n: await enroll_host(c, n, WEB) for n in names}
    hosts = {n: (await c.hosts.identity(n))[0] for n in names}
    requests = {
        n: AckRequest(acks=(signed_ack(signers[n], _ack(n, digest), 1),)) for n in names
    }
    assert c.store is not None
    before = c.agents._group.groups
    replies = await asyncio.gather(*(c.acks.submit(hosts[n], requests[n]) for n in names))
    assert [r.applied for r in replies] == [(1,)] * len(names)
    assert c.agents._group.groups == before + 1  # one transaction for all twelve
    fleet_events = [
        e for e in await outbox.all_events(c.store) if e.type == EventType.FLEET_ACKED
    ]
    assert len(fleet_events) == 1
    data = FleetAcked.model_validate(fleet_events[0].data)
    assert data.key == "web/tls" and sorted(a.host for a in data.acks) == sorted(names)
    assert {(a.version, a.status, a.digest, a.ack_seq) for a in data.acks} == {
        (1, AckStatus.INSTALLED, digest, 1)
    }

    # On Kafka: signed by the controller, on the fleet topic, read as a subscriber reads it.
    reader = link_as(c, SubjectRole.SUBSCRIBER, "fleet-reader")
    async with Subscriber(
        bootstrap=reader.bootstrap,
        security=reader.security,
        trust=await c.vault.public_key(),
        topic=c.settings.fleet_topic,
        types={EventType.FLEET_ACKED},
    ) as sub:
        event = await asyncio.wait_for(anext(aiter(sub)), 30)
    assert isinstance(event.data, FleetAcked) and event.data == data


async def test_an_ack_the_fleet_event_cannot_carry_is_refused_not_fatal_to_the_group(
    controller: Controller,
) -> None:
    """A host signs acks the controller cannot republish or store (envelope seq 0, an event id
    longer than a fleet.acked entry takes, a version past the store's 64-bit integers). Each is
    refused as invalid data before it reaches the group commit: the other hosts' acks still
    apply in one transaction (a failing member would roll the group back and have every write
    run alone), and the sender is told which acks were refused, not an internal error."""
    c = controller
    key = await c.lifecycle.create(
        "web/tls", "ed25519", targets=Targets(selectors=(WEB,)), actor="alice"
    )
    digest = key.version(1).digest
    assert digest is not None
    names = [f"web-{i}" for i in range(4)]
    signers = {n: await enroll_host(c, n, WEB) for n in [*names, "evil"]}
    hosts = {n: (await c.hosts.identity(n))[0] for n in signers}
    long_event = _ack("evil", digest).model_copy(update={"event_id": "e" * 200})
    huge_version = _ack("evil", digest).model_copy(update={"version": 1 << 63})
    poison = AckRequest(
        acks=(
            signed_ack(signers["evil"], _ack("evil", digest), 0),
            signed_ack(signers["evil"], long_event, 5),
            signed_ack(signers["evil"], huge_version, 6),
        )
    )
    good = {n: AckRequest(acks=(signed_ack(signers[n], _ack(n, digest), 1),)) for n in names}
    before = c.agents._group.groups
    replies = await asyncio.gather(
        c.acks.submit(hosts["evil"], poison),
        *(c.acks.submit(hosts[n], good[n]) for n in names),
    )
    bad, *rest = replies
    assert bad.applied == () and bad.duplicates == ()
    assert [(r.index, r.reason) for r in bad.refused] == [
        (0, "invalid-data"),
        (1, "invalid-data"),
        (2, "invalid-data"),
    ]
    assert [r.applied for r in rest] == [(1,)] * len(names)
    assert c.agents._group.groups == before + 1
    fleet = await _fleet(c)
    assert fleet["evil"] == {} and all(fleet[n] == {1: "installed"} for n in names)
