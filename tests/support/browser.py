"""Test support: Debian's headless Chromium under Selenium, and ``ckms console`` as a process.

``make test`` installs ``chromium`` and ``chromium-driver`` when it runs as root and they are
missing (as on a fresh machine); the fixture does the same, and skips with the reason only when
it can do neither. Selenium's calls block, so tests run them in a thread while the controller
and agents keep running on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
_PACKAGES = ("chromium", "chromium-driver")


def ensure_chromium() -> None:
    """Install Debian's Chromium and its driver if missing and root; else skip with why."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "the console tests need Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver, as root)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *_PACKAGES],
        check=True,
        env=env,
        timeout=1200,
    )


@contextlib.contextmanager
def chrome(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A headless Chromium driven by Selenium (the system chromedriver, nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


@contextlib.asynccontextmanager
async def console_process(env: dict[str, str]) -> AsyncIterator[str]:
    """Run the real ``ckms console`` as the operator of ``env``; yield the one-time URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ckms.cli",
        "console",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        found = re.search(r"http://\S+", line)
        if found is None:
            assert proc.stderr is not None
            err = (await asyncio.wait_for(proc.stderr.read(), 10)).decode()
            raise AssertionError(f"ckms console printed no URL: {line!r} {err}")
        yield found.group(0)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
