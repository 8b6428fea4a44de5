"""Kafka over mutual TLS with ACLs: who may connect, and who may write which topic.

Every attack runs against the session's real broker (``LocalKafka``: mTLS on every listener,
KRaft's StandardAuthorizer, the ckms ACLs) with real certificates from its test CA.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from ckms._kafka import TopicSpec, ensure_topics
from ckms._kafka_security import (
    KafkaLink,
    KafkaProtocol,
    KafkaSecurity,
    load_scram_credentials,
)
from ckms.crypto import SubjectRole
from ckms.devkafka import DevCA, LocalKafka
from ckms.errors import ConfigError, KafkaUnavailableError

pytestmark = pytest.mark.kafka

_WAIT_S = 30.0


async def produce(link: KafkaLink | dict[str, object], topic: str, value: bytes = b"x") -> None:
    """Send one record with acks=all; raise what Kafka (or the handshake) said."""
    args = link.client_args() if isinstance(link, KafkaLink) else link
    producer = AIOKafkaProducer(**args, acks="all", request_timeout_ms=10000)
    try:
        async with asyncio.timeout(_WAIT_S):
            await producer.start()
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def read_all(
    link: KafkaLink, topic: str, count: int, wait_s: float = _WAIT_S
) -> list[bytes]:
    """Read ``count`` values of partition 0 from the start (no consumer group)."""
    consumer = AIOKafkaConsumer(**link.client_args(enable_auto_commit=False))
    try:
        async with asyncio.timeout(wait_s):
            await consumer.start()
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            values: list[bytes] = []
            while len(values) < count:
                batches = await consumer.getmany(tp, timeout_ms=500)
                values.extend(bytes(m.value) for m in batches.get(tp, []))
            return values
    finally:
        await consumer.stop()


@pytest.fixture
def topics(
    controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> Callable[[], asyncio.Future[dict[str, str]]]:
    """Create this test's events, fleet and audit topics as the controller does."""

    async def make() -> dict[str, str]:
        names = {kind: unique_topic(kind) for kind in ("events", "fleet", "audit")}
        await ensure_topics(controller_kafka, [TopicSpec(n, 1, 1) for n in names.values()])
        return names

    return make  # type: ignore[return-value]


async def test_the_controller_writes_events_and_agents_and_subscribers_read_them(
    local_kafka: LocalKafka, controller_kafka: KafkaLink, topics
) -> None:
    names = await topics()
    await produce(controller_kafka, names["events"], b"event-1")
    await produce(controller_kafka, names["audit"], b"checkpoint-1")
    agent = local_kafka.link(SubjectRole.AGENT, "host-1")
    subscriber = local_kafka.link(SubjectRole.SUBSCRIBER, "billing")
    assert await read_all(agent, names["events"], 1) == [b"event-1"]
    assert await read_all(subscriber, names["events"], 1) == [b"event-1"]
    # The hosts' acks the controller applied, republished under its signature.
    await produce(controller_kafka, names["fleet"], b"fleet-1")
    assert await read_all(subscriber, names["fleet"], 1) == [b"fleet-1"]


@pytest.mark.requirement("ISO27002-8.20")
async def test_an_agent_certificate_cannot_produce_to_any_topic(
    local_kafka: LocalKafka, topics
) -> None:
    names = await topics()
    agent = local_kafka.link(SubjectRole.AGENT, "host-1")
    # Acks go over the agent's SSH connection: an agent writes to no topic at all.
    for topic in (names["events"], names["audit"], names["fleet"]):
        with pytest.raises(TopicAuthorizationFailedError):
            await produce(agent, topic, b"forged")
    # Nor create a topic of its own to write to.
    with pytest.raises(KafkaUnavailableError, match=r"error 29|Authorization"):
        await ensure_topics(agent, [TopicSpec(names["events"] + ".mine", 1, 1)])


async def test_an_agent_cannot_read_the_audit_anchor_or_the_fleet_acks(
    local_kafka: LocalKafka, controller_kafka: KafkaLink, topics, caplog: pytest.LogCaptureFixture
) -> None:
    names = await topics()
    await produce(controller_kafka, names["audit"], b"checkpoint")
    agent = local_kafka.link(SubjectRole.AGENT, "host-1")
    await produce(controller_kafka, names["fleet"], b"fleet-1")
    refused = (names["audit"], names["fleet"])
    caplog.set_level(logging.ERROR, logger="aiokafka.cluster")

    async def read_refused(topic: str) -> None:
        # aiokafka's consumer retries a topic the broker refuses until the bound runs out; the
        # broker's refusal itself is in the metadata it answers, which aiokafka logs.
        with pytest.raises((TopicAuthorizationFailedError, TimeoutError)):
            await read_all(agent, topic, 1, wait_s=10)

    await asyncio.gather(*(read_refused(topic) for topic in refused))
    said = [r.getMessage() for r in caplog.records]
    for topic in refused:
        assert f"Topic {topic} is not authorized for this client" in said, said


