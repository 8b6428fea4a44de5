"""Row ids that sort by creation time, so a batch's inserts land on neighbouring index pages.

Random (version 4) UUIDs as the ids of keys and outbox events put every insert of a batch on a
different page of each index over them, once the index outgrows a batch: onboarding 317 keys
dirtied a page per key in four indexes, and the write-ahead log, its fsync and its checkpoints
grew with the number of keys already stored. A version 7 UUID (RFC 9562: 48 bits of Unix
milliseconds, then 74 random bits) is still a UUID and just as opaque to its readers, unique
without coordination, and each batch's ids sit together at the end of the index.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["new_id"]

_MS_BITS = (1 << 48) - 1


def new_id() -> str:
    """A fresh version 7 UUID in its usual text form (random below the millisecond)."""
    ms = time.time_ns() // 1_000_000 & _MS_BITS
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 are used
    value = (
        ms << 80
        | 0x7 << 76  # version
        | (rand >> 62 & 0xFFF) << 64  # rand_a, 12 bits
        | 0b10 << 62  # variant (RFC 9562)
        | rand & ((1 << 62) - 1)  # rand_b, 62 bits
    )
    return str(uuid.UUID(int=value))
