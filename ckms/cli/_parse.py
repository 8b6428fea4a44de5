"""Parsing CLI arguments into typed values; every failure is a one-line UsageError (exit 2)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from ckms.cli._errors import UsageError
from ckms.crypto import InstallFormat, KeyType
from ckms.errors import ConfigError
from ckms.protocol import APPROVAL_OPERATIONS, RevocationReason, Targets
from ckms.protocol import parse_labels as protocol_parse_labels

__all__ = [
    "parse_approvals",
    "parse_controller",
    "parse_duration",
    "parse_format",
    "parse_key_type",
    "parse_labels",
    "parse_mode",
    "parse_reason",
    "parse_shares",
    "parse_targets",
    "read_text_file",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION_RE = re.compile(r"(\d+)([smhdwy])")


def parse_duration(text: str, *, option: str = "duration") -> timedelta:
    """Parse ``90d``, ``12h``, ``1y``, ``1d12h`` or plain seconds (``3600``) into a timedelta.

    Units: s, m, h, d, w, y (365 days). Anything else is refused with a one-line error.
    """
    raw = text.strip().lower()
    if raw.isdigit():
        return timedelta(seconds=int(raw))
    pos, total = 0, 0
    for match in _DURATION_RE.finditer(raw):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not raw or pos != len(raw):
        raise UsageError(
            f"{option}: bad duration {text!r}; use a number with a unit s, m, h, d, w or y "
            "(e.g. 90d, 12h, 1y, 1d12h)"
        )
    return timedelta(seconds=total)


def parse_reason(text: str) -> RevocationReason:
    """A KMIP revocation reason, case- and dash-insensitive (``key-compromise`` works)."""
    wanted = text.replace("-", "").replace("_", "").lower()
    for reason in RevocationReason:
        if reason.value.lower() == wanted:
            return reason
    raise UsageError(
        f"--reason: unknown revocation reason {text!r}; use one of "
        f"{', '.join(r.value for r in RevocationReason)}"
    )


def parse_targets(specs: list[str], *, env: str | None = None) -> Targets:
    """Targets from ``env=prod,role=web`` selectors and ``host:<id>`` entries."""
    try:
        return Targets.parse(specs, env=env)
    except ConfigError as exc:
        raise UsageError(f"--target: {exc}") from None


def parse_labels(specs: list[str], *, option: str = "--label") -> dict[str, str]:
    """Labels from ``name=value`` arguments (comma-separated pairs allowed)."""
    try:
        return protocol_parse_labels(specs)
    except ConfigError as exc:
        raise UsageError(f"{option}: {exc}") from None


def parse_key_type(text: str) -> KeyType:
    """A key type name."""
    try:
        return KeyType(text.lower())
    except ValueError:
        raise UsageError(
            f"--type: unknown key type {text!r}; use one of {', '.join(t.value for t in KeyType)}"
        ) from None


def parse_format(text: str) -> InstallFormat:
    """An install file format."""
    try:
        return InstallFormat(text.lower())
    except ValueError:
        raise UsageError(
            f"--format: unknown format {text!r}; use one of "
            f"{', '.join(f.value for f in InstallFormat)}"
        ) from None


def parse_mode(text: str, *, option: str = "--mode") -> int:
    """An octal file mode such as ``0640``."""
    try:
        value = int(text, 8)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not an octal mode like 0640") from None
    if not 0 <= value <= 0o777:
        raise UsageError(f"{option}: {text!r} is not a file mode (0000-0777)")
    return value


def parse_approvals(text: str) -> tuple[str, ...]:
    """Operations under dual control, comma-separated (``none`` for none)."""
    if text.strip().lower() in ("", "none"):
        return ()
    ops = tuple(sorted({part.strip().lower() for part in text.split(",") if part.strip()}))
    unknown = [op for op in ops if op not in APPROVAL_OPERATIONS]
    if unknown:
        raise UsageError(
            f"--approvals: unknown operation {unknown[0]!r}; use some of "
            f"{', '.join(APPROVAL_OPERATIONS)} (or none)"
        )
    return ops


def parse_shares(text: str) -> tuple[int, int]:
    """``M/N``: M of N shares unseal (2 <= M <= N <= 16)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shares: expected M/N such as 3/5, got {text!r}")
    m, n = int(match.group(1)), int(match.group(2))
    if not 2 <= m <= n <= 16:
        raise UsageError(f"--shares: need 2 <= M <= N <= 16, got {m}/{n}")
    return m, n


def parse_controller(
    text: str, *, option: str = "--controller", allow_any_port: bool = False
) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6); port 0 (any free port) only if allowed."""
    host, sep, port = text.strip().rpartition(":")
    lowest = 0 if allow_any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise UsageError(f"{option}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def read_text_file(path: Path, *, option: str) -> str:
    """A small text file's content without its trailing newline."""
    try:
        data = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{option}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option}: cannot read {path}: {exc}") from None
    if len(data) > 64 * 1024:
        raise UsageError(f"{option}: {path} is too large")
    return data.rstrip("\r\n")
