"""The long-running agent holds only what it runs: no command line, controller or metrics code.

Every module a daemon imports stays in its memory for as long as it lives, on every host. These
tests start ``ckms-agent run`` the way the console script does (``ckms_agent.cli.main``) in a
fresh interpreter and look at ``sys.modules`` once it has loaded the daemon (it stops at once on
a missing config), so a new import of Typer, the controller or enrollment fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckms_agent.cli import daemon_arguments

# Loaded only by other commands, by the controller, or by an agent that serves metrics.
FORBIDDEN = (
    "typer",
    "click",
    "rich",
    "ckms.cli",
    "ckms.controller",
    "ckms.store",
    "ckms.ssh._server",
    "ckms_agent.commands",
    "ckms_agent.enroll",
    "ckms_agent.status",
    "prometheus_client",
    "pyrage",
)

_PROBE = """
import atexit, json, sys
dump = sys.argv[1]
def _dump():
    with open(dump, "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(_dump)
sys.argv = ["ckms-agent", "run", "--config", sys.argv[2]]
from ckms_agent.cli import main
main()
"""


def _daemon_modules(tmp_path: Path) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    dump = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(dump), str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return json.loads(dump.read_text()), result


def test_the_daemon_entry_point_imports_no_cli_controller_or_metrics_code(tmp_path: Path) -> None:
    modules, result = _daemon_modules(tmp_path)
    assert result.returncode == 1, result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert "ckms_agent.daemon" in modules  # it did load the daemon
    loaded = [
        name for name in modules for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")
    ]
    assert loaded == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], (True, None)),
        (["run", "--config", "/etc/a.toml"], (True, Path("/etc/a.toml"))),
        (["run", "--config=/etc/a.toml"], (True, Path("/etc/a.toml"))),
        # everything else goes to the full parser (its help, usage errors and exit codes)
        (["run", "--help"], (False, None)),
        (["run", "--config"], (False, None)),
        (["run", "--config="], (False, None)),
        (["run", "--config", "--help"], (False, None)),
        (["run", "--config", "a", "b"], (False, None)),
        (["run", "--nope"], (False, None)),
        (["status"], (False, None)),
        ([], (False, None)),
    ],
)
def test_only_a_plain_run_takes_the_short_path(
    argv: list[str], expected: tuple[bool, Path | None]
) -> None:
    assert daemon_arguments(argv) == expected
