"""Failed audit appends are counted (``ckms_audit_append_failures_total``)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ckms.errors import AuditError
from ckms.store import Store
from ckms.store import audit as audit_log


async def test_a_failed_append_is_counted_once(mem_store: Store) -> None:
    async with mem_store.write() as tx:
        await tx.execute(
            "CREATE TRIGGER no_audit BEFORE INSERT ON audit "
            "BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"
        )
    before = audit_log.append_failures.count
    with pytest.raises(AuditError):
        async with mem_store.write() as tx:
            await audit_log.append(
                tx, now=datetime.now(UTC), actor="a", action="key.rotate", object="key:a/b"
            )
    assert audit_log.append_failures.count == before + 1
