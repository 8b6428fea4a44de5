"""The SSH request/reply format: one exec channel per request, JSON in and out.

Request: the exec command is ``<method>`` optionally followed by one space and a JSON object of
parameters, e.g. ``fetch {"key":"payments/db","version":3}`` — so a plain OpenSSH client can
call it as ``ssh -p PORT user@controller 'fetch {...}'``. Reply: one line of canonical JSON on
stdout, ``{"ok":true,"result":{...}}`` with exit status 0, or
``{"ok":false,"error":{"type":..,"message":..,"retriable":..}}`` with exit status 1.
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
"""Largest exec command accepted (method plus JSON parameters)."""

MAX_REPLY_BYTES = 4 * 1024 * 1024
"""Largest reply a client reads (a sync reply for a host with many keys stays far below)."""

_METHOD_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class RpcErrorInfo(BaseModel):
    """A refused request, as the client sees it: the error class name and a safe message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    message: str
    retriable: bool = False
    request_id: str | None = None
    """Set for ApprovalRequiredError: the approval request the refused call created."""


def parse_request(command: str | None) -> tuple[str, dict[str, Any]]:
    """Split an exec command into method and parameters, refusing anything malformed."""
    if not command:
        raise ProtocolError("empty request: send `<method> [json params]` as the exec command")
    if len(command.encode("utf-8", "replace")) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request exceeds {MAX_REQUEST_BYTES} bytes")
    method, _, rest = command.strip().partition(" ")
    if not _METHOD_RE.match(method):
        raise ProtocolError(f"bad method name {method[:64]!r}")
    if not rest.strip():
        return method, {}
    try:
        params = json.loads(rest)
    except (ValueError, RecursionError):
        raise ProtocolError(f"parameters of {method} are not valid JSON") from None
    if not isinstance(params, dict):
        raise ProtocolError(f"parameters of {method} must be a JSON object")
    return method, params


def format_request(method: str, params: dict[str, Any] | None = None) -> str:
    """The exec command for one request."""
    if not _METHOD_RE.match(method):
        raise ProtocolError(f"bad method name {method!r}")
    if not params:
        return method
    return method + " " + canonical_json(params).decode()


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
    """Rebuild the ckms error a server reported, falling back to the root class."""
    cls = getattr(errors, info.type, None)
    if not (isinstance(cls, type) and issubclass(cls, CKMSError)):
        cls = CKMSError
    try:
        exc = cls(info.message)
    except TypeError:
        exc = CKMSError(info.message)
    if info.request_id is not None and isinstance(exc, errors.ApprovalRequiredError):
        exc.request_id = info.request_id
    return exc
