"""Mutual TLS for the benchmarks: the controller's and the agents' files from LocalKafka's CA."""

from __future__ import annotations

from ckms._kafka_security import KafkaSecurity
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka


def tls_settings(security: KafkaSecurity) -> dict[str, str]:
    """``ControllerSettings`` fields for mutual TLS with ``security``'s files."""
    return {
        "kafka_ca_file": str(security.ca_file),
        "kafka_cert_file": str(security.cert_file),
        "kafka_key_file": str(security.key_file),
    }


def agent_tls_env(kafka: LocalKafka) -> dict[str, str]:
    """``CKMS_AGENT_*`` overrides that give an agent the benchmark's agent certificate."""
    agent = kafka.security(SubjectRole.AGENT, "bench-agent")
    return {
        "CKMS_AGENT_KAFKA_CA_FILE": str(agent.ca_file),
        "CKMS_AGENT_KAFKA_CERT_FILE": str(agent.cert_file),
        "CKMS_AGENT_KAFKA_KEY_FILE": str(agent.key_file),
    }
