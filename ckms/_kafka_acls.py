"""The Kafka ACLs ckms needs, in one place: who may read and write which topic.

Principals come from certificate subjects (:data:`~ckms._kafka_security.PRINCIPAL_MAPPING_RULES`):

- ``User:ckms-controller`` writes the events, fleet and audit topics, reads the audit anchor,
  the events topic (a restore continues the sequence after the newest event it signed) and the
  fleet topic (a new leader's publisher reads what both already hold), and creates the three
  topics; it also uses the transactional ids of the outbox publisher
  (``ckms-outbox-<events topic>``) and of the audit anchor (``ckms-audit-<audit topic>-`` and
  the signer key id, a prefixed ACL): replicas fence each other's producers with them;
- ``User:ckms-agent`` reads events — nothing else (acks go over the agent's SSH connection);
- ``User:ckms-subscriber`` reads events and the fleet topic (``fleet.acked``: the hosts' acks
  the controller applied, signed by it);
- brokers (``User:ckms-broker``) are super users; everything else is denied (the
  ``StandardAuthorizer`` allows nothing without an ACL).

:func:`ckms_acls` lists the bindings; :func:`create_acls` applies them through the Kafka
protocol (``LocalKafka`` at start, or ``python -m ckms.devkafka acls`` against a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from ckms._kafka_security import KafkaLink
from ckms.errors import KafkaUnavailableError
from ckms.protocol import AUDIT_TOPIC, EVENTS_TOPIC, FLEET_TOPIC

__all__ = [
    "AGENT",
    "CONTROLLER",
    "SUBSCRIBER",
    "AclBinding",
    "anchor_transactional_id",
    "anchor_transactional_prefix",
    "ckms_acls",
    "create_acls",
    "outbox_transactional_id",
]

CONTROLLER: Final = "User:ckms-controller"
AGENT: Final = "User:ckms-agent"
SUBSCRIBER: Final = "User:ckms-subscriber"
BROKER: Final = "User:ckms-broker"


class Operation(IntEnum):
    """Kafka's AclOperation codes (the wire values)."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8


class Pattern(IntEnum):
    """Kafka's PatternType codes: a literal name, or every name starting with it."""

    LITERAL = 3
    PREFIXED = 4


_TOPIC: Final = 2  # ResourceType.TOPIC
_TRANSACTIONAL_ID: Final = 5  # ResourceType.TRANSACTIONAL_ID
_ALLOW: Final = 3  # AclPermissionType.ALLOW


@dataclass(frozen=True)
class AclBinding:
    """One allow rule: ``principal`` may ``operation`` on topic ``topic`` (from any host), or
    on the transactional id ``topic`` names when ``resource`` says so."""

    principal: str
    operation: Operation
    topic: str
    pattern: Pattern = Pattern.LITERAL
    resource: int = _TOPIC


def outbox_transactional_id(events_topic: str) -> str:
    """The Kafka transactional id of the outbox publisher of ``events_topic``: the same on every
    replica, which is what fences an old leader's producer (``ckms.controller.publisher``)."""
    return f"ckms-outbox-{events_topic}"


def anchor_transactional_prefix(audit_topic: str) -> str:
    """What every audit anchor transactional id of ``audit_topic`` starts with (a prefixed
    ACL: one id per signer key; with a prefixed topic pattern, every topic under it)."""
    return f"ckms-audit-{audit_topic}"


def anchor_transactional_id(audit_topic: str, signer_key_id: str) -> str:
    """The Kafka transactional id of the audit anchor's producer for ``audit_topic`` and the
    controller whose signing key is ``signer_key_id``: the same on every replica of it, so a
    new leader's producer fences an old leader's anchor (``ckms.controller.anchor``), and
    another controller sharing the topic fences nobody."""
    return f"{anchor_transactional_prefix(audit_topic)}-{signer_key_id}"


def ckms_acls(
    *,
    events: str = EVENTS_TOPIC,
    fleet: str = FLEET_TOPIC,
    audit: str = AUDIT_TOPIC,
    pattern: Pattern = Pattern.LITERAL,
) -> list[AclBinding]:
    """Every ACL ckms needs for these topic names (``PREFIXED``: for every topic under them)."""
    grants = {
        CONTROLLER: {
            events: (Operation.WRITE, Operation.READ, Operation.DESCRIBE, Operation.CREATE),
            fleet: (Operation.WRITE, Operation.READ, Operation.DESCRIBE, Operation.CREATE),
            audit: (Operation.WRITE, Operation.READ, Operation.DESCRIBE, Operation.CREATE),
        },
        AGENT: {events: (Operation.READ, Operation.DESCRIBE)},
        SUBSCRIBER: {
            events: (Operation.READ, Operation.DESCRIBE),
            fleet: (Operation.READ, Operation.DESCRIBE),
        },
    }
    transactional = (
        (outbox_transactional_id(events), pattern),
        (anchor_transactional_prefix(audit), Pattern.PREFIXED),  # one id per signer key
    )
    return [
        AclBinding(principal, op, topic, pattern)
        for principal, topics in grants.items()
        for topic, ops in topics.items()
        for op in ops
    ] + [
        AclBinding(CONTROLLER, op, ident, ident_pattern, _TRANSACTIONAL_ID)
        for ident, ident_pattern in transactional
        for op in (Operation.WRITE, Operation.DESCRIBE)
    ]


async def create_acls(link: KafkaLink, bindings: list[AclBinding]) -> None:
    """Create ``bindings`` on the cluster (idempotent: an existing ACL is not an error).

    ``link`` must authenticate as a principal allowed to alter ACLs (a super user).
    """
    # aiokafka's admin client has no create_acls; its protocol layer has the request.
    from aiokafka.protocol.admin import CreateAclsRequest

    client = AIOKafkaClient(**link.client_args(request_timeout_ms=15000))
    try:
        await client.bootstrap()
        node = client.get_random_node()
        for b in bindings:
            request = CreateAclsRequest(
                b.resource, b.topic, int(b.pattern), b.principal, "*", int(b.operation), _ALLOW
            )
            response = await client.send(node, request)
            for code, message in response.creation_responses:
                if code != 0:
                    raise KafkaUnavailableError(
                        f"Kafka refused the ACL {b.principal} {b.operation.name} {b.topic}: "
                        f"error {code} {message}"
                    )
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot create ACLs at {link}: {exc}") from exc
    except OSError as exc:
        raise KafkaUnavailableError(f"Kafka at {link} is unreachable: {exc}") from exc
    finally:
        await client.close()
