"""UTC time: the injected clock type and the one text form times take in the store.

Times are stored as RFC 3339 UTC text with microseconds (``2025-01-02T03:04:05.000006Z``): the
fixed width makes lexical order equal time order, so SQL can compare and sort them as text.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""A function returning the current time as an aware UTC datetime; tests pass a fake one."""

_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc_now() -> datetime:
    """Return the current time in UTC, the default clock everywhere."""
    return datetime.now(UTC)


def require_utc(when: datetime) -> datetime:
    """Return ``when`` converted to UTC, refusing naive datetimes (their zone would be a guess)."""
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("time must be an aware datetime (use UTC)")
    return when.astimezone(UTC)


def format_time(when: datetime) -> str:
    """Return the fixed-width RFC 3339 UTC text form used in the store, audit and events."""
    return require_utc(when).strftime(_FORMAT)


def parse_time(text: str) -> datetime:
    """Parse a time written by :func:`format_time` (any RFC 3339 form with an offset works)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return require_utc(parsed)
