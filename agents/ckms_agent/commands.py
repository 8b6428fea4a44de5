"""The ``ckms-agent`` command line: ``enroll``, ``run``, ``status``; thin over the library.

Loaded for every command but a plain ``ckms-agent run`` (see :mod:`ckms_agent.cli`).

Errors reach the user as one line on stderr with exit status 1 (2 for usage errors, as Click
does), never as a traceback; ``--config`` defaults to ``$CKMS_AGENT_CONFIG``, then
``/etc/ckms/agent.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from ckms.crypto import WrapSuite
from ckms.errors import ConfigError
from ckms_agent import enroll as enrollment
from ckms_agent.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, load_config
from ckms_agent.runner import one_line_error, run_daemon, setup_logging
from ckms_agent.status import collect_status, render_text

app = typer.Typer(
    name="ckms-agent",
    help="ckms host agent: keeps this host's keys current and acknowledges what it installed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar=CONFIG_ENV,
        help=f"Agent config file (default {DEFAULT_CONFIG_PATH}).",
        show_default=False,
    ),
]


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn ckms errors (and unexpected ones) into one stderr line and exit status 1."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        typer.echo(one_line_error(exc), err=True)
        raise typer.Exit(1) from None


@app.command()
def enroll(
    controller: Annotated[
        str,
        typer.Option(help="Controller SSH endpoint, HOST:PORT; replicas separated by commas."),
    ],
    host_key_fingerprint: Annotated[
        str, typer.Option(help="The controller's SSH host key, SHA256:... (pinned).")
    ],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CKMS_AGENT_ENROLL_TOKEN",
            help="One-time enrollment token; prefer the environment variable or --token-file "
            "(a command line shows in ps and shell history).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="A file holding the one-time enrollment token.")
    ] = None,
    state_dir: Annotated[
        Path, typer.Option(help="Where the agent keeps its keys and state.")
    ] = DEFAULT_STATE_DIR,
    config: ConfigOption = None,
    root: Annotated[
        Path | None,
        typer.Option(help="Install every key under this directory instead of / (tests, demo)."),
    ] = None,
    wrap_suite: Annotated[
        WrapSuite, typer.Option(help="HPKE suite of the wrapping key.")
    ] = WrapSuite.X25519,
    force: Annotated[bool, typer.Option(help="Replace an existing enrollment.")] = False,
    log_level: Annotated[
        str, typer.Option(envvar="CKMS_AGENT_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "WARNING",
    ssh_debug: Annotated[
        bool,
        typer.Option(envvar="CKMS_AGENT_SSH_DEBUG", help="Let asyncssh log at DEBUG too."),
    ] = False,
    allow_path: Annotated[
        list[Path] | None,
        typer.Option(
            help="A directory keys may be installed under (repeat; default /etc/ckms/keys and "
            "/var/lib/ckms/keys, or what the existing config allows)."
        ),
    ] = None,
) -> None:
    """Enroll this host: make its keys, present them with the token, pin the controller."""
    try:
        controllers = enrollment.parse_controllers(controller)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--controller") from None
    if (token is None) == (token_file is None):
        raise typer.BadParameter(
            "give the token in CKMS_AGENT_ENROLL_TOKEN, with --token-file, or with --token",
            param_hint="--token",
        )
    config_path = config or DEFAULT_CONFIG_PATH
    try:
        setup_logging(log_level, ssh_debug=ssh_debug)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    with _one_line_errors():
        if token_file is not None:
            token = _read_token(token_file)
        assert token is not None
        cfg = asyncio.run(
            enrollment.enroll(
                controllers=controllers,
                token=token,
                host_key_fingerprint=host_key_fingerprint,
                state_dir=state_dir,
                config_path=config_path,
                root=root,
                force=force,
                wrap_suite=wrap_suite,
                policy={"allowed_paths": tuple(allow_path)} if allow_path else None,
            )
        )
    labels = ",".join(f"{k}={v}" for k, v in sorted(cfg.labels.items())) or "none"
    typer.echo(f"enrolled as host {cfg.host_id} (labels {labels})")
    typer.echo(
        f"config written to {config_path}; start with: ckms-agent run --config {config_path}"
    )


def _read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped); ConfigError if unreadable."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --token-file {path}: {type(exc).__name__}") from None


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the agent daemon until SIGTERM/SIGINT (a clean stop)."""
    code = run_daemon(config)
    if code:
        raise typer.Exit(code)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what this host holds, its last controller contact, staleness and pending acks."""
    with _one_line_errors():
        cfg = load_config(config)
        report = asyncio.run(collect_status(cfg))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        typer.echo(render_text(report))


def main() -> None:
    """Run the full command line (``ckms_agent.cli.main`` is the console script)."""
    app()
