"""The web console in a real headless Chromium, against a real controller, agents and Kafka.

Set ``CKMS_CONSOLE_SCREENSHOTS=DIR`` to also save the README's screenshots from this run
(``docs/screenshots.py`` does).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from ckms.controller.service import Controller
from ckms.store import audit as audit_log
from tests.e2e.test_distribution import converged
from tests.support.browser import chrome, console_process, ensure_chromium
from tests.support.cli import Operators
from tests.support.fleet import enroll_agent, running_agent, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

WEB = {"env": "prod", "role": "web"}
SHOTS = os.environ.get("CKMS_CONSOLE_SCREENSHOTS")


def shot(driver: Any, name: str) -> None:
    """Save a whole-page screenshot when asked to (``CKMS_CONSOLE_SCREENSHOTS``)."""
    if not SHOTS:
        return
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    png = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    (Path(SHOTS) / name).write_bytes(base64.b64decode(png["data"]))


class Restartable:
    """A real agent the test can stop and start again (``async with`` stops it at the end)."""

    def __init__(self, config: Path) -> None:
        self._config = config
        self._cm: Any = None

    async def start(self) -> None:
        self._cm = running_agent(self._config)
        await self._cm.__aenter__()

    async def stop(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            await cm.__aexit__(None, None, None)

    async def __aenter__(self) -> Restartable:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def wait_text(driver: Any, css: str, pattern: str, timeout: float = 60) -> str:
    """Block until the element's text matches ``pattern``; return the text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def matches(d: Any) -> str | bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        return bool(found) and re.search(pattern, found[0].text) is not None and found[0].text

    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException

    try:
        return WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.2,
            ignored_exceptions=(StaleElementReferenceException,),  # a page replaced under us
        ).until(matches)
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "body").text[:2000]
        raise AssertionError(f"{css} !~ {pattern!r} at {driver.current_url}:\n{page}") from None


def body(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def fill(driver: Any, fields: dict[str, str]) -> None:
    from selenium.webdriver.common.by import By

    for name, value in fields.items():
        by = By.CSS_SELECTOR if name.startswith("#") else By.NAME
        el = driver.find_element(by, name)
        if el.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(el).select_by_visible_text(value)
        else:
            el.clear()
            el.send_keys(value)


def click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, css).click()


def exists(driver: Any, css: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_elements(By.CSS_SELECTOR, css))


A11Y = """
const unlabelled = [...document.querySelectorAll("input:not([type=hidden]), select, textarea")]
  .filter((e) => e.labels.length === 0 && !e.getAttribute("aria-label")).map((e) => e.name);
const tables = [...document.querySelectorAll("table")].filter((t) => !t.caption).length;
return {
  lang: document.documentElement.lang,
  main: document.querySelectorAll("main").length,
  nav: document.querySelectorAll("nav[aria-label]").length,
  h1: document.querySelectorAll("h1").length,
  unlabelled: unlabelled,
  uncaptioned: tables,
};
"""


