"""A command imports what it runs: ``ckms key list`` loads the key commands, not every noun's.

Each CLI run pays for every module it imports before its first request (the controller's code,
Kafka's client, the metrics library: about half a second of CPU). These tests run the real
entry point in a fresh interpreter and look at ``sys.modules`` once it finished (a missing
fingerprint stops it before it connects), and check that ``ckms --help`` still lists every
command with its help.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ckms.cli import app
from ckms.cli._errors import ExitCode

_PROBE = """
import atexit, json, sys
dump = sys.argv[1]
def _dump():
    with open(dump, "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(_dump)
sys.argv = ["ckms", *sys.argv[2:]]
from ckms.cli import main
main()
"""

# Loaded only by other commands (the controller, the store tools, audit's Kafka reads).
NOT_FOR_KEY_LIST = (
    "aiokafka",
    "prometheus_client",
    "ckms._kafka",
    "ckms.controller",
    "ckms.store",
    "ckms.devkafka",
    "ckms.cli.audit",
    "ckms.cli.backup",
    "ckms.cli.controller",
    "ckms.cli.store",
    "ckms.cli.host",
)


def _modules(tmp_path: Path, *argv: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    dump = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(dump), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    return json.loads(dump.read_text()), result


def test_key_list_imports_the_key_commands_only(tmp_path: Path) -> None:
    modules, result = _modules(tmp_path, "key", "list")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "--host-key-fingerprint" in result.stderr  # it parsed the command and ran it
    assert "ckms.cli.key" in modules
    loaded = [
        name
        for name in modules
        for bad in NOT_FOR_KEY_LIST
        if name == bad or name.startswith(bad + ".")
    ]
    assert loaded == []


def test_help_lists_every_command_with_its_help() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {
        line.split()[0]: " ".join(line.split()[1:])
        for line in result.stdout.split("Commands:")[1].splitlines()
        if line.strip()
    }
    nouns = ("controller", "key", "host", "fleet", "ca", "rollout", "audit", "operator")
    verbs = ("init", "status", "console", "unseal", "seal", "backup", "restore", "demo")
    for name in (*nouns, "request", "report", "store", "dev", *verbs, "approve"):
        assert name in listed, name
    assert listed["approve"].startswith("Approve another person's request")
    assert listed["demo"].startswith("Run the end-to-end demo")


def test_a_lazy_command_parses_and_a_typo_is_suggested() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["key", "--help"])
    assert shown.exit_code == 0 and "list" in shown.stdout
    typo = runner.invoke(app, ["kye", "list"])
    assert typo.exit_code == ExitCode.USAGE
    assert "Did you mean 'key'?" in typo.output
