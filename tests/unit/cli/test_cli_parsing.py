"""The CLI's parsing and error rendering with Typer's CliRunner: bad input is one line and exit
2 before anything is sent; exit codes are mapped in one place; offline commands print JSON."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckms.cli import app
from ckms.cli._errors import ExitCode, NotConvergedError, UsageError, exit_code_for
from ckms.cli._parse import parse_duration, parse_reason, parse_shares
from ckms.errors import (
    ApprovalRequiredError,
    CKMSError,
    ConfigError,
    InvalidTransitionError,
    NotFoundError,
    PermissionDeniedError,
    SealedError,
    TransportError,
)
from ckms.protocol import RevocationReason
from ckms.ssh import generate_ssh_key, public_key_text
from ckms.ssh._keys import write_private_key

# A port nobody listens on: if parsing let a bad command through, it would fail with exit 1
# (cannot connect) instead of the usage error the tests expect.
ENV = {
    "CKMS_CONTROLLER": "127.0.0.1:1",
    "CKMS_CONTROLLER_FINGERPRINT": "SHA256:" + "A" * 43,
    "CKMS_USER": "alice",
}


@pytest.fixture
def runner(tmp_path: Path) -> CliRunner:
    identity = tmp_path / "id"
    write_private_key(identity, generate_ssh_key())
    return CliRunner(env={**ENV, "CKMS_IDENTITY": str(identity)})


def one_line_usage_error(result, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == ExitCode.USAGE, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ckms: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["key", "create", "a/b", "--type", "aes-256", "--cryptoperiod", "90x"], "bad duration"),
        (["key", "policy", "a/b", "--grace", "1d2"], "--grace: bad duration '1d2'"),
        (["key", "create", "a/b", "--type", "aes-256", "-t", "env"], "expected label=value"),
        (["key", "create", "a/b", "--type", "aes-256", "-t", "env=pr od"], "invalid value"),
        (["key", "create", "a/b", "--type", "aes-999"], "unknown key type 'aes-999'"),
        (["key", "create", "A/b", "--type", "aes-256"], "must be 'team/purpose'"),
        (["key", "create", "a/b", "--type", "aes-256", "--mode", "999"], "octal mode"),
        (["key", "create", "a/b", "--type", "aes-256", "--mode", "0644"], "grants access"),
        (["key", "create", "a/b", "--type", "aes-256", "--approvals", "nuke"], "'nuke'"),
        (["key", "revoke", "a/b", "--reason", "stolen"], "unknown revocation reason 'stolen'"),
        (["key", "rotate", "not a key"], "must be 'team/purpose'"),
        (["host", "enroll", "web-1", "--label", "env"], "expected name=value"),
        (["host", "enroll", "web-1", "--ttl", "9d"], "between 1s and 7d"),
        (["host", "label", "web-1"], "give --label"),
        (["operator", "add", "x", "--role", "god", "--key", "/nonexistent"], "--role"),
        (["init", "--home", "h", "--admin", "a", "--admin-key", "k"], "exactly one of"),
        (["init", "--home", "h", "--admin", "a", "--admin-key", "k", "--shares", "1/3"], "2 <= M"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runner: CliRunner, args: list[str], needle: str) -> None:
    one_line_usage_error(runner.invoke(app, args), needle)


def test_connection_settings_are_checked_before_connecting(tmp_path: Path) -> None:
    bare = CliRunner(env={"CKMS_CONTROLLER": "127.0.0.1:1", "CKMS_IDENTITY": str(tmp_path / "x")})
    missing = bare.invoke(app, ["key", "list"])
    one_line_usage_error(missing, "--host-key-fingerprint (or CKMS_CONTROLLER_FINGERPRINT)")
    no_key = bare.invoke(app, ["--host-key-fingerprint", "SHA256:" + "B" * 43, "key", "list"])
    one_line_usage_error(no_key, "--identity: private key")
    bad_address = CliRunner().invoke(app, ["--controller", "nohost", "status"])
    one_line_usage_error(bad_address, "expected HOST:PORT")


def test_an_unreachable_controller_is_one_line_and_exit_1(runner: CliRunner) -> None:
    result = runner.invoke(app, ["key", "list"])
    assert result.exit_code == ExitCode.FAILED
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ckms: TransportError: cannot connect to controller 127.0.0.1:1")


def test_exit_codes_are_mapped_in_one_place_and_documented() -> None:
    assert exit_code_for(ApprovalRequiredError("x", request_id="r-1")) == 5
    assert exit_code_for(SealedError("x")) == 4
    assert exit_code_for(NotConvergedError("x", ["web-1"])) == 3
    assert exit_code_for(ConfigError("x")) == exit_code_for(UsageError("x")) == 2
    for refused in (PermissionDeniedError, NotFoundError, InvalidTransitionError, TransportError):
        assert exit_code_for(refused("x")) == 1
    assert exit_code_for(CKMSError("x")) == 1
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5]
    help_text = CliRunner().invoke(app, ["--help"]).stdout
    for code in ("0 ok", "1 operation refused", "2 usage error", "3 not converged", "4 "):
        assert code in " ".join(help_text.split()), code
    assert "5 approval required" in " ".join(help_text.split())


def test_durations_reasons_and_shares_parse() -> None:
    assert parse_duration("90d") == timedelta(days=90)
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_duration("1y") == timedelta(days=365)
    assert parse_duration("3600") == timedelta(hours=1)
    for bad in ("", "d", "90x", "1.5d", "-1d", "1d 2h", "d1"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    assert parse_reason("keyCompromise") is RevocationReason.KEY_COMPROMISE
    assert parse_reason("key-compromise") is RevocationReason.KEY_COMPROMISE
    assert parse_reason("SUPERSEDED") is RevocationReason.SUPERSEDED
    assert parse_shares("3/5") == (3, 5)
    for bad in ("3", "1/2", "5/3", "2/17"):
        with pytest.raises(UsageError):
            parse_shares(bad)


def test_init_prints_json_once_and_refuses_a_second_time(tmp_path: Path) -> None:
    key = generate_ssh_key()
    (tmp_path / "alice.pub").write_text(public_key_text(key) + " alice@laptop\n")
    args = [
        "init", "--home", str(tmp_path / "home"), "--shares", "2/3", "--print-shares",
        "--admin", "alice", "--admin-key", str(tmp_path / "alice.pub"),
        "--listen", "127.0.0.1:2299", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["mode"] == "shares" and len(made["shares"]) == 3
    assert made["admin"] == "alice" and made["host_key_fingerprint"].startswith("SHA256:")
    config = (tmp_path / "home" / "controller.toml").read_text()
    assert (
        "listen_port = 2299" in config
        and (tmp_path / "home" / "controller.toml").stat().st_mode & 0o077 == 0
    )
    second = CliRunner().invoke(app, args)
    assert second.exit_code == ExitCode.FAILED
    assert "already exists" in second.stderr and len(second.stderr.strip().splitlines()) == 1


def test_offline_verify_of_a_file_that_is_not_an_export(tmp_path: Path) -> None:
    junk = tmp_path / "export.jsonl"
    junk.write_text('{"kind": "record", "index": 0}\n')
    key = base64.b64encode(b"\x00" * 32).decode()
    result = CliRunner().invoke(
        app, ["audit", "verify", "--file", str(junk), "--signing-key", key, "--json"]
    )
    assert result.exit_code == ExitCode.FAILED
    assert json.loads(result.stdout)["ok"] is False
    assert "first bad record 0" in result.stderr
