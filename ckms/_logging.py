"""Logging for ckms processes: one setup, libraries kept quiet, secrets scrubbed from records.

Secrets do not go into log calls in the first place (requests carry them in the SSH body, not
the logged exec command; models hide them from ``repr``). This is the second line: asyncssh is
pinned to WARNING unless SSH debugging is asked for explicitly (its DEBUG output describes every
channel, and at its debug level 3 every packet), and :class:`RedactingFilter` rewrites any
record that still looks like it holds a secret: an enrollment token, a SLIP-39 mnemonic (a run
of its words), or a JSON/repr field named like a secret (``material`` included: an imported
key file rides in that field of ``key.import`` and ``key.rotate``).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

from shamir_mnemonic.wordlist import WORDLIST

__all__ = ["RedactingFilter", "configure_logging", "redact"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

_QUIET_LIBRARIES = ("asyncssh", "aiokafka", "aiosqlite")
_NEVER_DEBUG = frozenset({"aiosqlite"})
"""Libraries kept at WARNING whatever the level: aiosqlite's DEBUG lines are every SQL
statement *with its parameters* (sealed material, row MACs, the parameters of dual-control
requests); nothing in them helps an operator that ckms's own log does not say."""

_TOKEN_RE = re.compile(r"ckms-enroll-[A-Za-z0-9_\-]+")
_SECRET_FIELD_RE = re.compile(
    r"""(?P<key>["']?(?:share|shares|passphrase|token|mnemonic|mnemonics|password|secret|material)["']?"""
    r"""\s*[:=]\s*)(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\[[^\]]*\])""",
    re.IGNORECASE,
)
_INPUT_VALUE_RE = re.compile(r"""input_value=(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^,\]]*)""")
"""pydantic puts the refused value into its error text (``input_value='...'``), even for a
``SecretStr`` field: a validation error logged with its exception would show it."""
_WORD_RE = re.compile(r"[A-Za-z]+")
_SLIP39_WORDS = frozenset(WORDLIST)
MIN_MNEMONIC_RUN = 8
"""Consecutive SLIP-39 words treated as (part of) a share: a real share has 20 or 33, and
ordinary log text almost never strings eight of them together."""


def redact(text: str) -> str:
    """Return ``text`` with tokens, mnemonic word runs and secret-named fields replaced."""
    text = _TOKEN_RE.sub("ckms-enroll-" + REDACTED, text)
    text = _SECRET_FIELD_RE.sub(lambda m: m.group("key") + f'"{REDACTED}"', text)
    text = _INPUT_VALUE_RE.sub("input_value=" + REDACTED, text)
    return _redact_word_runs(text)


def _redact_word_runs(text: str) -> str:
    runs: list[tuple[int, int]] = []
    start = end = count = 0
    for match in _WORD_RE.finditer(text):
        word = match.group(0)
        if word.lower() in _SLIP39_WORDS and (count == 0 or text[end : match.start()].isspace()):
            if count == 0:
                start = match.start()
            end, count = match.end(), count + 1
            continue
        if count >= MIN_MNEMONIC_RUN:
            runs.append((start, end))
        count = 0
        if word.lower() in _SLIP39_WORDS:
            start, end, count = match.start(), match.end(), 1
    if count >= MIN_MNEMONIC_RUN:
        runs.append((start, end))
    for run_start, run_end in reversed(runs):
        text = text[:run_start] + REDACTED + text[run_end:]
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record whose message (or exception text) would show a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and any(redact(str(e)) != str(e) for e in _chain(exc)):
            # The traceback would print every chained exception's text: keep only the class.
            record.exc_info = record.exc_text = None
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {REDACTED})"
            record.args = None
        return True


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception a traceback of it prints (causes and contexts)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def configure_logging(
    level: str | int = "INFO", *, ssh_debug: bool = False, stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (stderr) at ``level``, scrubbed; libraries at WARNING unless DEBUG.

    asyncssh reaches DEBUG only when ``level`` is DEBUG *and* ``ssh_debug`` is set (the
    ``--ssh-debug`` flag, ``CKMS_SSH_DEBUG``); aiokafka follows ``level`` when it is DEBUG;
    aiosqlite never goes below WARNING (:data:`_NEVER_DEBUG`).
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(stream=stream or sys.stderr, level=numeric, format=LOG_FORMAT)
    root = logging.getLogger()
    root.setLevel(numeric)
    redacting = RedactingFilter()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    debug = numeric <= logging.DEBUG
    for name in _QUIET_LIBRARIES:
        library = logging.getLogger(name)
        loud = debug and (ssh_debug or name != "asyncssh") and name not in _NEVER_DEBUG
        library.setLevel(logging.DEBUG if loud else logging.WARNING)
        if not any(isinstance(f, RedactingFilter) for f in library.filters):
            library.addFilter(redacting)
