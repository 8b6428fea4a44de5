"""Restoring a backup (:mod:`ckms.controller.backup`) into a new controller home.

A restore (``ckms restore``) runs without a controller: it checks the file (SQLite integrity,
a schema this code knows, an initialised store), builds the new home beside its final path,
verifies the restored audit log (hash chain, every checkpoint and their chain) and, when the
anchor topic holds an anchor of this controller, that the restored log extends it: a backup
older than the last published anchor would silently cut the audit log, and the controller
would refuse to sign over it anyway (:mod:`ckms.controller.anchor`). Only then is the home
renamed into place; a refused restore leaves nothing behind. The event sequence continues
after the newest event the controller signed on the events topic, since agents drop an event at
or below the last one they applied (:func:`_lift_sequence`).

The SSH host key is not in the store: agents pin it, so a restore is given the original
home's key file (``--host-key``) or makes a new one, which enrolled agents refuse until they
are enrolled again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from ckms._kafka import read_newest, read_tails
from ckms.controller.backup import BackupFacts, inspect_backup
from ckms.controller.home import CONFIG_FILE, write_settings
from ckms.controller.sealing import META_SIGNING_PUBLIC
from ckms.controller.service import ControllerSettings
from ckms.crypto import signer_key_id
from ckms.errors import (
    AlreadyExistsError,
    AuditVerificationError,
    ConfigError,
    KafkaUnavailableError,
)
from ckms.protocol import MessageRejected, verify_message
from ckms.store import Store, outbox
from ckms.store import audit as audit_log

__all__ = ["RestoreResult", "restore_home"]


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did and checked."""

    home: Path
    config_path: Path
    facts: BackupFacts
    report: audit_log.AuditReport
    anchor_size: int | None
    """The anchor on the topic the restored log extends (None: no anchor was checked)."""
    anchor_checked: bool
    event_seq: int | None
    """The event sequence the restored controller continues after (lifted to the newest
    published one, so agents do not drop its events as replays); None when not checked."""
    host_key: str
    """``kept`` (the original host key) or ``new``."""


async def restore_home(
    backup: Path,
    home: Path,
    *,
    settings: ControllerSettings,
    host_key: Path | None = None,
    check_anchor: bool = True,
    anchor_timeout_s: float = 30.0,
) -> RestoreResult:
    """Restore ``backup`` into the new ``home`` with ``settings`` (their ``home`` is replaced).

    Refuses (and leaves nothing) when the file is not an intact store, the home exists and is
    not empty, the audit log does not verify, or, with ``check_anchor``, the restored log does
    not extend the newest anchor of its controller on ``settings.audit_topic`` (or Kafka
    cannot say).
    """
    home, staging, facts = await asyncio.to_thread(_stage, backup, home, settings, host_key)
    try:
        store = await Store.open(settings.model_copy(update={"home": staging}).db_path)
        try:
            public = await store.get_meta(META_SIGNING_PUBLIC)
            assert public is not None  # inspect_backup checked it
            report = await audit_log.verify_store(store, public)
            if not report.ok:
                raise AuditVerificationError(
                    f"the backup's audit log does not verify: {report.reason}",
                    report.first_bad_index,
                )
            anchor_size = seq = None
            if check_anchor:
                anchor_size = await _check_anchor(store, public, settings, anchor_timeout_s)
                seq = await _lift_sequence(store, public, settings, anchor_timeout_s)
        finally:
            await store.close()
        await asyncio.to_thread(_finish, staging, home, settings)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        raise
    return RestoreResult(
        home=home,
        config_path=home / CONFIG_FILE,
        facts=facts,
        report=report,
        anchor_size=anchor_size,
        anchor_checked=check_anchor,
        event_seq=seq,
        host_key="kept" if host_key is not None else "new",
    )


