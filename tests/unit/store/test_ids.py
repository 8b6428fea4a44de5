"""Row ids: version 7 UUIDs, time-ordered, so a batch's inserts share index pages."""

from __future__ import annotations

import time
import uuid

from ckms.store import new_id


def test_ids_are_version_7_uuids_with_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    text = new_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_ids_sort_by_creation_and_never_repeat() -> None:
    first = [new_id() for _ in range(2000)]
    deadline = time.monotonic() + 5
    while time.time_ns() // 1_000_000 <= uuid.UUID(first[-1]).int >> 80:
        assert time.monotonic() < deadline, "the clock did not move"
        time.sleep(0.001)
    later = [new_id() for _ in range(2000)]
    assert max(first) < min(later)  # the text sorts as the time does
    assert len(set(first + later)) == 4000
    # Random below the millisecond: 74 bits, not a counter.
    assert len({uuid.UUID(i).int & ((1 << 62) - 1) for i in first}) == 2000
