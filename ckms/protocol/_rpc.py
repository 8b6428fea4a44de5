"""The SSH request/reply format: one exec channel per request, JSON in and out.

Request: the exec command is the method name; its parameters, a JSON object, are the request
*body* on stdin, ended by EOF (``echo '{"key":"payments/db"}' | ssh -p PORT user@controller
key.show``; ``ssh -n ... status`` for a call without parameters). The body, never the command
line, carries secrets: SSH implementations log the exec command (asyncssh at INFO on both ends),
so a share, passphrase or token there would land in two logs. For OpenSSH one-liners the
parameters may still follow the method in the command (``fetch {"key":...}``), except for
methods whose parameters are secret (:func:`split_command` leaves that check to the server,
which knows them). Reply: one line of canonical JSON on stdout, ``{"ok":true,"result":{...}}``
with exit status 0, or ``{"ok":false,"error":{"type":..,"message":..,"retriable":..}}`` with
exit status 1. Agents send the same requests and get the same reply lines as frames on one
long-lived channel instead (:mod:`ckms.protocol._frames`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from ckms import errors
from ckms.errors import CKMSError, ProtocolError
from ckms.protocol.canonical import canonical_json

MAX_REQUEST_BYTES = 32 * 1024
"""Largest exec command accepted, and largest request body (each on its own)."""

MAX_REPLY_BYTES = 4 * 1024 * 1024
"""Largest reply a client reads (a sync reply for a host with many keys stays far below)."""

IDEMPOTENT_METHODS: frozenset[str] = frozenset(
    {
        # agents: reads, and writes the controller applies once however often they arrive
        "sync",  # reads what the host should hold; records when it was last seen
        "heartbeat",  # records when the host was last seen
        "fetch",  # reads one wrapped version (each fetch is audited: a repeat is a true record)
        "digest_key",
        "ack",  # keyed by (host, ack seq): a batch sent again is confirmed, not applied twice
        # operators: reads
        "status",
        "whoami",
        "key.list",
        "key.show",
        "key.history",
        "host.list",
        "host.show",
        "fleet.status",
        "ca.show",
        "ca.crl",
        "rollout.status",
        "rollout.list",
        "audit.verify",
        "audit.tail",
        "audit.export",
        "operator.list",
        "request.list",
        "request.show",
        "report.summary",
        "report.keys",
        "backup.read",
    }
)
"""Methods a client may send again, to another replica, after a connection broke with the
request sent and no reply read: applying them twice is applying them once. Every other method
(a rotation, a revocation, an enrollment, a certificate issued, an approval) may have been
applied by the replica that went away, so it is never sent again blindly; the caller is told
it may have been applied. Request routing never depends on this set (the server has its own)."""

_METHOD_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class RpcErrorInfo(BaseModel):
    """A refused request, as the client sees it: the error class name and a safe message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    message: str
    retriable: bool = False
    request_id: str | None = None
    """Set for ApprovalRequiredError: the approval request the refused call created."""


def check_method(method: str) -> str:
    """``method`` if it is a well-formed method name, else ProtocolError."""
    if not _METHOD_RE.fullmatch(method):
        raise ProtocolError(f"bad method name {method[:64]!r}")
    return method


def split_command(command: str | None) -> tuple[str, str | None]:
    """Split an exec command into the method and its inline parameters (None: in the body)."""
    if not command:
        raise ProtocolError("empty request: send `<method>` as the exec command")
    if len(command.encode("utf-8", "replace")) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request exceeds {MAX_REQUEST_BYTES} bytes")
    method, _, rest = command.strip().partition(" ")
    if not _METHOD_RE.match(method):
        raise ProtocolError(f"bad method name {method[:64]!r}")
    return method, rest if rest.strip() else None


def parse_params(method: str, text: str | bytes) -> dict[str, Any]:
    """Decode the parameters of ``method`` (a JSON object; empty means none)."""
    if len(text) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request exceeds {MAX_REQUEST_BYTES} bytes")
    if not text.strip():
        return {}
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(f"parameters of {method} are not valid JSON") from None
    if not isinstance(params, dict):
        raise ProtocolError(f"parameters of {method} must be a JSON object")
    return params


def parse_request(command: str | None, body: bytes = b"") -> tuple[str, dict[str, Any]]:
    """Method and parameters of one request, from its command and body; refuses both at once."""
    method, inline = split_command(command)
    if inline is not None and body.strip():
        raise ProtocolError(
            f"parameters of {method} given twice: in the command and on stdin; send them once"
        )
    return method, parse_params(method, inline if inline is not None else body)


def format_request(method: str, params: dict[str, Any] | None = None) -> tuple[str, bytes]:
    """The exec command (the method alone) and the body (the parameters) of one request."""
    return check_method(method), canonical_json(params) if params else b""


def ok_reply(result: BaseModel | dict[str, Any] | None) -> bytes:
    """Encode a successful reply line."""
    body = result.model_dump(mode="json") if isinstance(result, BaseModel) else (result or {})
    return canonical_json({"ok": True, "result": body}) + b"\n"


def error_reply(exc: CKMSError) -> bytes:
    """Encode a refusal line from a ckms error (its message is already free of secrets)."""
    info = RpcErrorInfo(
        type=type(exc).__name__,
        message=str(exc),
        retriable=exc.retriable,
        request_id=getattr(exc, "request_id", None),
    )
    return canonical_json({"ok": False, "error": info.model_dump(exclude_none=True)}) + b"\n"


def parse_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply line; a refusal is raised again as the matching ckms error class."""
    if len(data) > MAX_REPLY_BYTES:
        raise ProtocolError(f"reply exceeds {MAX_REPLY_BYTES} bytes")
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("reply is not valid JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ProtocolError("reply is not a ckms RPC reply")
    if reply["ok"]:
        result = reply.get("result")
        if not isinstance(result, dict):
            raise ProtocolError("reply result is not an object")
        return result
    try:
        info = RpcErrorInfo.model_validate(reply.get("error"))
    except ValueError:
        raise ProtocolError("reply error is malformed") from None
    raise error_from_info(info)


def error_from_info(info: RpcErrorInfo) -> CKMSError:
    """Rebuild the ckms error a server reported, falling back to the root class.

    ``retriable`` is the server's word, kept on the rebuilt error even when its class is one
    the client does not know (a busy connection): callers decide on it, not on the message.
    """
    cls = getattr(errors, info.type, None)
    if not (isinstance(cls, type) and issubclass(cls, CKMSError)):
        cls = CKMSError
    try:
        exc = cls(info.message)
    except TypeError:
        exc = CKMSError(info.message)
    if exc.retriable != info.retriable:
        exc.retriable = info.retriable
    if info.request_id is not None and isinstance(exc, errors.ApprovalRequiredError):
        exc.request_id = info.request_id
    return exc
