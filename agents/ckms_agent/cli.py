"""The ``ckms-agent`` entry point: ``run`` starts the daemon without loading the command line.

``ckms-agent run [--config PATH]`` goes straight to :func:`ckms_agent.runner.run_daemon`, so the
long-running process holds only what it runs (no Typer, Click or enrollment code: they cost
memory on every host for as long as the agent lives). Every other command line, including
``run --help`` and usage errors, goes to the Typer application in
:mod:`ckms_agent.commands`, which parses it as before.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["daemon_arguments", "main"]

_RUN = "run"
_CONFIG = "--config"


def daemon_arguments(argv: Sequence[str]) -> tuple[bool, Path | None]:
    """``(True, config)`` when ``argv`` is exactly ``run [--config PATH]``, else ``(False, None)``.

    Anything else (help, an unknown option, a missing value) is left to the full parser, so its
    messages and exit codes stay the ones the command line documents.
    """
    if not argv or argv[0] != _RUN:
        return False, None
    rest = list(argv[1:])
    if not rest:
        return True, None
    if len(rest) == 1 and rest[0].startswith(_CONFIG + "=") and len(rest[0]) > len(_CONFIG) + 1:
        return True, Path(rest[0][len(_CONFIG) + 1 :])
    if len(rest) == 2 and rest[0] == _CONFIG and rest[1] and not rest[1].startswith("-"):
        return True, Path(rest[1])
    return False, None


def main() -> None:
    """Console-script entry point (``ckms-agent``)."""
    is_daemon, config = daemon_arguments(sys.argv[1:])
    if is_daemon:
        from ckms_agent.runner import run_daemon

        sys.exit(run_daemon(config))
    from ckms_agent.commands import app

    app()
