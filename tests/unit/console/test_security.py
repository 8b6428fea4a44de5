"""The console's browser gate on a real aiohttp server: token, cookie, CSRF, Origin, Host, CSP.

The pages behind it need a controller (tests/e2e/test_console.py drives them in Chromium);
these requests go straight at the gate with a plain HTTP client, as an attacker's would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from ckms.console._security import COOKIE, CSP, Gate, security_middleware


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="changed" if request.method == "POST" else "page")


GATE = web.AppKey("gate", Gate)


async def _login(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    session = gate.spend(request.query.get("token", ""))
    if session is None:
        return web.Response(status=403, text="used already")
    response = web.Response(text="in")
    response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
    return response


@pytest.fixture
async def console() -> AsyncIterator[tuple[Gate, str]]:
    gate = Gate()
    app = web.Application(middlewares=[security_middleware(gate)])
    app[GATE] = gate
    app.router.add_get("/login", _login)
    app.router.add_get("/", _ok)
    app.router.add_post("/keys/a/b/rotate", _ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gate.allow("127.0.0.1", port)
    yield gate, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _signed_in(gate: Gate, base: str, http: aiohttp.ClientSession) -> str:
    """Log in with the one-time token; return the session's CSRF token."""
    assert gate.login_token is not None
    async with http.get(f"{base}/login", params={"token": gate.login_token}) as r:
        assert r.status == 200
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    (csrf,) = gate.sessions.values()
    return csrf


async def test_no_cookie_no_page_and_the_token_works_once(console: tuple[Gate, str]) -> None:
    gate, base = console
    token = gate.login_token
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(f"{base}/") as r:
            assert r.status == 401
            assert r.headers["Content-Security-Policy"] == CSP
        async with http.get(f"{base}/login", params={"token": "wrong"}) as r:
            assert r.status == 403
        await _signed_in(gate, base, http)
        async with http.get(f"{base}/") as r:
            assert r.status == 200 and await r.text() == "page"
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as other:  # another browser with the same URL
        async with other.get(f"{base}/login", params={"token": token}) as r:
            assert r.status == 403
        async with other.get(f"{base}/") as r:
            assert r.status == 401


async def test_forms_need_the_csrf_token_and_the_console_origin(
    console: tuple[Gate, str],
) -> None:
    gate, base = console
    url = f"{base}/keys/a/b/rotate"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        csrf = await _signed_in(gate, base, http)
        same = {"Origin": base}
        async with http.post(url, data={}, headers=same) as r:
            assert r.status == 403 and "CSRF" in await r.text()
        async with http.post(url, data={"csrf": "x" + csrf}, headers=same) as r:
            assert r.status == 403
        async with http.post(url, data={"csrf": csrf}, headers={"Origin": "http://evil"}) as r:
            assert r.status == 403 and "cross-origin" in await r.text()
        async with http.post(url, data={"csrf": csrf}, headers={"Origin": "null"}) as r:
            assert r.status == 403
        async with http.post(url, data={"csrf": csrf}) as r:  # neither Origin nor Referer
            assert r.status == 403
        referer = {"Referer": f"{base}/keys/a/b"}
        async with http.post(url, data={"csrf": csrf}, headers=referer) as r:
            assert r.status == 200
        async with http.post(url, data={"csrf": csrf}, headers=same) as r:
            assert r.status == 200 and await r.text() == "changed"
            assert r.headers["Content-Security-Policy"] == CSP
            assert r.headers["X-Frame-Options"] == "DENY"


async def test_another_host_name_is_refused(console: tuple[Gate, str]) -> None:
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 names evil.example."""
    gate, base = console
    port = base.rsplit(":", 1)[1]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await _signed_in(gate, base, http)
        async with http.get(f"{base}/", headers={"Host": f"evil.example:{port}"}) as r:
            assert r.status == 421
        async with http.get(f"{base}/", headers={"Host": f"localhost:{port}"}) as r:
            assert r.status == 200


def test_open_hands_the_browser_a_private_file_not_the_token() -> None:
    """``--open``: the token stays out of command lines (``ps``) other local users can read."""
    from ckms.console import launch_file

    url = "http://127.0.0.1:1/login?token=secret&x=<y>"
    with launch_file(url) as page:
        assert page.stat().st_mode & 0o777 == 0o600
        assert page.parent.stat().st_mode & 0o777 == 0o700
        assert "token=secret&amp;x=&lt;y&gt;" in page.read_text()
        assert "secret" not in page.as_uri()
    assert not page.exists() and not page.parent.exists()
