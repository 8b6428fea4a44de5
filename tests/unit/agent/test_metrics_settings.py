"""Agent metrics settings: no port beyond loopback, the textfile replaced whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckms._exposition import parse_listen
from ckms.errors import ConfigError
from ckms_agent.config import build_config
from ckms_agent.metrics import write_textfile


@pytest.mark.parametrize("address", ["0.0.0.0:9465", "10.0.0.5:9465", "[::]:9465", "web:9465"])
def test_the_agent_never_listens_beyond_loopback(values: dict[str, Any], address: str) -> None:
    with pytest.raises(ConfigError, match=r"CKMS_AGENT_METRICS_LISTEN.*loopback only"):
        build_config(values, environ={"CKMS_AGENT_METRICS_LISTEN": address})


def test_loopback_addresses_are_accepted(values: dict[str, Any]) -> None:
    for address in ("127.0.0.1:9465", "[::1]:9465", "localhost:0"):
        cfg = build_config(values, environ={"CKMS_AGENT_METRICS_LISTEN": address})
        assert cfg.metrics_listen == address
    assert build_config(values, environ={}).metrics_listen is None  # off by default


@pytest.mark.parametrize("text", ["9464", "host:", ":9464", "h:99999", "h:x"])
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_listen(text)


def test_textfile_is_replaced_atomically_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "ckms_agent.prom"
    path.write_text("old\n")
    write_textfile(path, b"ckms_agent_connected 1\n")
    assert path.read_bytes() == b"ckms_agent_connected 1\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["ckms_agent.prom"]  # no temp file left behind


def test_a_missing_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_textfile(tmp_path / "absent" / "ckms_agent.prom", b"x 1\n")
    assert os.listdir(tmp_path) == []
