"""The revocation feed end to end: a real controller rotates and revokes; the Python Subscriber
and the Go consumer both see, verify and print it, and both refuse what an attacker slips onto
the topic (a forgery naming the controller's key id, a replay of a real record, an oversized
record)."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from ckms.consumer import Subscriber
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole, generate_signing_key, sign
from ckms.protocol import (
    KEY_ID_HEADER,
    MAX_MESSAGE_BYTES,
    SIGNATURE_HEADER,
    EventType,
    RevocationReason,
)
from tests.support.go_consumer import go_consumer, run_go_consumer
from tests.support.kafka import go_tls_args, link_as
from tests.support.records import read_raw

__all__ = ["go_consumer"]

pytestmark = pytest.mark.kafka


def describe(event) -> str:  # type: ignore[no-untyped-def]
    """What the Python side prints, in the Go consumer's words."""
    d = event.data
    if event.type is EventType.KEY_REVOKED:
        compromise = str(d.compromise).lower()
        return (f"REVOKED key={d.key} version={d.version} reason={d.reason} "
                f"compromise={compromise} seq={event.seq} id={event.id}")  # fmt: skip
    if event.type is EventType.KEY_ROTATED:
        return (f"ROTATED key={d.key} version={d.version} primary={d.primary} "
                f"seq={event.seq} id={event.id}")  # fmt: skip
    return f"{event.type} seq={event.seq}"


async def test_a_real_rotation_and_revocation_reach_both_consumers_and_attacks_reach_neither(
    controller: Controller,
    go_consumer: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = controller.settings
    bootstrap, topic = settings.kafka_bootstrap, settings.events_topic
    public = await controller.vault.public_key()
    lc = controller.lifecycle

    await lc.create("payments/db", "aes-256", actor="alice")
    await lc.rotate("payments/db", actor="alice")
    await lc.revoke("payments/db", RevocationReason.KEY_COMPROMISE, version=1, actor="alice")
    reader = link_as(controller, SubjectRole.SUBSCRIBER, "test-reader")
    *_, revoked = await read_raw(reader, topic, 3)

    # What an attacker with write access to the topic sends (and the controller never would):
    # with the ACLs, that takes the controller's own Kafka certificate.
    intruder = generate_signing_key()
    kid = dict(revoked.headers)[KEY_ID_HEADER]
    forged_value = revoked.value.replace(b'"version":1', b'"version":2')
    attacks = [
        ("bad-signature", forged_value,
         [(SIGNATURE_HEADER, sign(intruder, forged_value)), (KEY_ID_HEADER, kid)]),
        ("replayed", revoked.value, list(revoked.headers)),
        ("oversized", b" " * (MAX_MESSAGE_BYTES + 1), list(revoked.headers)),
    ]  # fmt: skip
    producer = AIOKafkaProducer(
        **settings.kafka.client_args(acks="all", max_request_size=1 << 20)
    )
    await producer.start()
    offsets: list[int] = []  # not revoked.offset + 1...: the controller's transaction markers
    try:
        for _reason, value, headers in attacks:
            sent = await producer.send_and_wait(
                topic, value, key=revoked.key, headers=headers, partition=revoked.partition
            )
            offsets.append(sent.offset)
    finally:
        await producer.stop()
    # One more real revocation after the attacks: both must still be reading.
    await lc.rotate("payments/db", actor="alice")
    await lc.revoke("payments/db", RevocationReason.SUPERSEDED, version=2, actor="alice")

    # -- Python: the Subscriber, printing what it gets --------------------------------------
    caplog.set_level(logging.WARNING, logger="ckms.consumer")
    python_lines: list[str] = []
    async with Subscriber(
        bootstrap=bootstrap, security=reader.security, trust=public, topic=topic
    ) as sub:

        async def collect() -> None:
            async for event in sub:
                line = describe(event)
                print(line)
                python_lines.append(line)
                if event.type is EventType.KEY_REVOKED and event.data.version == 2:
                    return

        await asyncio.wait_for(collect(), 30)
        stats = dict(sub.stats)
    python_drops = [r.getMessage() for r in caplog.records if "dropped event" in r.getMessage()]

    # -- Go: the example consumer, text mode, every event -----------------------------------
    args = ["-brokers", bootstrap, *go_tls_args(reader.security),
            "-topic", topic, "-state", str(tmp_path / "go.json"),
            "-trust", base64.b64encode(public).decode(), "-all", "-poll-wait", "500ms"]  # fmt: skip
    async with run_go_consumer(go_consumer, *args) as go:
        go_lines = await go.wait_lines(len(python_lines))
    go_drops = [line for line in go.stderr if "dropped event" in line]

    # Both printed the same verified events, in the same order: rotations and revocations.
    assert go_lines == python_lines
    revocations = [line for line in go_lines if line.startswith("REVOKED")]
    assert [r.split()[1:4] for r in revocations] == [
        ["key=payments/db", "version=1", "reason=keyCompromise"],
        ["key=payments/db", "version=2", "reason=superseded"],
    ]
    assert sum(line.startswith("ROTATED") for line in go_lines) == 2
    assert "REVOKED key=payments/db version=1" in capsys.readouterr().out
    # Both refused each attack, for the same reason, at the same offset.
    for offset, (reason, _value, _headers) in zip(offsets, attacks, strict=True):
        where = f"partition={revoked.partition} offset={offset} reason={reason}"
        assert any(where in line for line in python_drops), (where, python_drops)
        assert any(where in line for line in go_drops), (where, go_drops)
    assert len(python_drops) == len(go_drops) == len(attacks)
    assert stats["delivered"] == len(python_lines)

    # Asked for revocations only, the Go consumer prints exactly those (and still refuses the
    # attacks: a filter never skips verification).
    args = ["-brokers", bootstrap, *go_tls_args(reader.security),
            "-topic", topic, "-state", str(tmp_path / "go-revoked.json"),
            "-trust", base64.b64encode(public).decode(), "-type", "key.revoked",
            "-poll-wait", "500ms"]  # fmt: skip
    async with run_go_consumer(go_consumer, *args) as go:
        only = await go.wait_lines(2)
    assert only == revocations
    assert len([line for line in go.stderr if "dropped event" in line]) == len(attacks)
