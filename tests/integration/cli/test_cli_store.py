"""``ckms init --store postgresql://...``: a new controller whose store is a PostgreSQL database
from the start, the password only in its 0600 file; a second home on the same database is
refused (it holds a controller already)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckms.controller.home import load_settings
from ckms.controller.operators import OperatorRegistry
from ckms.controller.sealing import Vault
from tests.support.cli import make_ssh_key, run_cli
from tests.support.postgres import PostgresDatabase, read_password

pytestmark = pytest.mark.postgres


async def test_init_puts_the_store_in_postgresql(
    tmp_path: Path, postgres_database: PostgresDatabase
) -> None:
    _, alice_pub = make_ssh_key(tmp_path / "keys" / "alice")
    (tmp_path / "alice.pub").write_text(alice_pub)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("a passphrase long enough for tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKMS_", "PG"))}
    password = read_password(postgres_database.password_file)

    def init(home: Path) -> list[str]:
        return [
            "init", "--home", str(home), "--passphrase-file", str(passphrase),
            "--admin", "alice", "--admin-key", str(tmp_path / "alice.pub"),
            "--store", postgres_database.url,
            "--store-password-file", str(postgres_database.password_file), "--json",
        ]  # fmt: skip

    made = await run_cli(*init(tmp_path / "home"), env=env)
    assert made.rc == 0, made.stderr
    config = tmp_path / "home" / "controller.toml"
    assert password not in config.read_text() + made.stdout + made.stderr
    assert not (tmp_path / "home" / "controller.db").exists()  # no SQLite file made
    settings = load_settings(config, {})
    assert settings.store_url.engine == "postgresql"
    store = await settings.open_store()
    try:
        assert (await Vault(store).status()).initialized
        assert (await OperatorRegistry(store).get("alice")).role == "admin"
    finally:
        await store.close()
    again = await run_cli(*init(tmp_path / "other"), env=env)
    assert again.rc != 0 and "already" in again.stderr.lower()
