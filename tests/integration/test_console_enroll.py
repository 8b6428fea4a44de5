"""The console's enroll page over plain HTTP (no browser): the one-time token is shown on its
own, and the command it prints for the host does not carry it (a command line shows in ps and
shell history; the agent reads CKMS_AGENT_ENROLL_TOKEN or --token-file)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.support.browser import console_process
from tests.support.cli import Operators
from tests.support.controller import running_controller


async def test_the_enroll_page_keeps_the_token_out_of_the_command(tmp_path: Path) -> None:
    async with running_controller(tmp_path / "ctl", "127.0.0.1:9", "e", "a") as controller:
        ops = Operators(controller, tmp_path)
        await ops.add("alice", "admin")
        async with console_process(ops.env("alice")) as url:
            origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
            # unsafe: keep cookies of an IP address host (the console listens on 127.0.0.1)
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as web:
                async with web.get(url) as login:
                    assert login.status == 200
                async with web.get(origin + "/hosts/enroll") as form:
                    page = await form.text()
                csrf = re.search(r'name="csrf" value="([^"]+)"', page)
                assert csrf, page[:500]
                async with web.post(
                    origin + "/hosts/enroll",
                    data={"csrf": csrf.group(1), "name": "web-9", "labels": "env=test"},
                    headers={"Origin": origin},
                ) as made:
                    assert made.status == 200, await made.text()
                    page = html.unescape(await made.text())
    token = re.search(r'<pre id="enroll-token">(ckms-enroll-\S+)</pre>', page)
    command = re.search(r'<pre id="enroll-command">([^<]+)</pre>', page)
    assert token and command, page[:2000]
    assert command.group(1).startswith("ckms-agent enroll --controller ")
    assert token.group(1) not in command.group(1) and "--token" not in command.group(1)
