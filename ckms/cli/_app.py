"""The root Typer app; each noun lives in its own module, imported when one of its commands runs.

Connection options live on the root (``ckms --controller HOST:PORT key list``), each with an
environment variable, so scripts set them once. Exit codes are documented in
:mod:`ckms.cli._errors` and in ``ckms --help``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from typer.core import TyperGroup
from typer.main import get_command_from_info, get_group_from_info
from typer.models import CommandInfo, TyperInfo

from ckms._logging import configure_logging
from ckms.cli._errors import EXIT_CODES_HELP, ExitCode


@dataclass(frozen=True)
class _Lazy:
    """Where a command lives: ``attr`` of ``ckms.cli.<module>``, a function or a noun's app."""

    module: str
    attr: str
    help: str | None = None


_COMMANDS: Final = {
    "init": _Lazy("init", "init"),
    "status": _Lazy("vault", "status"),
    "console": _Lazy("console", "console"),
    "unseal": _Lazy("vault", "unseal"),
    "seal": _Lazy("vault", "seal"),
    "backup": _Lazy("backup", "backup"),
    "restore": _Lazy("backup", "restore"),
    "approve": _Lazy(
        "request", "approve", "Approve another person's request (same as `request approve`)."
    ),
    "demo": _Lazy("_app", "demo"),
    "controller": _Lazy("controller", "app"),
    "key": _Lazy("key", "app"),
    "host": _Lazy("host", "app"),
    "fleet": _Lazy("fleet", "app"),
    "ca": _Lazy("ca", "app"),
    "rollout": _Lazy("rollout", "app"),
    "audit": _Lazy("audit", "app"),
    "operator": _Lazy("operator", "app"),
    "request": _Lazy("request", "app"),
    "report": _Lazy("report", "app"),
    "store": _Lazy("store", "app"),
    "dev": _Lazy("dev", "app"),
}
"""Every command, in ``ckms --help`` order. A command's module (and what it
imports: the controller, Kafka, SSH, rich) is imported only when that command runs or help
lists it: ``ckms key list`` loads the key commands alone, not every noun's dependencies
(about 0.5 s of CPU before the first request)."""


class _Commands(MutableMapping[str, Any]):
    """A group's commands by name, each made from :data:`_COMMANDS` on first look-up.

    Every name is listed (help, suggestions for a typo) without importing anything; a command
    is built, and its module imported, only when Click asks for that one.
    """

    def __init__(self, loaded: MutableMapping[str, Any], make: Callable[[str], Any]) -> None:
        self._loaded = loaded
        self._make = make

    def __getitem__(self, name: str) -> Any:
        found = self._loaded.get(name)
        if found is None:
            if name not in _COMMANDS:
                raise KeyError(name)
            found = self._loaded[name] = self._make(name)
        return found

    def __contains__(self, name: object) -> bool:
        return name in _COMMANDS or name in self._loaded  # without building the command

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        yield from _COMMANDS
        yield from (name for name in self._loaded if name not in _COMMANDS)

    def __len__(self) -> int:
        return len(_COMMANDS) + sum(1 for name in self._loaded if name not in _COMMANDS)


class _LazyGroup(TyperGroup):
    """The root group: its commands come from :data:`_COMMANDS`, imported on use."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _Commands(self.commands, self._make)

    def list_commands(self, ctx: Any) -> list[str]:
        """Every command's name, in help order, without building any."""
        return list(self.commands)

    def _make(self, name: str) -> Any:
        """The Click command of ``name``, as ``app.command``/``app.add_typer`` would make it."""
        where = _COMMANDS[name]
        found = getattr(importlib.import_module(f"ckms.cli.{where.module}"), where.attr)
        if isinstance(found, typer.Typer):
            info = TyperInfo(found, name=name)
            if where.help is not None:
                info.help = where.help
            return get_group_from_info(
                info,
                pretty_exceptions_short=app.pretty_exceptions_short,
                suggest_commands=self.suggest_commands,
                rich_markup_mode=self.rich_markup_mode,
            )
        info = CommandInfo(name=name, callback=found)
        if where.help is not None:
            info.help = where.help
        return get_command_from_info(
            info,
            pretty_exceptions_short=app.pretty_exceptions_short,
            rich_markup_mode=self.rich_markup_mode,
        )


app = typer.Typer(
    cls=_LazyGroup,
    name="ckms",
    help=(
        "ckms: cryptographic key management for fleets of hosts.\n\n"
        "Talks to the controller over SSH with your key; the controller's host key is pinned. "
        f"Every read command takes --json.\n\n{EXIT_CODES_HELP}"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def root(
    ctx: typer.Context,
    controller_address: Annotated[
        str | None,
        typer.Option(
            "--controller",
            envvar="CKMS_CONTROLLER",
            help="Controller SSH endpoint HOST:PORT [default: 127.0.0.1:2222]; several "
            "replicas separated by commas (tried in turn).",
            show_default=False,
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option(
            "--identity",
            envvar="CKMS_IDENTITY",
            help="Your SSH private key [default: ~/.ssh/id_ed25519].",
            show_default=False,
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            envvar="CKMS_USER",
            help="Your operator name [default: your login name].",
            show_default=False,
        ),
    ] = None,
    host_key_fingerprint: Annotated[
        str | None,
        typer.Option(
            "--host-key-fingerprint",
            envvar="CKMS_CONTROLLER_FINGERPRINT",
            help="The controller's SSH host key, SHA256:... (pinned; printed by ckms init).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Keep the connection options for the command that runs."""
    from ckms.cli._client import Connection  # SSH is loaded by the commands that connect

    ctx.obj = Connection(
        controller=controller_address,
        identity=identity,
        user=user,
        fingerprint=host_key_fingerprint,
    )


def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the work directory (logs, host roots).")
    ] = False,
) -> None:
    """Run the end-to-end demo: Kafka, a controller, three agents, rotate, revoke, audit."""
    from ckms.demo import main as run_demo  # imported on use: it pulls in the whole stack

    raise typer.Exit(run_demo(keep=keep))


def main() -> None:
    """Console-script entry point."""
    level = os.environ.get("CKMS_LOG_LEVEL")
    if level:
        ssh_debug = os.environ.get("CKMS_SSH_DEBUG", "").lower() in ("1", "true", "yes", "on")
        try:
            configure_logging(level, ssh_debug=ssh_debug, stream=sys.stderr)
        except ValueError:
            print(f"ckms: CKMS_LOG_LEVEL={level!r} is not a log level", file=sys.stderr)
            raise SystemExit(2) from None
    app()


__all__ = ["ExitCode", "app", "main"]
