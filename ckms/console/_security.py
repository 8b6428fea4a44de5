"""Who may use the console: a one-time token, a session cookie, CSRF, Origin/Host, headers.

The console listens on loopback, but other local users and every web page the operator's
browser opens can reach loopback too. So:

- The URL printed at start carries a one-time token; ``/login?token=...`` exchanges it for a
  session cookie (``HttpOnly``, ``SameSite=Strict``, ``Path=/``) and the token is spent: a
  second use, or no token, is refused. Without the cookie every page answers 401.
- Every form carries the session's CSRF token; a POST without it (or with another) is refused.
- The ``Host`` header must name the console's own loopback address (DNS rebinding), and a POST
  must come with an ``Origin`` (or, failing that, ``Referer``) of the console itself.
- Every reply sends a strict Content-Security-Policy (scripts, styles, images and connections
  from the console only; no inline code, no framing), ``nosniff``, a same-origin referrer
  only, no caching.

Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["COOKIE", "CSP", "SESSION", "Gate", "security_middleware"]

COOKIE = "ckms_console"
SESSION = web.RequestKey("session", str)
"""Where the middleware leaves the signed-in session id on the request."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes a form's Origin "null"
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_OPEN_PATHS = ("/login", "/static/")


@dataclass
class Gate:
    """The console's one login token and the sessions it opened."""

    login_token: str | None = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    sessions: dict[str, str] = field(default_factory=dict, repr=False)
    """Session id → its CSRF token."""
    origins: tuple[str, ...] = ()
    """``http://host:port`` forms the console answers to (set once listening)."""

    def allow(self, host: str, port: int) -> None:
        """Answer to ``host:port`` (and its ``localhost`` / ``127.0.0.1`` twin)."""
        names = {host, "localhost", "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {host}
        self.origins = tuple(
            f"http://{'[' + n + ']' if ':' in n else n}:{port}" for n in sorted(names)
        )

    def spend(self, token: str) -> str | None:
        """Exchange the login token for a new session id once; None if wrong or spent."""
        expected = self.login_token
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        self.login_token = None
        session = secrets.token_urlsafe(32)
        self.sessions[session] = secrets.token_urlsafe(32)
        return session

    def csrf(self, session: str | None) -> str | None:
        """The CSRF token of a live session."""
        return self.sessions.get(session or "")

    def check_csrf(self, session: str | None, given: str | None) -> bool:
        """True when ``given`` is the session's CSRF token."""
        expected = self.csrf(session)
        return bool(expected and given) and hmac.compare_digest(
            str(given).encode(), expected.encode()
        )


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _same_origin(gate: Gate, request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin in gate.origins


def security_middleware(gate: Gate) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware that applies the rules of this module to every request."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await _checked(request, handler)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def _checked(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if f"http://{request.host}" not in gate.origins:
            return _refuse(421, "this console answers only to its own loopback address")
        if request.method not in ("GET", "HEAD", "POST"):
            return _refuse(405, "method not allowed")
        if request.method == "POST" and not _same_origin(gate, request):
            return _refuse(403, "cross-origin request refused")
        if not request.path.startswith(_OPEN_PATHS):
            session = request.cookies.get(COOKIE)
            if gate.csrf(session) is None:
                return _refuse(
                    401, "not signed in: open the one-time URL that `ckms console` printed"
                )
            request[SESSION] = session
            if request.method == "POST":
                form = await request.post()
                if not gate.check_csrf(session, form.get("csrf")):  # type: ignore[arg-type]
                    return _refuse(403, "the form's CSRF token is missing or wrong")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return exc

    return middleware
