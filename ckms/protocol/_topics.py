"""Kafka topic names and the size bound every ckms message respects."""

from __future__ import annotations

from typing import Final

EVENTS_TOPIC: Final = "ckms.events"
"""Controller → everyone: signed lifecycle events, partitioned by key name."""

FLEET_TOPIC: Final = "ckms.fleet"
"""Controller → services that follow the fleet: ``fleet.acked``, the hosts' acks the controller
verified and applied, signed by the controller (agents send their acks over SSH and never write
to Kafka; they do not read this topic either, so its volume never reaches them)."""

AUDIT_TOPIC: Final = "ckms.audit"
"""Controller → auditors: every audit checkpoint the controller signs (an export line, signed
inside), compacted by signer key id; the newest is the anchor a restarted controller and an
offline ``ckms audit verify --anchor-from-kafka`` check the log against."""

MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest event or ack value accepted. Events carry ids, digests and specs, never material, so
a real one is a few hundred bytes; anything past this bound is refused before it is parsed."""

SIGNATURE_HEADER: Final = "ckms-sig"
KEY_ID_HEADER: Final = "ckms-kid"