async def test_a_subscriber_cannot_produce(local_kafka: LocalKafka, topics) -> None:
    names = await topics()
    subscriber = local_kafka.link(SubjectRole.SUBSCRIBER, "billing")
    for topic in names.values():
        with pytest.raises(TopicAuthorizationFailedError):
            await produce(subscriber, topic, b"forged")


@pytest.mark.requirement("ISO27002-8.20")
async def test_a_client_without_a_certificate_cannot_connect(
    local_kafka: LocalKafka, topics
) -> None:
    names = await topics()
    # It trusts the broker (the real CA) but has no certificate of its own to present.
    no_cert = ssl.create_default_context(cafile=str(local_kafka.ca.ca_file))
    args = {
        "bootstrap_servers": local_kafka.bootstrap,
        "security_protocol": "SSL",
        "ssl_context": no_cert,
    }
    with pytest.raises((KafkaConnectionError, TimeoutError)):
        await produce(args, names["events"])
    # Nor can a client that does not speak TLS at all.
    with pytest.raises((KafkaConnectionError, TimeoutError, KafkaError)):
        await produce(KafkaLink(local_kafka.bootstrap, KafkaSecurity.plaintext()), names["events"])


@pytest.mark.requirement("ISO27002-8.20")
async def test_a_certificate_from_another_ca_is_refused(
    local_kafka: LocalKafka, tmp_path: Path, topics
) -> None:
    names = await topics()
    other = DevCA(tmp_path / "other-ca", name="attacker")
    # The subject a real controller has, signed by a CA the broker does not trust; the client
    # trusts the real CA, so only the broker's check can stop it.
    cert, key = other.issue(SubjectRole.CONTROLLER, "controller")
    forged = KafkaSecurity(ca_file=local_kafka.ca.ca_file, cert_file=cert, key_file=key)
    with pytest.raises((KafkaConnectionError, TimeoutError)):
        await produce(KafkaLink(local_kafka.bootstrap, forged), names["events"], b"forged")


async def test_a_broker_from_another_ca_is_refused_by_the_client(
    local_kafka: LocalKafka, tmp_path: Path
) -> None:
    """The client trusts only its CA bundle: a broker (or a man in the middle) with a
    certificate from elsewhere is not talked to."""
    other = DevCA(tmp_path / "other-ca", name="elsewhere")
    real = local_kafka.security(SubjectRole.CONTROLLER, "controller")
    wrong_trust = real.model_copy(update={"ca_file": other.ca_file})
    with pytest.raises(ssl.SSLCertVerificationError):
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            int(local_kafka.bootstrap.rsplit(":", 1)[1]),
            ssl=wrong_trust.ssl_context(),
            server_hostname="127.0.0.1",
        )
        writer.close()


async def test_scram_over_tls_is_the_alternative_for_existing_clusters(
    local_kafka: LocalKafka, topics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    names = await topics()
    controller = local_kafka.sasl_link(SubjectRole.CONTROLLER)
    agent = local_kafka.sasl_link(SubjectRole.AGENT)
    assert controller.security.protocol is KafkaProtocol.SASL_SSL
    assert controller.security.cert_file is None  # SCRAM alone authenticates
    await produce(controller, names["events"], b"over-scram")
    assert await read_all(agent, names["events"], 1) == [b"over-scram"]
    # The same ACLs hold for SCRAM users.
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(agent, names["events"], b"forged")
    # A wrong password is refused.
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('username = "ckms-controller"\npassword = "not-the-password"\n')
    bad = controller.security.model_copy(update={"sasl_file": wrong})
    with pytest.raises((KafkaError, TimeoutError)):
        await produce(KafkaLink(controller.bootstrap, bad), names["events"], b"forged")
    # The password is read from its file and never logged, nor shown in a repr.
    assert controller.security.sasl_file is not None
    password = load_scram_credentials(controller.security.sasl_file).password
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert password not in logged and "not-the-password" not in logged
    assert password not in repr(load_scram_credentials(controller.security.sasl_file))


def test_settings_refuse_an_incomplete_tls_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CA bundle"):
        KafkaSecurity(cert_file=tmp_path / "c", key_file=tmp_path / "k")
    with pytest.raises(ValueError, match="client certificate"):
        KafkaSecurity(ca_file=tmp_path / "ca")
    with pytest.raises(ValueError, match="credentials file"):
        KafkaSecurity(protocol=KafkaProtocol.SASL_SSL, ca_file=tmp_path / "ca")
    missing = KafkaSecurity(
        ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "c", key_file=tmp_path / "k"
    )
    with pytest.raises(ConfigError, match=r"ca\.pem does not exist"):
        missing.check()
