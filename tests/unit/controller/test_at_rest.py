"""Key material at rest: sealed in a real SQLite file, bound to its row, never in plaintext."""

from __future__ import annotations

import base64
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ckms.controller import rowmac
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.sealing import InitResult, Vault, init_controller
from ckms.crypto import KeyType
from ckms.errors import IntegrityError, UnsealError
from ckms.store import Store
from ckms.store import audit as audit_log

NAME = "payments/db"


@pytest.fixture
async def sealed_file(tmp_path: Path) -> AsyncIterator[tuple[Path, InitResult]]:
    """A closed database file holding NAME with two versions."""
    path = tmp_path / "controller.db"
    async with await Store.open(path) as store:
        result = await init_controller(store, shares=(2, 3))
        vault = Vault(store)
        await vault.unseal_with_shares(result.mnemonics[:2])
        lifecycle = Lifecycle(store, vault)
        await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
        await lifecycle.rotate(NAME, actor="alice")
    yield path, result


async def _material(path: Path, result: InitResult, name: str, version: int) -> bytes:
    return (await _opened(path, result, name, version))[0]


async def _opened(path: Path, result: InitResult, name: str, version: int) -> tuple[bytes, str]:
    async with await Store.open(path) as store:
        vault = Vault(store)
        await vault.unseal_with_shares(result.mnemonics[1:])
        material = await vault.material(name, version)
        return material, vault.digest(material)


async def test_untouched_file_opens(sealed_file: tuple[Path, InitResult]) -> None:
    path, result = sealed_file
    _material_bytes, digest = await _opened(path, result, NAME, 2)
    async with await Store.open(path) as store:
        row = await store.fetchone("SELECT digest FROM key_versions WHERE version = 2")
    assert row is not None and row["digest"] == digest


@pytest.mark.parametrize(
    ("statements", "name", "version"),
    [
        pytest.param(
            ["UPDATE keys SET usage = 'decrypt,encrypt,wrap-key'"], NAME, 1, id="usage-widened"
        ),
        pytest.param(["UPDATE keys SET usage = 'sign,verify'"], NAME, 2, id="usage-swapped"),
        pytest.param(["UPDATE keys SET key_type = 'hmac-sha256'"], NAME, 1, id="type"),
        pytest.param(["UPDATE keys SET name = 'evil/db'"], "evil/db", 1, id="name"),
        pytest.param(
            [
                "UPDATE key_versions SET sealed_material = "
                "(SELECT sealed_material FROM key_versions WHERE version = 2) WHERE version = 1"
            ],
            NAME,
            1,
            id="version-swapped",
        ),
    ],
)
@pytest.mark.requirement("PCI-3.7.3", "PCI-3.7.7")
async def test_edited_row_fails_with_integrity_error(
    sealed_file: tuple[Path, InitResult], statements: list[str], name: str, version: int
) -> None:
    path, result = sealed_file
    with sqlite3.connect(path) as raw:
        for statement in statements:
            raw.execute(statement)
    with pytest.raises(IntegrityError) as info:
        await _material(path, result, name, version)
    # The row's MAC fails first where a bound column was edited; the sealed material's AAD
    # fails where only the material moved.
    assert str(info.value) in (
        f"key {name} version {version} failed integrity check",
        f"key {name} failed integrity check",
    )


async def test_plain_digests_of_an_older_store_are_rekeyed_at_unseal(
    sealed_file: tuple[Path, InitResult],
) -> None:
    """A store from before keyed digests carries ``sha256:`` of each version's material; the
    first unseal replaces each with the keyed digest and audits how many."""
    import hashlib

    path, result = sealed_file
    material, keyed = await _opened(path, result, NAME, 1)
    async with await Store.open(path) as store:
        # What an older controller left: a plain digest (on a row bound to the root KEK).
        vault = Vault(store)
        await vault.unseal_with_shares(result.mnemonics[1:])
        async with store.write() as tx:
            await tx.execute(
                "UPDATE key_versions SET digest = ? WHERE version = 1",
                ("sha256:" + hashlib.sha256(material).hexdigest(),),
            )
            key_id = await tx.fetchval("SELECT id FROM keys")
            await rowmac.stamp_version(tx, key_id, 1)
    assert (await _opened(path, result, NAME, 1))[1] == keyed
    async with await Store.open(path) as store:
        digests = [r["digest"] for r in await store.fetchall("SELECT digest FROM key_versions")]
        records = [
            r for r in await audit_log.load_records(store) if r.action == "controller.upgrade"
        ]
    assert keyed in digests and all(d.startswith("hmac-sha256:") for d in digests)
    assert [r.details for r in records] == [{"digests_rekeyed": 1, "digests_not_rekeyed": 0}]


def _forms(secret: bytes) -> list[bytes]:
    """Encodings of a secret that must never appear in the database files."""
    b64 = base64.b64encode(secret)
    forms = [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        b64,
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]
    forms += [b64[i : i + 64] for i in range(0, len(b64) - 63, 64)]  # PEM body lines
    forms += [secret[i : i + 16] for i in range(0, len(secret) - 15, 8)]  # partial leaks
    return forms


@pytest.mark.requirement("SP800-130-STORE", "PCI-3.6.1.2")
async def test_no_plaintext_material_in_db_or_wal(tmp_path: Path) -> None:
    path = tmp_path / "controller.db"
    wal = Path(f"{path}-wal")
    store = await Store.open(path)
    try:
        result = await init_controller(store, shares=(2, 3))
        vault = Vault(store)
        await vault.unseal_with_shares(result.mnemonics[:2])
        lifecycle = Lifecycle(store, vault)
        secrets: list[bytes] = []
        for key_type in KeyType:  # each type once (one RSA-4096 generation in the whole suite)
            name = f"scan/{key_type}"
            await lifecycle.create(name, key_type, actor="alice")
            secrets.append(await vault.material(name, 1))
        await lifecycle.rotate("scan/aes-256", actor="alice")
        secrets.append(await vault.material("scan/aes-256", 2))
        assert vault._secrets is not None
        secrets += [
            vault._secrets.data_kek,
            vault._secrets.signing_key,
            vault._secrets.audit_hmac_key,
        ]
        secrets += [m.encode() for m in result.mnemonics]
        files = {"db": _read(path), "wal": _read(wal)}
        assert files["wal"]  # the WAL is scanned while it still holds the writes
        _assert_absent(secrets, files)
    finally:
        await store.close()
    _assert_absent(secrets, {"db-after-close": _read(path)})


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _assert_absent(secrets: list[bytes], files: dict[str, bytes]) -> None:
    for i, secret in enumerate(secrets):
        for form in _forms(secret):
            for label, content in files.items():
                assert form not in content, f"secret #{i} found in {label}"


async def test_logs_never_carry_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, aiosqlite's SQL parameter logging included
    async with await Store.open(":memory:") as store:
        result = await init_controller(store, shares=(2, 3))
        vault = Vault(store)
        await vault.unseal_with_shares(result.mnemonics[:2])
        lifecycle = Lifecycle(store, vault)
        await lifecycle.create("log/key", KeyType.SECRET, actor="alice")
        await lifecycle.rotate("log/key", actor="alice")
        secrets = [await vault.material("log/key", v) for v in (1, 2)]
        with pytest.raises(UnsealError):
            await Vault(store).unseal_with_shares([result.mnemonics[0], result.mnemonics[0]])
    secrets += [m.encode() for m in result.mnemonics]
    assert caplog.records, "expected some log output to check"
    text = "\n".join(r.getMessage() for r in caplog.records).encode()
    _assert_absent(secrets, {"logs": text})
