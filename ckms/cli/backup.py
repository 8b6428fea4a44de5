"""``ckms backup`` (a consistent copy of a running controller's store, over the admin RPC) and
``ckms restore`` (that copy into a new home, checked against the audit log and its anchor)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from ckms.cli._client import run
from ckms.cli._common import JsonOption, conn
from ckms.cli._errors import UsageError, cli_errors
from ckms.cli._parse import parse_controller
from ckms.cli._render import console, err_console, print_json
from ckms.controller.home import load_settings
from ckms.controller.restore import restore_home
from ckms.controller.service import ControllerSettings
from ckms.errors import IntegrityError
from ckms.protocol import admin as api


def backup(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the backup.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    backup_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Fetch this backup, made earlier by an approved dual-control request "
            "(`ckms approve` prints its id), instead of making one now.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Copy the running controller's store (material stays sealed) to FILE, mode 0600.

    The controller makes one consistent copy while it keeps serving (SQLite's online backup);
    this command fetches it in chunks, checks its size and SHA-256, writes it atomically and
    removes the controller's copy. Admins only; audited as controller.backup. Where the
    controller's settings put backups under dual control, this makes a request instead; once
    another admin approved it, fetch the backup it made with --id."""
    with cli_errors():
        if output.exists() and not force:
            raise UsageError(f"{output} already exists (give another name, or --force)")
        connection = conn(ctx)

        async def go() -> api.BackupInfo:
            async with connection.session() as session:
                if backup_id is None:
                    info = await session.call("backup.create", api.Empty(), api.BackupInfo)
                else:
                    info = await session.call(
                        "backup.info", api.BackupRef(id=backup_id), api.BackupInfo
                    )
                digest = hashlib.sha256()
                tmp = output.parent / f".{output.name}.{secrets.token_hex(4)}.part"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        offset = 0
                        while offset < info.size:
                            chunk = await session.call(
                                "backup.read",
                                api.BackupReadParams(id=info.id, offset=offset),
                                api.BackupChunk,
                            )
                            data = _chunk(chunk)
                            if not data:
                                raise IntegrityError(f"backup {info.id} ended early")
                            out.write(data)
                            digest.update(data)
                            offset += len(data)
                        out.flush()
                        os.fsync(out.fileno())
                    if offset != info.size or digest.hexdigest() != info.sha256:
                        raise IntegrityError(
                            f"backup {info.id} arrived with another size or SHA-256 than the "
                            "controller made; nothing was written"
                        )
                    if output.exists() and not force:
                        raise UsageError(f"{output} already exists (give another name, or --force)")
                    os.replace(tmp, output)  # atomic: the whole verified file, or none
                finally:
                    tmp.unlink(missing_ok=True)
                await session.call("backup.delete", api.BackupRef(id=info.id), api.BackupDeleted)
                return info

        info = run(go())
    if as_json:
        print_json({"output": str(output), **info.model_dump(mode="json")})
        return
    console().print(
        f"wrote {output} ({info.size} bytes, sha256 {info.sha256[:16]}…): {info.keys} keys, "
        f"{info.versions} versions, audit log of {info.audit_size} records, head "
        f"{info.audit_head[:16]}…, last checkpoint at {info.checkpoint_size or 0} records"
    )


def _chunk(chunk: api.BackupChunk) -> bytes:
    try:
        return base64.b64decode(chunk.data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError("a backup chunk is not base64") from None


def restore(
    backup_file: Annotated[Path, typer.Argument(help="A file `ckms backup` wrote.")],
    home: Annotated[Path, typer.Option("--home", help="The new controller home (empty).")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Start from these settings (the original home's controller.toml); the home "
            "is rewritten to --home.",
        ),
    ] = None,
    kafka: Annotated[
        str | None, typer.Option("--kafka", help="Kafka bootstrap servers (default: --config's).")
    ] = None,
    listen: Annotated[
        str | None, typer.Option("--listen", help="SSH listen address HOST:PORT.")
    ] = None,
    host_key: Annotated[
        Path | None,
        typer.Option(
            "--host-key",
            help="The original home's ssh_host_ed25519_key: agents pin it (without it a new "
            "one is made, and enrolled agents refuse the controller until re-enrolled).",
        ),
    ] = None,
    no_anchor_check: Annotated[
        bool,
        typer.Option(
            "--no-anchor-check",
            help="Do not compare the backup's audit head with the anchor on Kafka.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Restore a backup into a new home: check the file, verify its audit log, check that it
    is not older than the last published audit anchor, then write the home (atomically).

    Then: `ckms controller run --config HOME/controller.toml`, unseal, `ckms audit verify`."""
    with cli_errors():
        settings = load_settings(config) if config is not None else ControllerSettings(home=home)
        update: dict[str, object] = {"home": home}
        if kafka is not None:
            update["kafka_bootstrap"] = kafka
        if listen is not None:
            host, port = parse_controller(listen, option="--listen", allow_any_port=True)
            update |= {"listen_host": host, "listen_port": port}
        settings = ControllerSettings.model_validate({**settings.model_dump(), **update})
        result = run(
            restore_home(
                backup_file,
                home,
                settings=settings,
                host_key=host_key,
                check_anchor=not no_anchor_check,
            )
        )
    report = result.report
    facts = {
        "home": str(result.home),
        "config": str(result.config_path),
        "keys": result.facts.keys,
        "versions": result.facts.versions,
        "sha256": result.facts.sha256,
        "audit_ok": report.ok,
        "audit_size": report.size,
        "audit_head": report.head_hash,
        "checkpoints_verified": report.checkpoints_verified,
        "anchor_checked": result.anchor_checked,
        "anchor_size": result.anchor_size,
        "event_seq": result.event_seq,
        "host_key": result.host_key,
    }
    if as_json:
        print_json(facts)
        return
    anchor = (
        "not checked"
        if not result.anchor_checked
        else "none published"
        if result.anchor_size is None
        else f"extended (anchor at {result.anchor_size} records)"
    )
    console().print(
        f"restored {result.facts.keys} keys into {result.home}; audit log verified: "
        f"{report.size} records, {report.checkpoints_verified} checkpoints, head "
        f"{report.head_hash[:16]}…; anchor {anchor}; host key {result.host_key}"
    )
    err_console().print(
        f"next: ckms controller run --config {result.config_path}, unseal, ckms audit verify"
    )