def accessible(driver: Any) -> None:
    """Landmarks, one heading, a label for every control, a caption for every table, and the
    skip link first in the keyboard order (Tab, then Enter moves focus to the content)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    facts = driver.execute_script(A11Y)
    assert facts == {
        "lang": "en",
        "main": 1,
        "nav": 1,
        "h1": 1,
        "unlabelled": [],
        "uncaptioned": 0,
    }, (driver.current_url, facts)
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.execute_script("return document.activeElement.className") == "skip"
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    assert driver.execute_script("return location.hash") == "#main"


@pytest.fixture(scope="module")
def browser_ready() -> None:
    ensure_chromium()


async def test_console_end_to_end(
    browser_ready: None, controller: Controller, tmp_path: Path
) -> None:
    c = controller
    ops = Operators(c, tmp_path)
    await ops.add("alice", "admin")
    await ops.add("bob", "admin")
    await ops.add("audrey", "auditor")
    hosts = {"web-1", "web-2"}
    configs = [await enroll_agent(c, tmp_path / "agents", h, WEB) for h in sorted(hosts)]
    second = Restartable(configs[1])
    async with (
        running_agent(configs[0]),
        second,
        console_process(ops.env("alice")) as alice_url,
        console_process(ops.env("bob")) as bob_url,
        console_process(ops.env("audrey")) as audrey_url,
    ):
        base = alice_url.split("/login")[0]
        with chrome() as a:
            # Refused without the token; the token opens once.
            await asyncio.to_thread(a.get, base + "/")
            assert "not signed in" in await asyncio.to_thread(body, a)
            await asyncio.to_thread(a.get, alice_url)
            assert await asyncio.to_thread(wait_text, a, "#count-hosts", r"^2$")
            assert (await asyncio.to_thread(wait_text, a, "#count-keys", r"\d")) == "0"
            assert (await asyncio.to_thread(wait_text, a, "#viewer", "alice")).count("admin")
            cookies = {k["name"]: k for k in await asyncio.to_thread(a.get_cookies)}
            cookie = cookies["ckms_console"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            async with (
                aiohttp.ClientSession() as http,
                http.get(alice_url, allow_redirects=False) as again,
            ):
                assert again.status == 403 and "used already" in await again.text()

            # Create a key with the CLI's validation: a bad name is refused with its message.
            def create() -> None:
                a.get(base + "/keys/new")
                fill(a, {"name": "Not A Name", "type": "aes-256"})
                click(a, "#create")
                wait_text(a, "#form-error", r"\S")
                fill(
                    a,
                    {
                        "name": "web/tls",
                        "targets": "env=prod,role=web",
                        "path": "/etc/ckms/{team}/{purpose}.key",
                    },
                )
                click(a, "#create")
                wait_text(a, "h1", "web/tls")
                wait_text(a, "#fleet-pct", r"^100(\.0)?$")

            await asyncio.to_thread(create)
            await wait_until(lambda: converged(c, "web/tls", hosts), what="first install")

            # Rotate; the live table (SSE) follows the fleet to 100 %.
            # Rotate while web-2 is down: the live table (SSE) shows it pending, then follows
            # the fleet to 100 % once web-2 is back, without a reload.
            await second.stop()

            def rotate() -> tuple[str, str]:
                click(a, "#rotate")
                wait_text(a, "#versions", "v2")
                wait_text(a, "#fleet-table", r"web-1\s+v1 installed, v2 installed\s+converged")
                wait_text(a, "#fleet-table", r"web-2\s+v1 installed\s+pending")
                wait_text(a, "#fleet-pct", r"^50(\.0)?$")
                shot(a, "console-rotation-converging.png")
                updates = a.find_element("id", "fleet").get_attribute("data-updates")
                return a.current_url, str(updates)

            url, before = await asyncio.to_thread(rotate)
            await second.start()

            def converges() -> str:
                wait_text(a, "#fleet-table", r"v2 installed[\s\S]*v2 installed")
                wait_text(a, "#fleet-pct", r"^100(\.0)?$")
                wait_text(a, "#converge-time", "2 of 2 hosts in")
                assert a.current_url == url
                shot(a, "console-rotation.png")
                return str(a.find_element("id", "fleet").get_attribute("data-updates"))

            after = await asyncio.to_thread(converges)
            assert int(after) > int(before) >= 1  # live updates, not a reload
            await wait_until(lambda: converged(c, "web/tls", hosts), what="rotation")

            # Revoke v1 as compromised: the button waits for the typed name.
            def revoke() -> None:
                click(a, "#revoke-box summary")
                fill(
                    a,
                    {"#revoke-reason": "keyCompromise", "#revoke-version": "1"}
                    | {"#revoke-confirm": "web/tl"},
                )
                assert not a.find_element("id", "revoke").is_enabled()
                a.find_element("id", "revoke-confirm").send_keys("s")
                assert a.find_element("id", "revoke").is_enabled()
                click(a, "#revoke")
                wait_text(a, "#versions", "Compromised")

            await asyncio.to_thread(revoke)

            # A dual-control create becomes a request, shown with its id.
            def request_create() -> str:
                a.get(base + "/keys/new")
                fill(a, {"name": "pay/db", "approvals": "create,destroy,policy"})
                click(a, "#create")
                return wait_text(a, "#message", "request")

            message = await asyncio.to_thread(request_create)
            request_id = re.search(r"request ([a-z0-9-]+) created", message)
            assert request_id, message

            # Overview counts after all that.
            def overview() -> None:
                a.get(base + "/")
                wait_text(a, "#count-keys", r"^1$")
                wait_text(a, "#count-hosts", r"^2$")
                shot(a, "console-overview.png")
                accessible(a)
                for page in ("/keys", "/keys/new", "/keys/web/tls", "/hosts", "/audit"):
                    a.get(base + page)
                    accessible(a)
                if SHOTS:  # the same page in a narrow window (a phone, a split screen)
                    a.set_window_size(420, 900)
                    shot(a, "console-overview-narrow.png")
                    a.set_window_size(1280, 900)

            await asyncio.to_thread(overview)

            # Enroll a host: the agent command is shown once.
            def enroll_host() -> tuple[str, str]:
                a.get(base + "/hosts/enroll")
                fill(a, {"name": "web-3", "labels": "env=prod role=web"})
                click(a, "#enroll")
                command = wait_text(a, "#enroll-command", "ckms-agent enroll")
                token = wait_text(a, "#enroll-token", r"\S")
                a.get(base + "/hosts/enroll")
                assert not exists(a, "#enroll-command") and not exists(a, "#enroll-token")
                return command, token

            command, token = await asyncio.to_thread(enroll_host)
            assert c.host_key_fingerprint in command and token not in command

            # CSRF and cross-origin, with the real session cookie.
            jar = {"ckms_console": cookie["value"]}
            async with aiohttp.ClientSession(cookies=jar) as http:
                rotate_url = base + "/keys/web/tls/rotate"
                async with http.post(rotate_url, data={}, headers={"Origin": base}) as r:
                    assert r.status == 403 and "CSRF" in await r.text()
                async with http.get(base + "/keys/web/tls") as r:
                    csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                    assert csrf
                evil = {"Origin": "http://evil.example"}
                async with http.post(rotate_url, data={"csrf": csrf[1]}, headers=evil) as r:
                    assert r.status == 403 and "cross-origin" in await r.text()
                async with http.post(rotate_url, data={"csrf": csrf[1]}) as r:
                    assert r.status == 403  # neither Origin nor Referer
                port = urlsplit(base).port
                async with http.get(base + "/", headers={"Host": f"evil.example:{port}"}) as r:
                    assert r.status == 421
                async with http.get(base + "/audit/export") as r:
                    assert r.status == 200
                    lines = (await r.text()).splitlines()
                records, checkpoints = audit_log.parse_jsonl(lines)
                assert records and checkpoints and records[0].index == 0
            assert len((await c.lifecycle.get("web/tls")).versions) == 2  # nothing rotated

        # The second admin approves in their own console.
        with chrome() as b:

            def approve() -> None:
                b.get(bob_url)
                wait_text(b, "#count-waiting", r"^1$")  # alice's request waits for bob
                b.get(bob_url.split("/login")[0] + "/requests")
                card = wait_text(b, f"[data-request='{request_id[1]}']", "pay/db")
                assert "does not exist" in card  # what would change, next to the exact request
                shot(b, "console-requests.png")
                click(b, f"[data-request='{request_id[1]}'] button.approve")
                wait_text(b, "#message", "approved")
                b.get(bob_url.split("/login")[0] + "/keys?team=pay")
                listed = wait_text(b, "#keys", "pay/db")
                assert "web/tls" not in listed
                b.get(bob_url.split("/login")[0] + "/audit")
                click(b, "#verify")
                wait_text(b, "#verify-result", r"^OK")

            await asyncio.to_thread(approve)
        assert (await c.lifecycle.get("pay/db")).name == "pay/db"

        # The auditor sees no actions, and the controller refuses one forced through.
        with chrome() as d:
            audrey_base = audrey_url.split("/login")[0]

            def auditor() -> str:
                d.get(audrey_url)
                wait_text(d, "#viewer", "auditor")
                d.get(audrey_base + "/keys")
                assert not exists(d, "#new-key")
                d.get(audrey_base + "/keys/web/tls")
                wait_text(d, "h1", "web/tls")
                assert not exists(d, "#rotate") and not exists(d, "#revoke-form")
                d.get(audrey_base + "/hosts")
                assert not exists(d, "#enroll-host")
                d.get(audrey_base + "/audit")
                csrf = d.find_element("name", "csrf").get_attribute("value")
                # Forge the rotate form the auditor's pages never offer, from the page itself.
                d.execute_script(
                    "const f = document.createElement('form'); f.method = 'post';"
                    "f.action = '/keys/web/tls/rotate'; const i = document.createElement('input');"
                    "i.name = 'csrf'; i.value = arguments[0]; f.appendChild(i);"
                    "document.body.appendChild(f); f.submit();",
                    csrf,
                )
                return wait_text(d, "#message", "may not")

            refused = await asyncio.to_thread(auditor)
            assert "auditor" in refused and "key.rotate" in refused
        assert len((await c.lifecycle.get("web/tls")).versions) == 2
