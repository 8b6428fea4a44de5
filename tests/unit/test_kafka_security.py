"""The one place that builds the Kafka TLS context, the SCRAM file and the principal rules."""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path

import pytest

from ckms._kafka_acls import AGENT, CONTROLLER, SUBSCRIBER, Operation, Pattern, ckms_acls
from ckms._kafka_security import (
    PRINCIPAL_MAPPING_RULES,
    KafkaProtocol,
    KafkaSecurity,
    load_scram_credentials,
)
from ckms.crypto import SubjectRole
from ckms.devkafka import DevCA
from ckms.errors import ConfigError


def test_the_context_trusts_only_the_ca_bundle_and_checks_the_broker(tmp_path: Path) -> None:
    security = DevCA(tmp_path / "ca").security(SubjectRole.AGENT, "web-1")
    context = security.ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    # Only the ckms root: no system CA may vouch for a broker.
    (only,) = context.get_ca_certs()
    assert dict(rdn[0] for rdn in only["subject"])["commonName"] == "ckms dev root"
    args = security.client_args()
    assert args["security_protocol"] == "SSL" and args["ssl_context"] is not context


def test_plaintext_is_a_development_setting_that_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    KafkaSecurity.plaintext().check()
    assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)
    assert KafkaSecurity.plaintext().client_args() == {"security_protocol": "PLAINTEXT"}


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    ca = DevCA(tmp_path / "ca")
    one, two = ca.security(SubjectRole.AGENT, "a"), ca.security(SubjectRole.AGENT, "b")
    mixed = one.model_copy(update={"key_file": two.key_file})
    with pytest.raises(ConfigError, match="cannot load the Kafka TLS files"):
        mixed.check()


def test_scram_credentials_come_from_a_file_and_errors_never_show_the_password(
    tmp_path: Path,
) -> None:
    good = tmp_path / "scram.toml"
    good.write_text('username = "ckms-agent"\npassword = "s3cret-Pa55word"\n')
    creds = load_scram_credentials(good)
    assert (creds.username, creds.password) == ("ckms-agent", "s3cret-Pa55word")
    assert "s3cret" not in repr(creds)
    security = KafkaSecurity(
        protocol=KafkaProtocol.SASL_SSL, ca_file=DevCA(tmp_path / "ca").ca_file, sasl_file=good
    )
    args = security.client_args()
    assert (args["sasl_mechanism"], args["sasl_plain_username"]) == ("SCRAM-SHA-512", "ckms-agent")
    broken = tmp_path / "broken.toml"
    broken.write_text('username = "ckms-agent"\npassword = s3cret-Pa55word\n')  # not TOML
    with pytest.raises(ConfigError) as err:
        load_scram_credentials(broken)
    assert "s3cret" not in str(err.value) and "line 2" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_scram_credentials(tmp_path / "missing.toml")


def _principal(dn: str) -> str:
    """Kafka's rule evaluation for our rules (Java and Python agree on these regexes)."""
    for rule in re.findall(r"RULE:\^(.*?)\$/(.*?)/", PRINCIPAL_MAPPING_RULES):
        if re.fullmatch(rule[0], dn):
            return rule[1]
    return dn


def test_subjects_map_to_their_role_and_no_escaped_separator_smuggles_a_role_in() -> None:
    assert _principal("CN=web-1,OU=ckms-agent") == "ckms-agent"
    assert _principal("CN=controller,OU=ckms-controller") == "ckms-controller"
    assert _principal("CN=billing,OU=ckms-subscriber") == "ckms-subscriber"
    # A CN that carries ",OU=ckms-broker" (escaped in the DN) is not the broker role.
    assert _principal(r"CN=x\,OU=ckms-broker") == r"CN=x\,OU=ckms-broker"
    assert _principal(r"CN=x\,OU=ckms-broker,OU=ckms-agent") != "ckms-broker"
    assert _principal("CN=web-1,OU=ckms-agent,O=elsewhere") == "CN=web-1,OU=ckms-agent,O=elsewhere"
    assert _principal("CN=web-1") == "CN=web-1"


def test_only_the_controller_writes_and_agents_read_events_only() -> None:
    acls = ckms_acls(events="e", fleet="f", audit="u")
    writes = {(b.principal, b.topic) for b in acls if b.operation is Operation.WRITE}
    # Agents write nothing: their acks go over SSH, and come back as the controller's fleet.acked.
    # The controller's outbox and anchor transactional ids: replicas fence each other's
    # producers with them.
    assert writes == {
        (CONTROLLER, "e"),
        (CONTROLLER, "u"),
        (CONTROLLER, "f"),
        (CONTROLLER, "ckms-outbox-e"),
        (CONTROLLER, "ckms-audit-u"),
    }
    # The anchor's id carries the signer key id: other controllers on the topic fence nobody.
    anchor_ids = {b.pattern for b in acls if b.topic == "ckms-audit-u"}
    assert anchor_ids == {Pattern.PREFIXED}
    assert {b.principal for b in acls if b.resource != 2} == {CONTROLLER}
    reads = {(b.principal, b.topic) for b in acls if b.operation is Operation.READ}
    assert reads == {
        (CONTROLLER, "u"),
        (CONTROLLER, "e"),  # a restore reads the newest event it signed
        (CONTROLLER, "f"),  # a new leader's publisher reads back what the topics hold
        (AGENT, "e"),
        (SUBSCRIBER, "e"),
        (SUBSCRIBER, "f"),
    }
    assert {b.topic for b in acls if b.principal == AGENT} == {"e"}
