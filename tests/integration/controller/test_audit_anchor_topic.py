"""The audit anchor on Kafka: a controller restarted over a cut log refuses to go on, and an
offline verification against the topic's anchor finds the cut. Real controller, Kafka, SQLite."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.controller.service import Controller
from ckms.errors import AuditAnchorError
from ckms.protocol import admin as api
from ckms.store import audit as audit_log
from tests.support.cli import run_cli
from tests.support.controller import running_controller
from tests.support.fleet import wait_until
from tests.support.kafka import tls_options

pytestmark = pytest.mark.kafka


async def _anchored(c: Controller) -> audit_log.AuditCheckpoint:
    """Sign a checkpoint now and wait until it is on the anchor topic."""
    await wait_until(lambda: c.vault.anchor.loaded, what="anchor read back")
    cp = await c.vault.checkpoint_audit()
    await wait_until(lambda: c.vault.anchor.published_size == cp.size, what="anchor published")
    return cp


async def _export(c: Controller, path: Path) -> None:
    assert c.store is not None
    lines = [line async for line in audit_log.export_jsonl(c.store)]
    await asyncio.to_thread(path.write_text, "".join(line + "\n" for line in lines))


async def test_a_controller_restarted_over_a_cut_log_refuses_to_sign_or_audit(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    home = tmp_path / "ctl"
    topics = (unique_topic("events"), unique_topic("fleet"))
    audit_topic = unique_topic("audit")
    async with running_controller(home, controller_kafka, *topics, audit_topic=audit_topic) as c:
        for n in range(3):
            await c.lifecycle.create(f"app/k{n}", "aes-256", actor="alice")
        first = await _anchored(c)
        for n in range(3, 5):
            await c.lifecycle.create(f"app/k{n}", "aes-256", actor="alice")
        last = await _anchored(c)
        public = await c.vault.public_key()
    assert last.size > first.size and last.prev_size == first.size

    # A clean restart: the log extends the anchor; work goes on and is anchored further.
    async with running_controller(home, controller_kafka, *topics, audit_topic=audit_topic) as c:
        await wait_until(lambda: c.vault.anchor.loaded, what="anchor read back")
        assert c.vault.anchor.broken is None and c.vault.anchor.last is not None
        assert c.vault.anchor.last.size == last.size
        await c.lifecycle.create("app/k5", "aes-256", actor="alice")
        last = await _anchored(c)

    # The file's owner cuts the log and its checkpoints back to the first anchor.
    with sqlite3.connect(home / "controller.db") as raw:
        raw.execute("DROP TRIGGER audit_no_delete")
        raw.execute("DELETE FROM audit WHERE idx >= ?", (first.size,))
        raw.execute("DELETE FROM audit_checkpoints WHERE size > ?", (first.size,))

    async with running_controller(home, controller_kafka, *topics, audit_topic=audit_topic) as c:
        await wait_until(lambda: c.vault.anchor.broken is not None, what="the cut noticed")
        assert "truncated" in (c.vault.anchor.broken or "")
        with pytest.raises(AuditAnchorError):
            await c.vault.checkpoint_audit()
        with pytest.raises(AuditAnchorError, match="refused until it is restored"):
            await c.lifecycle.create("app/evil", "aes-256", actor="mallory")
        status = await c.admin.status(None, api.Empty())  # type: ignore[arg-type]
        assert status.audit_anchor is not None and status.audit_anchor.broken
        assert status.audit_anchor.size == last.size
        await _export(c, tmp_path / "export.jsonl")

    key = base64.b64encode(public).decode()
    offline = await run_cli(
        "audit", "verify", "--file", str(tmp_path / "export.jsonl"), "--signing-key", key,
        "--anchor-from-kafka", "--kafka-bootstrap", controller_kafka.bootstrap,
        "--audit-topic", audit_topic, *tls_options(controller_kafka),
    )  # fmt: skip
    assert offline.rc == 1, offline.stdout + offline.stderr
    # Unsealing the third start appended a record before the anchor was read back, so the log
    # holds first.size + 1 records: the first one missing is named.
    assert f"first bad record {first.size + 1}: log truncated" in offline.stderr
    by_text = await run_cli(
        "audit", "verify", "--file", str(tmp_path / "export.jsonl"), "--signing-key", key,
        "--anchor", f"{last.size}:{last.head_hash}",
    )  # fmt: skip
    assert by_text.rc == 1 and "truncated" in by_text.stderr
    alone = await run_cli(
        "audit", "verify", "--file", str(tmp_path / "export.jsonl"), "--signing-key", key
    )
    assert alone.rc == 0, alone.stderr  # what the file alone can show: nothing wrong
