"""Fixtures of the agent's unit tests (helpers live in ``agent_unit_helpers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agent_unit_helpers import config_values


@pytest.fixture
def values(tmp_path: Path) -> dict[str, Any]:
    return config_values(tmp_path / "state")
