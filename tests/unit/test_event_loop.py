"""The controller's event loop choice: uvloop when asked or installed, the standard one else."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from ckms._aio import loop_factory, run
from ckms.controller.service import ControllerSettings
from ckms.errors import ConfigError

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_is_always_the_standard_loop() -> None:
    assert loop_factory("asyncio") is None
    assert run(_loop_module(), loop="asyncio").startswith("asyncio")


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop (the fast extra) is not installed")
def test_auto_and_uvloop_run_on_uvloop_when_it_is_installed() -> None:
    assert run(_loop_module(), loop="auto").startswith("uvloop")
    assert run(_loop_module(), loop="uvloop").startswith("uvloop")


@pytest.mark.skipif(HAVE_UVLOOP, reason="uvloop is installed here")
def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error() -> None:
    assert run(_loop_module(), loop="auto").startswith("asyncio")
    with pytest.raises(ConfigError, match="needs uvloop installed"):
        loop_factory("uvloop")


def test_the_setting_refuses_an_unknown_loop() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        ControllerSettings(home="/tmp/x", event_loop="trio")  # type: ignore[arg-type]
