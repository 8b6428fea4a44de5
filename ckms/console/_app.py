"""The console's pages: server-rendered HTML over the admin RPC, as the operator's own identity.

Every page is one or a few admin RPC calls on one persistent SSH connection (the CLI's
:class:`~ckms.cli._client.Session`), rendered by Jinja2 with autoescaping. The console decides
nothing: it shows actions the viewer's role allows (``whoami``), and the controller enforces
roles and dual control on every call as it does for the CLI; a refusal shows the controller's
message. Forms are parsed with the CLI's own parsers, so validation and messages match.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web
from pydantic import BaseModel

from ckms.cli._client import Session
from ckms.cli._parse import parse_key_type, parse_labels, parse_reason, parse_targets
from ckms.cli.key import _install, _policy_patch, _valid_name
from ckms.console._security import COOKIE, SESSION, Gate, security_middleware
from ckms.crypto import InstallFormat, KeyType
from ckms.errors import ApprovalRequiredError, CKMSError, PermissionDeniedError, TransportError
from ckms.protocol import RevocationReason
from ckms.protocol import admin as api

__all__ = ["WRITE_ROLES", "build_app"]

log = logging.getLogger(__name__)

WRITE_ROLES = frozenset({"admin", "operator"})
APPROVE_ROLES = frozenset({"admin", "custodian"})
STREAM_POLL_S = 0.5
_FAILED_AUDIT_TAIL = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ckms.console", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def _when(at: datetime | str | None) -> str:
    if at is None:
        return "-"
    if isinstance(at, str):
        return at
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _shown(value: Any) -> str:
    """A request value as JSON without the unset (null or empty) parts."""

    def compact(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: compact(x) for k, x in sorted(v.items()) if x not in (None, {}, [], ())}
        if isinstance(v, list):
            return [compact(x) for x in v]
        return v

    return json.dumps(compact(value), sort_keys=True)


def _converge(fleet: api.KeyFleet, since: datetime) -> dict[str, Any]:
    """Seconds from the newest version's creation to each converged host's last ack.

    Both times are the controller's, so the chart does not depend on the viewer's clock.
    """
    seconds = sorted(
        max(0.0, (h.updated_at - since).total_seconds())
        for h in fleet.hosts
        if h.converged and h.updated_at is not None
    )
    # The controller's "now" as the reply saw it: any host's last ack time plus its age.
    nows = [
        h.updated_at + timedelta(seconds=h.age_s)
        for h in fleet.hosts
        if h.updated_at is not None and h.age_s is not None
    ]
    elapsed = max(0.0, (max(nows) - since).total_seconds()) if nows else 0.0
    return {"converge_s": [round(s, 3) for s in seconds], "elapsed_s": round(elapsed, 3)}


class Console:
    """The pages of one console (one operator's session to the controller)."""

    def __init__(self, session: Session, gate: Gate, controller: str) -> None:
        self.rpc = session
        self.gate = gate
        self.controller = controller
        self.env = _env()
        self.me: api.WhoamiReply | None = None

    async def call(self, method: str, params: BaseModel | dict[str, Any] | None, reply: Any) -> Any:
        """One admin RPC call as the console's operator."""
        return await self.rpc.call(method, params, reply)

    async def whoami(self) -> api.WhoamiReply:
        """The viewer as the controller knows them (asked once)."""
        if self.me is None:
            self.me = await self.call("whoami", None, api.WhoamiReply)
        return self.me

    async def page(
        self, request: web.Request, template: str, status: int = 200, **values: Any
    ) -> web.Response:
        """Render ``template`` with what every page needs (viewer, CSRF token, navigation)."""
        me = await self.whoami()
        html = self.env.get_template(template).render(
            me=me,
            can_write=me.role in WRITE_ROLES,
            can_approve=me.role in APPROVE_ROLES,
            csrf=self.gate.csrf(request.get(SESSION)) or "",
            path=request.path,
            controller=self.controller,
            **values,
        )
        return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)

    async def refused(self, request: web.Request, exc: CKMSError, back: str) -> web.Response:
        """The controller's message for a refused action (nothing was changed)."""
        status = 403 if isinstance(exc, PermissionDeniedError) else 409
        if isinstance(exc, TransportError):
            status = 502
        request_id = exc.request_id if isinstance(exc, ApprovalRequiredError) else None
        if request_id is not None:
            status = 202
        return await self.page(
            request,
            "message.html",
            status=status,
            title="Waiting for approval" if request_id else "Refused",
            message=str(exc),
            kind="info" if request_id else "error",
            back=back,
        )

    # -- reading pages --------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        """Seal state, Kafka, hosts that need attention, what is due, requests, failures."""
        me = await self.whoami()
        status = await self.call("status", None, api.StatusReply)
        requests: tuple[api.RequestInfo, ...] = ()
        with contextlib.suppress(PermissionDeniedError):
            requests = (await self.call("request.list", None, api.RequestListReply)).requests
        waiting = [
            r
            for r in requests
            if me.role in APPROVE_ROLES
            and r.state == "pending"
            and not r.expired
            and r.requester != me.name
        ]
        fleet: tuple[api.KeyFleet, ...] = ()
        failures: list[api.AuditRecordInfo] = []
        if me.role != "custodian":
            fleet = (
                await self.call(
                    "fleet.status", api.FleetStatusParams(limit=200), api.FleetStatusReply
                )
            ).keys
            tail = await self.call(
                "audit.tail", api.AuditTailParams(count=_FAILED_AUDIT_TAIL), api.AuditTailReply
            )
            failures = [r for r in reversed(tail.records) if r.outcome != "ok"][:10]
        failed = sorted({h.host for k in fleet for h in k.hosts if h.failed})
        drifting = sorted({h.host for k in fleet for h in k.hosts if h.drift})
        return await self.page(
            request,
            "overview.html",
            status_reply=status,
            waiting=waiting,
            failed_hosts=failed,
            drifting_hosts=drifting,
            failures=failures,
            fleet=fleet,
            audit_window=_FAILED_AUDIT_TAIL,
        )

    async def keys(self, request: web.Request) -> web.Response:
        """Every key, searchable and filtered by team, type, primary state and due date."""
        listed = [k async for page in api.key_pages(self.call) for k in page.keys]
        q = request.query.get("q", "").strip().lower()
        team = request.query.get("team", "")
        kind = request.query.get("type", "")
        state = request.query.get("state", "")
        due = request.query.get("due", "")
        now = datetime.now(UTC)
        horizon = {"1": 1, "7": 7, "30": 30}.get(due)
        shown = [
            k
            for k in listed
            if (not q or q in k.name.lower())
            and (not team or k.name.split("/", 1)[0] == team)
            and (not kind or k.type == kind)
            and (not state or k.primary_state == state)
            and (
                horizon is None
                or (
                    k.next_rotation_at is not None
                    and k.next_rotation_at <= now + timedelta(days=horizon)
                )
            )
        ]
        return await self.page(
            request,
            "keys.html",
            keys=shown,
            total=len(listed),
            teams=sorted({k.name.split("/", 1)[0] for k in listed}),
            types=sorted({k.type for k in listed}),
            states=sorted({k.primary_state for k in listed if k.primary_state}),
            query={"q": q, "team": team, "type": kind, "state": state, "due": due},
        )

    async def key(self, request: web.Request) -> web.Response:
        """One key: versions and their timeline, policy, targets, install spec, fleet."""
        name = request.match_info["name"]
        try:
            _valid_name(name)
            info = (await self.call("key.show", api.KeyRef(name=name), api.KeyChangeReply)).key
        except CKMSError as exc:
            return await self.refused(request, exc, "/keys")
        history = await self.call("key.history", api.KeyRef(name=name), api.KeyHistoryReply)
        fleet = await self.call(
            "fleet.status", api.FleetStatusParams(key=name), api.FleetStatusReply
        )
        return await self.page(
            request,
            "key.html",
            key=info,
            history=history.history,
            fleet=fleet.keys[0],
            reasons=[r.value for r in RevocationReason],
        )

    async def key_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the key's fleet view whenever it changes (the live table)."""
        name = request.match_info["name"]
        try:
            _valid_name(name)
        except CKMSError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        last = None
        params = api.FleetStatusParams(key=name)
        since: tuple[tuple[int, ...], datetime] | None = None
        try:
            while True:
                try:
                    fleet = (await self.call("fleet.status", params, api.FleetStatusReply)).keys[0]
                    if since is None or since[0] != fleet.wanted_versions:
                        key = await self.call("key.show", api.KeyRef(name=name), api.KeyChangeReply)
                        since = (fleet.wanted_versions, max(v.created_at for v in key.key.versions))
                    data = json.dumps(
                        {**fleet.model_dump(mode="json"), **_converge(fleet, since[1])}
                    )
                except CKMSError as exc:
                    data = json.dumps({"error": str(exc)})
                if data != last:
                    await response.write(f"event: fleet\ndata: {data}\n\n".encode())
                    last = data
                else:
                    await response.write(b": keep-alive\n\n")
                await asyncio.sleep(STREAM_POLL_S)
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    async def hosts(self, request: web.Request) -> web.Response:
        """Every host: labels, last seen, staleness, drift and failures."""
        listed = [h async for page in api.host_pages(self.call) for h in page.hosts]
        fleet = [
            k
            async for page in api.fleet_pages(self.call, limit=api.FLEET_ROWS_MAX)
            for k in page.keys
        ]
        failed = {h.host for k in fleet for h in k.hosts if h.failed}
        drift = {h.host for k in fleet for h in k.hosts if h.drift}
        return await self.page(
            request,
            "hosts.html",
            hosts=listed,
            failed=failed,
            drift=drift,
            now=datetime.now(UTC),
        )

    async def host(self, request: web.Request) -> web.Response:
        """One host: what it holds per key, and its failures."""
        name = request.match_info["name"]
        try:
            info = await self.call("host.show", api.HostRef(name=name), api.HostInfo)
        except CKMSError as exc:
            return await self.refused(request, exc, "/hosts")
        rows = []
        for key in info.keys:
            fleet = await self.call(
                "fleet.status", api.FleetStatusParams(key=key), api.FleetStatusReply
            )
            for h in fleet.keys[0].hosts:
                if h.host == name:
                    rows.append((key, h))
        return await self.page(request, "host.html", host=info, rows=rows)

    async def audit(self, request: web.Request) -> web.Response:
        """The audit tail, filtered by actor, action and outcome."""
        try:
            count = max(1, min(1000, int(request.query.get("count", "100"))))
        except ValueError:
            count = 100
        tail = await self.call("audit.tail", api.AuditTailParams(count=count), api.AuditTailReply)
        actor = request.query.get("actor", "").strip()
        action = request.query.get("action", "").strip()
        outcome = request.query.get("outcome", "")
        records = [
            r
            for r in reversed(tail.records)
            if (not actor or actor in r.actor)
            and (not action or action in r.action)
            and (not outcome or r.outcome == outcome)
        ]
        return await self.page(
            request,
            "audit.html",
            records=records,
            size=tail.size,
            query={"actor": actor, "action": action, "outcome": outcome, "count": count},
            verify=None,
        )

    async def audit_verify(self, request: web.Request) -> web.Response:
        """Verify the whole log now and show the result."""
        try:
            result = await self.call("audit.verify", None, api.AuditVerifyReply)
        except CKMSError as exc:
            return await self.refused(request, exc, "/audit")
        tail = await self.call("audit.tail", api.AuditTailParams(count=50), api.AuditTailReply)
        return await self.page(
            request,
            "audit.html",
            records=list(reversed(tail.records)),
            size=tail.size,
            query={"actor": "", "action": "", "outcome": "", "count": 50},
            verify=result,
        )

    async def audit_export(self, request: web.Request) -> web.StreamResponse:
        """The whole log as JSON lines with its signed checkpoints (``ckms audit export``)."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Content-Disposition": 'attachment; filename="ckms-audit.jsonl"',
            }
        )
        await response.prepare(request)
        params = api.AuditExportParams()
        while True:
            page = await self.call("audit.export", params, api.AuditExportReply)
            await response.write("".join(line + "\n" for line in page.lines).encode())
            if page.next_start is None:
                break
            params = api.AuditExportParams(start=page.next_start, upto=page.upto)
        await response.write_eof()
        return response

    async def requests(self, request: web.Request) -> web.Response:
        """Dual-control requests and exactly what each would run."""
        show_all = request.query.get("all") == "1"
        reply = await self.call(
            "request.list", api.RequestListParams(all=show_all), api.RequestListReply
        )
        changes = {r.id: await self._changes(r) for r in reply.requests if r.state == "pending"}
        return await self.page(
            request, "requests.html", requests=reply.requests, show_all=show_all, changes=changes
        )

    async def _changes(self, req: api.RequestInfo) -> list[tuple[str, str, str]]:
        """(what, now, after) rows for a pending request: the key as it is against the request."""
        params = req.params
        name = params.get("name")
        if not req.operation.startswith("key.") or not isinstance(name, str):
            return [(k, "", _shown(v)) for k, v in sorted(params.items())]
        try:
            key = (await self.call("key.show", api.KeyRef(name=name), api.KeyChangeReply)).key
        except CKMSError:
            key = None
        if req.operation == "key.create" or key is None:
            rows = [("key", "does not exist" if key is None else "exists", name)]
            return rows + [
                (k, "", _shown(v))
                for k, v in sorted(params.items())
                if k != "name" and _shown(v) not in ("null", "{}", "[]")
            ]
        if req.operation == "key.policy":
            current = key.policy.model_dump(mode="json")
            return [
                (field, json.dumps(current.get(field)), json.dumps(value))
                for field, value in sorted(params.get("policy", {}).items())
                if value is not None
            ]
        if req.operation == "key.targets":
            rows = [
                (
                    "targets",
                    _shown(key.targets.model_dump(mode="json")),
                    _shown(params.get("targets")),
                )
            ]
            if params.get("install"):
                rows.append(
                    (
                        "install",
                        _shown(key.install.model_dump(mode="json")),
                        _shown(params["install"]),
                    )
                )
            return rows
        verb = req.operation.removeprefix("key.")
        wanted = params.get("version")
        versions = [v for v in key.versions if wanted is None or v.version == wanted]
        detail = f" ({params['reason']})" if verb == "revoke" and params.get("reason") else ""
        return [(f"v{v.version}", str(v.state), f"{verb}{detail}") for v in versions]

    # -- actions --------------------------------------------------------------------------

    async def request_decide(self, request: web.Request) -> web.Response:
        """Approve or reject one request."""
        form = await request.post()
        rid = request.match_info["id"]
        try:
            if request.match_info["verb"] == "approve":
                reply = await self.call("request.approve", api.RequestRef(id=rid), api.ApproveReply)
                done = reply.request
                message = f"Request {rid} approved: {done.operation} on {done.object} ran."
            else:
                reason = str(form.get("reason") or "") or None
                await self.call(
                    "request.reject",
                    api.RequestRejectParams(id=rid, reason=reason),
                    api.RequestInfo,
                )
                message = f"Request {rid} rejected."
        except CKMSError as exc:
            return await self.refused(request, exc, "/requests")
        return await self.page(
            request, "message.html", title="Done", message=message, kind="ok", back="/requests"
        )

    async def key_new(self, request: web.Request) -> web.Response:
        """The create-key form; a POST creates the key (the CLI's parsers and messages)."""
        values = {
            k: ""
            for k in (
                "name",
                "type",
                "targets",
                "env",
                "path",
                "format",
                "mode",
                "cryptoperiod",
                "grace",
                "approvals",
                "length",
            )
        }
        if request.method == "POST":
            form = await request.post()
            values.update({k: str(form.get(k, "")).strip() for k in values})
            try:
                kt = parse_key_type(values["type"])
                _valid_name(values["name"])
                params = api.KeyCreateParams(
                    name=values["name"],
                    type=str(kt),
                    policy=_policy_patch(
                        values["cryptoperiod"] or None,
                        values["grace"] or None,
                        None,
                        None,
                        values["approvals"] or None,
                    ),
                    targets=parse_targets(values["targets"].split(), env=values["env"] or None),
                    install=_install(
                        str(kt),
                        values["path"] or None,
                        values["format"] or None,
                        None,
                        None,
                        values["mode"] or None,
                        None,
                        None,
                    ),
                    secret_length=int(values["length"]) if values["length"].isdigit() else None,
                )
                await self.call("key.create", params, api.KeyChangeReply)
            except CKMSError as exc:
                if isinstance(exc, ApprovalRequiredError):
                    return await self.refused(request, exc, "/keys")
                return await self.page(
                    request,
                    "key_new.html",
                    status=400,
                    error=str(exc),
                    values=values,
                    types=[t.value for t in KeyType],
                    formats=[f.value for f in InstallFormat],
                )
            raise web.HTTPSeeOther(f"/keys/{params.name}")
        return await self.page(
            request,
            "key_new.html",
            error=None,
            values=values,
            types=[t.value for t in KeyType],
            formats=[f.value for f in InstallFormat],
        )

    async def key_rotate(self, request: web.Request) -> web.Response:
        """Rotate, then show the key page whose live table follows the fleet."""
        name = request.match_info["name"]
        form = await request.post()
        try:
            _valid_name(name)
            await self.call(
                "key.rotate",
                api.KeyRotateParams(name=name, reason=str(form.get("reason") or "") or None),
                api.KeyChangeReply,
            )
        except CKMSError as exc:
            return await self.refused(request, exc, f"/keys/{name}")
        raise web.HTTPSeeOther(f"/keys/{name}")

    async def key_revoke(self, request: web.Request) -> web.Response:
        """Revoke with a KMIP reason, confirmed by typing the key's name."""
        name = request.match_info["name"]
        form = await request.post()
        try:
            _valid_name(name)
            if str(form.get("confirm", "")).strip() != name:
                raise CKMSError(
                    f"not revoked: type the key name {name!r} exactly to confirm the revocation"
                )
            version_text = str(form.get("version") or "").strip()
            await self.call(
                "key.revoke",
                api.KeyRevokeParams(
                    name=name,
                    reason=parse_reason(str(form.get("reason", ""))),
                    version=int(version_text) if version_text.isdigit() else None,
                    message=str(form.get("message") or "") or None,
                ),
                api.KeyChangeReply,
            )
        except CKMSError as exc:
            return await self.refused(request, exc, f"/keys/{name}")
        raise web.HTTPSeeOther(f"/keys/{name}")

    async def host_enroll(self, request: web.Request) -> web.Response:
        """Make an enrollment token; the agent command is shown once and never stored."""
        if request.method == "GET":
            return await self.page(
                request, "enroll.html", error=None, values={"name": "", "labels": ""}, command=None
            )
        form = await request.post()
        values = {k: str(form.get(k, "")).strip() for k in ("name", "labels")}
        try:
            labels = parse_labels(values["labels"].split()) if values["labels"] else {}
            reply = await self.call(
                "host.enroll",
                api.HostEnrollParams(name=values["name"], labels=labels),
                api.HostEnrollReply,
            )
        except CKMSError as exc:
            if isinstance(exc, PermissionDeniedError):
                return await self.refused(request, exc, "/hosts")
            return await self.page(
                request, "enroll.html", status=400, error=str(exc), values=values, command=None
            )
        command = api.agent_enroll_command(self.controller, reply.host_key_fingerprint)
        return await self.page(
            request,
            "enroll.html",
            error=None,
            values=values,
            command=command,
            token=reply.token.get_secret_value(),
            reply=reply,
        )

    # -- login ----------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        """Exchange the one-time token for a session cookie (once)."""
        session = self.gate.spend(request.query.get("token", ""))
        if session is None:
            return web.Response(
                status=403,
                text="this one-time link was used already or is wrong: restart `ckms console` "
                "for a new one\n",
                content_type="text/plain",
            )
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
        return response


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    kinds = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or suffix not in kinds:
        raise web.HTTPNotFound()
    resource = resources.files("ckms.console").joinpath("static", name)
    if not resource.is_file():
        raise web.HTTPNotFound()
    return web.Response(body=resource.read_bytes(), content_type=kinds[suffix], charset="utf-8")


def _errors_middleware(console: Console) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A controller error while reading a page shows its message, not a bare 500."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except CKMSError as exc:
            log.warning("console page %s: %s", request.path, type(exc).__name__)
            try:
                return await console.refused(request, exc, "/")
            except CKMSError:  # the controller is unreachable: not even whoami works
                return web.Response(
                    status=502,
                    text=f"the controller did not answer: {exc}\n",
                    content_type="text/plain",
                )

    return middleware


def build_app(session: Session, gate: Gate, controller: str) -> web.Application:
    """The aiohttp application of one console."""
    console = Console(session, gate, controller)
    app = web.Application(
        middlewares=[security_middleware(gate), _errors_middleware(console)],
        client_max_size=64 * 1024,
    )
    r = app.router
    r.add_get("/login", console.login)
    r.add_get("/static/{file}", _static)
    r.add_get("/", console.overview)
    r.add_get("/keys", console.keys)
    r.add_route("*", "/keys/new", console.key_new)
    r.add_get("/keys/{name:[^/]+/[^/]+}", console.key)
    r.add_get("/keys/{name:[^/]+/[^/]+}/stream", console.key_stream)
    r.add_post("/keys/{name:[^/]+/[^/]+}/rotate", console.key_rotate)
    r.add_post("/keys/{name:[^/]+/[^/]+}/revoke", console.key_revoke)
    r.add_get("/hosts", console.hosts)
    r.add_route("*", "/hosts/enroll", console.host_enroll)
    r.add_get("/hosts/{name}", console.host)
    r.add_get("/audit", console.audit)
    r.add_post("/audit/verify", console.audit_verify)
    r.add_get("/audit/export", console.audit_export)
    r.add_get("/requests", console.requests)
    r.add_post("/requests/{id}/{verb:approve|reject}", console.request_decide)
    return app
