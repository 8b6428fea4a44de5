"""Dual-control requests are bound to the root KEK: a request edited with sqlite3 is refused.

The attack: the database file's owner swaps the parameters (destroy another version, another
key) or the requester of a pending request, so an approver approves something other than what
was asked, or approves their own request under someone else's name. Before approvals carried a
MAC, the edited row was shown, approved and run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ckms.controller import rowmac
from ckms.controller.approvals import ApprovalBook
from ckms.controller.sealing import Vault, init_controller
from ckms.errors import IntegrityError
from ckms.store import Store
from ckms.store import audit as audit_log

PASSPHRASE = "a passphrase long enough for tests"


@pytest.fixture
async def pending(tmp_path: Path) -> tuple[Path, str]:
    """A closed store with one pending request by alice: destroy payments/db version 1."""
    path = tmp_path / "controller.db"
    async with await Store.open(path) as store:
        await init_controller(store, passphrase=PASSPHRASE)
        await Vault(store).unseal_with_passphrase(PASSPHRASE)
        request = await ApprovalBook(store).create(
            "key.destroy",
            {"name": "payments/db", "version": 1},
            requester="alice",
            object="key:payments/db",
            role="admin",
        )
    return path, request.id


async def _book(path: Path) -> tuple[Store, ApprovalBook]:
    store = await Store.open(path)
    await Vault(store).unseal_with_passphrase(PASSPHRASE)
    return store, ApprovalBook(store)


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            "UPDATE approvals SET params = json_set(params, '$.params.version', 2)", id="params"
        ),
        pytest.param("UPDATE approvals SET requester = 'bob'", id="requester"),
        pytest.param("UPDATE approvals SET operation = 'key.revoke'", id="operation"),
        pytest.param("UPDATE approvals SET expires_at = '2999-01-01T00:00:00Z'", id="expiry"),
        pytest.param("UPDATE approvals SET mac = NULL", id="mac-dropped"),
    ],
)
async def test_an_edited_request_is_refused(pending: tuple[Path, str], statement: str) -> None:
    path, request_id = pending
    with sqlite3.connect(path) as raw:
        raw.execute(statement)
    store, book = await _book(path)
    try:
        with pytest.raises(IntegrityError, match=f"request {request_id} failed integrity check"):
            await book.get(request_id)
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await book.list()
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await book.claim(request_id, approver="carol", role="admin")
    finally:
        await store.close()


async def test_an_untouched_request_is_approved_and_stays_bound(
    pending: tuple[Path, str],
) -> None:
    path, request_id = pending
    store, book = await _book(path)
    try:
        claimed = await book.claim(request_id, approver="carol", role="admin")
        assert claimed.state == "approved" and claimed.params["version"] == 1
        done = await book.finish(request_id, actor="alice+carol")
        assert done.state == "executed"
    finally:
        await store.close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE approvals SET state = 'pending'")
    store, book = await _book(path)
    try:
        with pytest.raises(IntegrityError):
            await book.get(request_id)
    finally:
        await store.close()


async def test_a_store_bound_at_level_2_has_its_requests_bound_at_unseal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests stored by the version before approvals carried a MAC are bound once."""
    path = tmp_path / "controller.db"
    with monkeypatch.context() as m:
        m.setattr(rowmac, "BIND_LEVEL", 2)
        async with await Store.open(path) as store:
            await init_controller(store, passphrase=PASSPHRASE)
            await Vault(store).unseal_with_passphrase(PASSPHRASE)
            request = await ApprovalBook(store).create(
                "key.destroy", {"name": "a/b", "version": 1}, requester="alice",
                object="key:a/b", role="admin",
            )  # fmt: skip
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE approvals SET mac = NULL")
    store, book = await _book(path)
    try:
        binds = [
            r.details for r in await audit_log.load_records(store) if r.action == rowmac.BIND_ACTION
        ]
        assert binds[-1] == {"rows": 1, "level": 3, "from_level": 2}
        assert (await book.get(request.id)).requester == "alice"
    finally:
        await store.close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE approvals SET requester = 'bob'")
    store, book = await _book(path)
    try:
        with pytest.raises(IntegrityError):
            await book.get(request.id)
    finally:
        await store.close()
