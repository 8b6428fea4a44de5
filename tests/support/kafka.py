"""Test support: Kafka links and certificates for the roles tests play (mTLS, as in production).

The session broker's test CA (:class:`ckms.devkafka.DevCA`) lives beside the ``ca.pem`` every
controller in a test trusts, so a helper that has only a controller can still issue the
certificate an agent (or a forger playing one) would hold.
"""

from __future__ import annotations

from pathlib import Path

from ckms._kafka_security import KafkaLink, KafkaProtocol, KafkaSecurity
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole
from ckms.devkafka import DevCA


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


def install_agent_certificate(ca: DevCA, state_dir: Path, host: str) -> KafkaSecurity:
    """Put ``CN=<host>,OU=ckms-agent`` and the CA where the agent looks by default
    (``<state_dir>/kafka/``), as enrollment leaves them on a host."""
    return ca.install(SubjectRole.AGENT, host, state_dir / "kafka")


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
