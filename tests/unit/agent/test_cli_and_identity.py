"""The ckms-agent CLI's error contract, status rendering, and the agent's key files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from agent_unit_helpers import config_values
from typer.testing import CliRunner

from ckms.crypto import KeyType as CryptoKeyType
from ckms.crypto import WrapSuite, generate
from ckms.errors import ConfigError
from ckms.protocol import InstallSpec
from ckms_agent.commands import app
from ckms_agent.config import build_config, write_config
from ckms_agent.identity import create_keys, load_keys
from ckms_agent.keyops import read_keyring
from ckms_agent.state import AgentState, KeyRecord, VersionRecord

runner = CliRunner()


def test_usage_errors_exit_2_and_config_errors_one_line_exit_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--nope"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["status", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(
        app,
        [
            "enroll",
            "--controller",
            "no-port",
            "--token",
            "t" * 20,
            "--host-key-fingerprint",
            "SHA256:" + "A" * 43,
        ],
    )
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_status_reads_the_state_db_without_a_daemon(tmp_path: Path) -> None:
    values: dict[str, Any] = config_values(tmp_path / "state", default_max_staleness_s=60)
    cfg = build_config(values, environ={})
    path = tmp_path / "agent.toml"
    write_config(path, cfg)
    result = runner.invoke(app, ["status", "--config", str(path)], env={})
    assert result.exit_code == 0 and "the agent has not run" in result.output

    key_file = tmp_path / "root" / "k.key"
    key_file.parent.mkdir()
    key_file.write_bytes(b"x")

    async def seed() -> None:
        async with AgentState(cfg.state_db_path) as state:
            await state.put_key(
                KeyRecord(
                    name="payments/db",
                    key_type="aes-256",
                    spec=InstallSpec(path="/k.key"),
                    versions={1: VersionRecord(1, "Active", True, "sha256:" + "a" * 64)},
                    files={key_file: "00" * 32},  # not the file's hash: drifted
                )
            )
            await state.set_last_contact(1.0)  # long ago: past the 60 s default

    import asyncio

    asyncio.run(seed())
    result = runner.invoke(app, ["status", "--config", str(path), "--json"], env={})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["any_stale"] is True and report["keys"][0]["intact"] is False
    assert report["keys"][0]["versions"][0]["primary"] is True
    text = runner.invoke(app, ["status", "--config", str(path)], env={}).output
    assert "payments/db" in text and "stale, drifted" in text and "YES" in text


def test_agent_keys_are_private_files_and_checked_on_load(tmp_path: Path) -> None:
    ident, wrap = tmp_path / "s" / "identity.key", tmp_path / "s" / "wrapping.key"
    keys = create_keys(ident, wrap, WrapSuite.X25519)
    assert ident.stat().st_mode & 0o777 == 0o600 and ident.parent.stat().st_mode & 0o777 == 0o700
    assert keys.identity.hex() not in repr(keys) and keys.wrapping.hex() not in repr(keys)
    loaded = load_keys(ident, wrap, WrapSuite.X25519)
    assert loaded == keys and len(loaded.identity_public) == 32
    assert loaded.ssh_key().get_algorithm() == "ssh-ed25519"
    os.chmod(wrap, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_keys(ident, wrap, WrapSuite.X25519)
    os.chmod(wrap, 0o600)
    ident.write_bytes(b"short")
    with pytest.raises(ConfigError, match="not a raw Ed25519 seed"):
        load_keys(ident, wrap, WrapSuite.X25519)
    with pytest.raises(ConfigError, match="does not exist"):
        load_keys(tmp_path / "none", wrap, WrapSuite.X25519)


def test_keyring_files_can_be_read_back_for_offline_rewrites(tmp_path: Path) -> None:
    from ckms.crypto import KeyringEntry, encode_keyring

    m1, m2 = generate(CryptoKeyType.AES_256), generate(CryptoKeyType.AES_256)
    ring = encode_keyring(
        CryptoKeyType.AES_256,
        [KeyringEntry(1, m1, False, "Active"), KeyringEntry(2, m2, True, "Active")],
        key_name="a/b",
    )
    path = tmp_path / "ring.json"
    path.write_bytes(ring)
    got = read_keyring([tmp_path / "missing.json", path])
    assert got == {1: m1, 2: m2}
    path.write_text("{not json")
    assert read_keyring([path]) == {}
