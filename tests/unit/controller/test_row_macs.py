"""Rows whose meaning matters are bound to the root KEK: edits by the database's owner are
refused, on SQLite and on PostgreSQL.

Every attack here is done on the real database with a plain connection of the owner's own
(sqlite3 on the file, a superuser connection to PostgreSQL) while the controller is stopped,
then the controller is opened and unsealed again, as after a restart. Before rows carried a
MAC, each of these edits was read back and acted on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.controller import rowmac
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import Targets
from ckms.controller.operators import OperatorRegistry
from ckms.controller.sealing import InitResult, Vault, init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.crypto import KeyType, generate_signing_key, signing_public_key
from ckms.errors import IntegrityError
from ckms.protocol import RevocationReason
from ckms.ssh import generate_ssh_key, public_key_text
from ckms.store import Store
from ckms.store import audit as audit_log
from tests.support.stores import StoreTarget

NAME = "payments/db"
PASSPHRASE = "a passphrase long enough for tests"


@pytest.fixture
async def bound_file(store_target: StoreTarget) -> AsyncIterator[tuple[StoreTarget, InitResult]]:
    """A closed store: one key targeting host web-1 (v1 compromised, v2 active), operators."""
    path = store_target
    async with await path.open() as store:
        result = await init_controller(store, passphrase=PASSPHRASE)
        vault = Vault(store)
        await vault.unseal_with_passphrase(PASSPHRASE)
        lifecycle = Lifecycle(store, vault)
        await lifecycle.create(
            NAME, KeyType.AES_256, targets=Targets(hosts=("web-1",)), actor="alice"
        )
        await lifecycle.rotate(NAME, actor="alice")
        await lifecycle.revoke(NAME, RevocationReason.KEY_COMPROMISE, version=1, actor="alice")
        operators = OperatorRegistry(store)
        await operators.add("alice", "admin", public_key_text(generate_ssh_key()), actor="t")
        await operators.add("audra", "auditor", public_key_text(generate_ssh_key()), actor="t")
    yield path, result


async def _edit(target: StoreTarget, *statements: str, params: tuple[object, ...] = ()) -> None:
    await target.tamper(*statements, params=params)


def _json_set(target: StoreTarget, column: str, field: str, value: str) -> str:
    """SQL setting one field of a JSON text column to the JSON ``value``, as the owner of each
    engine would write it."""
    if target.engine == "sqlite":
        return f"json_set({column}, '$.{field}', json('{value}'))"
    return f"jsonb_set({column}::jsonb, '{{{field}}}', '{value}')::text"


async def _unsealed(path: StoreTarget) -> tuple[Store, Vault]:
    store = await path.open()
    vault = Vault(store)
    await vault.unseal_with_passphrase(PASSPHRASE)
    return store, vault


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param('UPDATE keys SET targets = {json:targets:hosts:["evil-1"]}', id="targets"),
        pytest.param(
            'UPDATE keys SET install = {json:install:path:"/tmp/{purpose}.key"}',
            id="install-spec",
        ),
        pytest.param('UPDATE keys SET policy = {json:policy:grace:"P3650D"}', id="policy"),
        pytest.param("UPDATE keys SET primary_version = 1", id="primary"),
        pytest.param("UPDATE key_versions SET state = 'Active' WHERE version = 1", id="state"),
        pytest.param(
            "UPDATE key_versions SET revocation_reason = NULL WHERE version = 1", id="reason"
        ),
        pytest.param("UPDATE key_versions SET mac = NULL WHERE version = 2", id="mac-dropped"),
    ],
)
async def test_an_edited_key_row_is_refused_with_an_integrity_error(
    bound_file: tuple[StoreTarget, InitResult], statement: str
) -> None:
    path, _ = bound_file
    if "{json:" in statement:
        head, spec = statement.split("{json:", 1)
        column, field, value = spec.removesuffix("}").split(":", 2)
        statement = head + _json_set(path, column, field, value)
    await _edit(path, statement)
    store, vault = await _unsealed(path)
    try:
        lifecycle = Lifecycle(store, vault)
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await lifecycle.get(NAME)
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await lifecycle.current_keys()  # what agents' sync and fetch are answered from
    finally:
        await store.close()


async def test_an_untouched_store_reads_back(bound_file: tuple[StoreTarget, InitResult]) -> None:
    path, _ = bound_file
    store, vault = await _unsealed(path)
    try:
        key = await Lifecycle(store, vault).get(NAME)
        assert key.targets.hosts == ("web-1",)
        assert [str(v.state) for v in key.versions] == ["Compromised", "Active"]
        assert [op.role for op in await OperatorRegistry(store).list()] == ["admin", "auditor"]
    finally:
        await store.close()


async def test_an_operator_given_a_role_in_the_file_cannot_log_in(
    bound_file: tuple[StoreTarget, InitResult], tmp_path: Path
) -> None:
    """An auditor made admin with sqlite3: the registry refuses the row and so does login."""
    path, _ = bound_file
    key = generate_ssh_key()
    await _edit(
        path,
        "UPDATE operators SET role = 'admin', ssh_public_key = ? WHERE name = 'audra'",
        params=(public_key_text(key),),
    )
    database = path.database
    settings = ControllerSettings(
        home=tmp_path / "home",
        listen_port=0,
        store=path.location,
        store_password_file=None if database is None else database.password_file,
    )
    controller = Controller(settings)
    await controller.open()
    try:
        assert controller.store is not None
        await controller.vault.unseal_with_passphrase(PASSPHRASE)
        with pytest.raises(IntegrityError, match="operator audra failed integrity check"):
            await OperatorRegistry(controller.store).get("audra")
        assert await controller.authenticate("audra", key) is None
    finally:
        await controller.close()


async def test_an_edited_signing_public_key_stops_unseal(
    bound_file: tuple[StoreTarget, InitResult],
) -> None:
    """Enrollment hands the signing public key to agents to pin: a swapped one is refused."""
    path, _ = bound_file
    await _edit(
        path,
        "UPDATE meta SET value = ? WHERE name = 'signing.public_key'",
        params=(signing_public_key(generate_signing_key()),),
    )
    async with await path.open() as store:
        vault = Vault(store)
        with pytest.raises(IntegrityError, match="signing public key failed integrity check"):
            await vault.unseal_with_passphrase(PASSPHRASE)
        assert vault.sealed


async def test_a_removed_binding_marker_stops_unseal(
    bound_file: tuple[StoreTarget, InitResult],
) -> None:
    """Deleting the marker (and every MAC) so that unseal binds edited rows afresh does not
    work: the audit log says the rows were bound before."""
    path, _ = bound_file
    await _edit(
        path,
        "DELETE FROM meta WHERE name = 'rows.bound'",
        "UPDATE keys SET mac = NULL, targets = "  # noqa: S608 - the test is the attacker
        + _json_set(path, "targets", "hosts", '["evil-1"]'),
        "UPDATE key_versions SET mac = NULL",
        "UPDATE operators SET mac = NULL",
    )
    async with await path.open() as store:
        vault = Vault(store)
        with pytest.raises(IntegrityError, match="marker is gone"):
            await vault.unseal_with_passphrase(PASSPHRASE)
        assert vault.sealed and store.row_key is None


async def test_rows_written_before_binding_are_bound_at_the_first_unseal(
    store_target: StoreTarget,
) -> None:
    """A store whose rows were written before rows carried MACs (an operator added at init, a
    key row by an older controller) is bound once, at its first unseal; edits after that are
    refused."""
    path = store_target
    async with await path.open() as store:
        await init_controller(store, passphrase=PASSPHRASE)
        await OperatorRegistry(store).add(
            "alice", "admin", public_key_text(generate_ssh_key()), actor="init"
        )
    await _edit(
        path,
        "INSERT INTO keys(id, name, key_type, usage, policy, targets, install, created_at, "
        "created_by, updated_at) SELECT 'k-1', 'old/key', 'aes-256', 'decrypt,encrypt', "
        "policy, targets, install, '2025-01-01T00:00:00Z', 'old', '2025-01-01T00:00:00Z' "
        "FROM (SELECT '{}' AS policy, '{\"hosts\": [], \"selectors\": []}' AS targets, "
        '\'{"path": "/etc/ckms/{team}/{purpose}.key"}\' AS install) AS old',
    )
    assert await path.query("SELECT mac FROM keys") == [(None,)]
    store, _vault = await _unsealed(path)
    try:
        records = [r for r in await audit_log.load_records(store) if r.action == rowmac.BIND_ACTION]
        assert [r.details for r in records] == [{"rows": 2, "level": 3, "from_level": 0}]
        assert (await OperatorRegistry(store).get("alice")).role == "admin"
        macs = await store.fetchall("SELECT mac FROM keys UNION ALL SELECT mac FROM operators")
        assert all(m["mac"] for m in macs)
    finally:
        await store.close()
    await _edit(path, "UPDATE operators SET role = 'auditor'")
    store, _vault = await _unsealed(path)  # bound once: no second binding
    try:
        with pytest.raises(IntegrityError):
            await OperatorRegistry(store).get("alice")
    finally:
        await store.close()
