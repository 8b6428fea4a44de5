"""Kafka topic names and the size bound every ckms message respects."""

from __future__ import annotations

from typing import Final

EVENTS_TOPIC: Final = "ckms.events"
"""Controller → everyone: signed lifecycle events, partitioned by key name."""

ACKS_TOPIC: Final = "ckms.acks"
"""Agents → controller: signed acknowledgements of what a host installed or removed."""

AUDIT_TOPIC: Final = "ckms.audit"
"""Controller → auditors: every audit checkpoint the controller signs (an export line, signed
inside), compacted by signer key id; the newest is the anchor a restarted controller and an
offline ``ckms audit verify --anchor-from-kafka`` check the log against."""

MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest event or ack value accepted. Events carry ids, digests and specs, never material, so
a real one is a few hundred bytes; anything past this bound is refused before it is parsed."""

SIGNATURE_HEADER: Final = "ckms-sig"
KEY_ID_HEADER: Final = "ckms-kid"
