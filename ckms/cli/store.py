"""``ckms store``: the controller's store itself, beside a stopped controller.

``migrate`` applies the schema migrations this ckms has to the configured store (the
controller does on start; replicas upgrading one by one want it done once, first). ``copy``
moves a whole store into a new, empty one: how a SQLite store moves to PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._client import run
from ckms.cli._common import JsonOption
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._render import console, print_json
from ckms.controller.home import load_settings
from ckms.controller.storetools import copy_store, migrate_store, read_password_file

app = typer.Typer(help="The controller's store: migrate it, copy it to a new one.")

PASSWORD_HELP = "a file (mode 0600) holding the PostgreSQL password (default: PGPASSWORD)"  # noqa: S105


def _password(path: Path | None, what: str) -> str | None:
    return None if path is None else read_password_file(path, what)


@app.command("migrate")
def migrate(
    config: Annotated[
        Path | None, typer.Option("--config", help="The controller's controller.toml.")
    ] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", help="Instead of --config: sqlite:PATH or postgresql://..."),
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help=f"With --store: {PASSWORD_HELP}.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Apply the pending schema migrations to the store and report its version."""
    with cli_errors():
        if (config is None) == (store is None):
            raise UsageError("give --config or --store (one of them)")
        if config is not None:
            settings = load_settings(config)
            location, password = str(settings.store_url), settings.store_password()
        else:
            assert store is not None
            location, password = store, _password(password_file, "--password-file")
        result = run(migrate_store(location, password=password))
    if as_json:
        print_json(
            {
                "store": result.store,
                "engine": result.engine,
                "applied": result.applied,
                "schema_version": result.version,
            }
        )
        return
    applied = ", ".join(map(str, result.applied)) if result.applied else "none (up to date)"
    console().print(
        f"{result.store}: schema version {result.version}; migrations applied now: {applied}"
    )


@app.command("copy")
def copy(
    source: Annotated[
        str, typer.Option("--from", help="The store to copy: sqlite:PATH (or a URL).")
    ],
    target: Annotated[
        str, typer.Option("--to", help="The new, empty store: postgresql://user@host:port/db.")
    ],
    from_password_file: Annotated[
        Path | None, typer.Option("--from-password-file", help=f"For --from: {PASSWORD_HELP}.")
    ] = None,
    to_password_file: Annotated[
        Path | None, typer.Option("--to-password-file", help=f"For --to: {PASSWORD_HELP}.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Copy every table of a store into a new, empty one, in one transaction on the target.

    Stop the controller first. The source's audit log must verify; the copy's is verified
    afterwards (same size and head). Then point controller.toml's store at the target (with
    store_password_file) and start the controller; `ckms audit verify` checks it again."""
    with cli_errors():
        result = run(
            copy_store(
                source,
                target,
                source_password=_password(from_password_file, "--from-password-file"),
                target_password=_password(to_password_file, "--to-password-file"),
            )
        )
    rows = sum(result.copied.rows.values())
    if as_json:
        print_json(
            {
                "from": result.source,
                "to": result.target,
                "rows": result.copied.rows,
                "schema_version": result.copied.schema_version,
                "last_event_seq": result.copied.last_event_seq,
                "audit_ok": result.audit.ok,
                "audit_size": result.audit.size,
                "audit_head": result.audit.head_hash,
            }
        )
        return
    console().print(
        f"copied {rows} rows in {len(result.copied.rows)} tables from {result.source} to "
        f"{result.target}; audit log verified there: {result.audit.size} records, head "
        f"{result.audit.head_hash[:16]}…"
    )
