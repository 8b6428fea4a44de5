"""Run the agent daemon as a process: config, logging, signals, one-line errors, exit status.

Shared by the fast ``ckms-agent run`` path (:mod:`ckms_agent.cli`) and the Typer command
(:mod:`ckms_agent.commands`). It imports only what the daemon runs; a test pins that
(``tests/unit/agent/test_daemon_imports.py``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from ckms import _gc
from ckms._logging import configure_logging
from ckms.errors import CKMSError
from ckms_agent.config import load_config
from ckms_agent.daemon import Agent

__all__ = ["one_line_error", "run_daemon", "setup_logging"]

log = logging.getLogger(__name__)


def setup_logging(level: str, *, ssh_debug: bool = False) -> None:
    """Library chatter stays out of INFO logs; asyncssh stays at WARNING unless asked for."""
    configure_logging(level, ssh_debug=ssh_debug, stream=sys.stderr)


def one_line_error(exc: BaseException) -> str:
    """The one stderr line for an error that ends a command (never a traceback, no material)."""
    if isinstance(exc, CKMSError):
        return f"ckms-agent: {exc}"
    log.debug("unexpected error", exc_info=exc)
    return (
        f"ckms-agent: internal error: {type(exc).__name__}: {exc} "
        "(run with CKMS_AGENT_LOG_LEVEL=DEBUG for details)"
    )


async def _serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_daemon(config: Path | None) -> int:
    """Run until SIGTERM/SIGINT (a clean stop, 0); 1 with one stderr line on an error."""
    try:
        cfg = load_config(config)
        setup_logging(cfg.log_level, ssh_debug=cfg.ssh_debug)
        agent = Agent(cfg)
        _gc.settle()  # modules and settings live as long as the process: no collection walks them
        asyncio.run(_serve(agent))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        print(one_line_error(exc), file=sys.stderr)
        return 1
    return 0
