"""``ckms console`` refuses to listen anywhere but loopback, before it connects."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckms.cli import app
from ckms.cli._errors import ExitCode
from ckms.ssh import fingerprint, generate_ssh_key
from ckms.ssh._keys import write_private_key


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:8080", "192.0.2.1:8080", "example.org:80"])
def test_only_loopback(tmp_path: Path, listen: str) -> None:
    identity = tmp_path / "id"
    write_private_key(identity, generate_ssh_key())
    runner = CliRunner(
        env={
            "CKMS_CONTROLLER": "127.0.0.1:1",  # nothing listens: it must refuse before connecting
            "CKMS_IDENTITY": str(identity),
            "CKMS_USER": "alice",
            "CKMS_CONTROLLER_FINGERPRINT": fingerprint(generate_ssh_key()),
        }
    )
    result = runner.invoke(app, ["console", "--listen", listen])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "loopback only" in result.stderr