def _stage(
    backup: Path, home: Path, settings: ControllerSettings, host_key: Path | None
) -> tuple[Path, Path, BackupFacts]:
    """Check the file and the target, and copy the store (and host key) into a staging
    directory beside the new home; return (home, staging, facts)."""
    home = home.expanduser().resolve()
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise AlreadyExistsError(f"{home} exists and is not empty: restore into a new home")
    facts = inspect_backup(backup)
    if host_key is not None and not host_key.is_file():
        raise ConfigError(f"host key {host_key} is not a file")
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = home.parent / f".{home.name}.restore-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        staged = settings.model_copy(update={"home": staging})
        shutil.copyfile(backup, staged.db_path)
        os.chmod(staged.db_path, 0o600)
        if host_key is not None:
            shutil.copyfile(host_key, staged.host_key_path)
            os.chmod(staged.host_key_path, 0o600)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return home, staging, facts


def _finish(staging: Path, home: Path, settings: ControllerSettings) -> None:
    """Write the settings (naming the final home) and move the staged home into place."""
    write_settings(staging / CONFIG_FILE, settings.model_copy(update={"home": home}))
    if home.exists():
        home.rmdir()  # empty, checked when staged
    os.replace(staging, home)


async def _check_anchor(
    store: Store, public: bytes, settings: ControllerSettings, timeout_s: float
) -> int | None:
    """The size of the newest published anchor the restored log extends (None: no anchor);
    AuditVerificationError if the log is older than it or does not extend it."""
    topic = settings.audit_topic
    kid = signer_key_id(public)
    try:
        value = await read_newest(
            settings.kafka, topic, key=kid.encode(), timeout_s=timeout_s
        )
    except KafkaUnavailableError as exc:
        raise KafkaUnavailableError(
            f"cannot read the audit anchor on {topic} to check the backup against it ({exc}); "
            "retry when Kafka is reachable (or --no-anchor-check, knowing a cut log would go "
            "unnoticed until the controller starts)"
        ) from None
    if value is None:
        return None
    try:
        anchor = audit_log.Anchor.of(audit_log.parse_checkpoint_line(value))
    except ValueError:
        raise AuditVerificationError(
            f"the newest record of {kid} on {topic} is not a checkpoint"
        ) from None
    problem = await audit_log.anchor_problem(store, anchor, public)
    if problem is not None:
        async with store.read() as r:
            size = int(await r.fetchval("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit") or 0)
        older = size < anchor.size
        raise AuditVerificationError(
            (
                f"the backup's audit log ({size} records) is older than the last published "
                f"anchor ({anchor.size} records): restoring it would cut the audit log; use a "
                "backup taken after that checkpoint"
                if older
                else f"the backup's audit log does not extend the last published anchor: {problem}"
            ),
            None,
        )
    return anchor.size


_TAIL = 100
"""Records read from the end of each events partition: the newest genuine event is among them
unless someone who may write the topic buried it (then agents still converge, through sync)."""


async def _lift_sequence(
    store: Store, public: bytes, settings: ControllerSettings, timeout_s: float
) -> int:
    """Continue the event sequence after the newest event this controller published (on the
    events or the fleet topic).

    Events published after the backup was taken carry sequence numbers the backup also hands
    out again; agents drop an event at or below the last one they applied, so the restored
    controller's events would be ignored until its sequence passed theirs. Only records that
    verify under this controller's signing key count (a forged huge ``seq`` moves nothing).
    """
    kid = signer_key_id(public)
    newest = 0
    tails = []
    # Both topics take their seq from the one outbox sequence: continuing after the newest
    # event alone would hand out again seqs fleet.acked took, which readers of the fleet topic
    # drop as replays, and which a new publisher marks sent from the fleet topic's tail.
    for topic in dict.fromkeys((settings.events_topic, settings.fleet_topic)):
        tails += await read_tails(settings.kafka, topic, per_partition=_TAIL, timeout_s=timeout_s)
    for value, headers in tails:
        try:
            envelope = verify_message(value, headers, {kid: public})
        except MessageRejected:
            continue
        newest = max(newest, envelope.seq)
    async with store.write() as tx:
        return await outbox.continue_seq(tx, newest)
