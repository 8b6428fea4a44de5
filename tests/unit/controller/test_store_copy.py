"""``ckms store copy``'s checks: a source whose audit log does not verify is not copied (the copy
would carry the tampering along, looking fresh); a copy continues where its source stopped
(event sequence, history ids) and goes back the other way too."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckms.controller.lifecycle import Lifecycle
from ckms.controller.sealing import Vault, init_controller
from ckms.controller.storetools import copy_store
from ckms.errors import AuditVerificationError
from ckms.store import Store, outbox
from tests.support.postgres import PostgresDatabase
from tests.support.stores import StoreTarget

pytestmark = pytest.mark.postgres

PASSPHRASE = "a passphrase long enough for tests"


async def _source(path: Path) -> StoreTarget:
    target = StoreTarget.sqlite(path)
    async with await target.open() as store:
        await init_controller(store, passphrase=PASSPHRASE)
        vault = Vault(store)
        await vault.unseal_with_passphrase(PASSPHRASE)
        lifecycle = Lifecycle(store, vault)
        await lifecycle.create("app/db", "aes-256", actor="alice")
        await lifecycle.rotate("app/db", actor="alice")
    return target


async def _lifecycle(store: Store) -> Lifecycle:
    vault = Vault(store)
    await vault.unseal_with_passphrase(PASSPHRASE)
    return Lifecycle(store, vault)


async def test_a_copy_continues_where_its_source_stopped_and_copies_back(
    tmp_path: Path, postgres_database: PostgresDatabase
) -> None:
    source = await _source(tmp_path / "controller.db")
    pg = StoreTarget.postgresql(postgres_database)
    result = await copy_store(f"sqlite:{source.location}", pg.location, target_password=pg.password)
    assert result.audit.ok and result.copied.rows["key_versions"] == 2
    async with await pg.open() as store:
        lifecycle = await _lifecycle(store)  # row MACs check under the same root KEK
        before = await outbox.all_events(store)
        await lifecycle.rotate("app/db", actor="alice")  # a new history id, a new event
        after = await outbox.all_events(store)
        assert after[-1].seq == before[-1].seq + 1
        assert len(await lifecycle.history("app/db")) == 3  # its id came after the copied ones
    back = tmp_path / "back.db"
    again = await copy_store(pg.location, f"sqlite:{back}", source_password=pg.password)
    assert again.audit.size == result.audit.size + 2  # the unseal and rotation there came too
    async with await Store.open(back) as store:
        assert [v.version for v in (await (await _lifecycle(store)).get("app/db")).versions] == [
            1,
            2,
            3,
        ]


async def test_a_source_whose_audit_log_does_not_verify_is_not_copied(
    tmp_path: Path, postgres_database: PostgresDatabase
) -> None:
    source = await _source(tmp_path / "controller.db")
    await source.tamper("UPDATE audit SET actor = 'mallory' WHERE idx = 1")
    pg = StoreTarget.postgresql(postgres_database)
    with pytest.raises(AuditVerificationError, match="nothing copied"):
        await copy_store(f"sqlite:{source.location}", pg.location, target_password=pg.password)
    # Refused before the target was even opened: not a table made there.
    assert await pg.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
