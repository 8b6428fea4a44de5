"""Test support: Kafka links and certificates for the roles tests play (mTLS, as in production).

The session broker's test CA (:class:`ckms.devkafka.DevCA`) lives beside the ``ca.pem`` every
controller in a test trusts for Kafka, so a helper that has only a controller can still issue
the certificate an agent (or a forger playing one) would hold.
"""

from __future__ import annotations

from pathlib import Path

from ckms._kafka_security import KafkaLink, KafkaProtocol, KafkaSecurity
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole
from ckms.devkafka import DevCA
from ckms_agent.config import load_config, write_config


def controller_kafka_settings(kafka: KafkaLink | str) -> dict[str, object]:
    """``ControllerSettings`` fields for ``kafka``; a bare string is a broker that is not there
    (tests without Kafka), reached in plaintext so no certificate is needed."""
    if isinstance(kafka, str):
        return {"kafka_bootstrap": kafka, "kafka_security_protocol": KafkaProtocol.PLAINTEXT}
    s = kafka.security
    return {
        "kafka_bootstrap": kafka.bootstrap,
        "kafka_security_protocol": s.protocol,
        "kafka_ca_file": s.ca_file,
        "kafka_cert_file": s.cert_file,
        "kafka_key_file": s.key_file,
        "kafka_sasl_file": s.sasl_file,
    }


def dev_ca(c: Controller) -> DevCA:
    """The test CA that issued ``c``'s Kafka certificate."""
    ca_file = c.settings.kafka_security.ca_file
    assert ca_file is not None, "this controller has no Kafka TLS"
    return DevCA(ca_file.parent)


def link_as(c: Controller, role: SubjectRole, name: str) -> KafkaLink:
    """A link to ``c``'s Kafka as ``name`` in ``role`` (an agent, a subscriber, a forger)."""
    return KafkaLink(c.settings.kafka_bootstrap, dev_ca(c).security(role, name))


def use_test_broker_certificate(ca: DevCA, config_path: Path, host: str) -> KafkaSecurity:
    """Point the agent enrolled at ``config_path`` at a certificate the test broker trusts.

    Enrollment leaves the host a Kafka client certificate from its controller's CA in
    ``<state_dir>/kafka/``; the session broker trusts only its own test CA (one broker serves
    every test's controller), so the agent is given ``CN=<host>,OU=ckms-agent`` from that CA in
    ``<state_dir>/kafka-test/`` through its Kafka settings, as a host's admin would for a
    cluster with a CA of its own. The enrolled certificate stays where it is (renewals go on).
    """
    config = load_config(config_path, {})
    security = ca.install(SubjectRole.AGENT, host, config.state_dir / "kafka-test")
    updated = config.model_copy(
        update={
            "kafka_ca_file": security.ca_file,
            "kafka_cert_file": security.cert_file,
            "kafka_key_file": security.key_file,
        }
    )
    write_config(config_path, updated)
    return security


def tls_options(kafka: KafkaLink) -> list[str]:
    """The ``ckms audit verify`` options that reach Kafka as ``kafka`` does."""
    s = kafka.security
    out = ["--kafka-security-protocol", str(s.protocol)]
    for flag, path in (
        ("--kafka-ca-file", s.ca_file),
        ("--kafka-cert-file", s.cert_file),
        ("--kafka-key-file", s.key_file),
        ("--kafka-sasl-file", s.sasl_file),
    ):
        if path is not None:
            out += [flag, str(path)]
    return out


def go_tls_args(security: KafkaSecurity) -> list[str]:
    """The Go example consumer's flags for mutual TLS with ``security``'s files."""
    assert security.ca_file and security.cert_file and security.key_file
    return [
        "-tls-ca", str(security.ca_file),
        "-tls-cert", str(security.cert_file),
        "-tls-key", str(security.key_file),
    ]  # fmt: skip
