"""Failed audit appends are counted (``ckms_audit_append_failures_total``)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ckms.errors import AuditError
from ckms.store import Store
from ckms.store import audit as audit_log
from tests.support.stores import refuse_audit_inserts


async def test_a_failed_append_is_counted_once(mem_store: Store) -> None:
    await refuse_audit_inserts(mem_store)
    before = audit_log.append_failures.count
    with pytest.raises(AuditError):
        async with mem_store.write() as tx:
            await audit_log.append(
                tx, now=datetime.now(UTC), actor="a", action="key.rotate", object="key:a/b"
            )
    assert audit_log.append_failures.count == before + 1
