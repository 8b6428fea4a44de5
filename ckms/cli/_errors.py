"""Exit codes of the ``ckms`` CLI and the one place where errors become them.

Scripts rely on these numbers; they are listed in ``ckms --help``:

== =========================================================================================
0  ok
1  operation refused or failed (permission, state, unknown key or host, controller unreachable)
2  usage error: bad arguments or settings (bad duration, selector, reason, missing option)
3  not converged in time (``--wait``): the hosts that did not acknowledge are named
4  the controller is sealed (``ckms status`` also exits 4 while sealed)
5  approval required: a dual-control request was created; its id is printed
== =========================================================================================

Every error reaches the user as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from enum import IntEnum

import typer
from pydantic import ValidationError

from ckms.errors import ApprovalRequiredError, CKMSError, ConfigError, SealedError

__all__ = [
    "EXIT_CODES_HELP",
    "ExitCode",
    "NotConvergedError",
    "UsageError",
    "cli_errors",
    "exit_code_for",
    "fail",
]

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    """What a ``ckms`` exit status means."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_CONVERGED = 3
    SEALED = 4
    APPROVAL_REQUIRED = 5


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 operation refused or failed; 2 usage error (bad arguments); "
    "3 not converged in time (--wait); 4 controller sealed; "
    "5 approval required (a dual-control request was created)."
)


class UsageError(ConfigError):
    """Raised by the CLI when an argument is malformed (exit 2)."""


class NotConvergedError(CKMSError):
    """Raised when ``--wait`` times out before every targeted host acknowledged (exit 3)."""

    def __init__(self, message: str, hosts: list[str]) -> None:
        super().__init__(message)
        self.hosts = hosts


_CODES: tuple[tuple[type[CKMSError], ExitCode], ...] = (
    (ApprovalRequiredError, ExitCode.APPROVAL_REQUIRED),
    (SealedError, ExitCode.SEALED),
    (NotConvergedError, ExitCode.NOT_CONVERGED),
    (ConfigError, ExitCode.USAGE),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of an error: the first matching class above, else 1."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILED


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: ExitCode = ExitCode.FAILED) -> typer.Exit:
    """Print ``ckms: message`` on stderr and return the Exit to raise."""
    typer.echo(f"ckms: {_one_line(message)}", err=True)
    return typer.Exit(int(code))


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn every error into one stderr line and its exit code."""
    try:
        yield
    except ApprovalRequiredError as exc:
        rid = exc.request_id
        note = f" (request {rid})" if rid and rid not in str(exc) else ""
        raise fail(f"approval required{note}: {exc}", ExitCode.APPROVAL_REQUIRED) from None
    except UsageError as exc:
        raise fail(f"error: {exc}", ExitCode.USAGE) from None
    except CKMSError as exc:
        # The controller (or the error class) says whether the same call may work later.
        again = " (temporary: try again)" if exc.retriable else ""
        raise fail(f"{type(exc).__name__}: {exc}{again}", exit_code_for(exc)) from None
    except ValidationError as exc:
        # Arguments that the typed request models refuse (the CLI builds them from options).
        error = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "arguments"
        msg = error["msg"].removeprefix("Value error, ")
        raise fail(f"error: {where}: {msg}", ExitCode.USAGE) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        raise fail("interrupted", ExitCode.FAILED) from None
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        print(  # the user must see this even when logging is off
            f"ckms: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(set CKMS_LOG_LEVEL=DEBUG for details)",
            file=sys.stderr,
        )
        raise typer.Exit(int(ExitCode.FAILED)) from None
