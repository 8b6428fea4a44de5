"""The framed request/reply channel: many requests in flight on one long-lived SSH channel.

An exec channel per request costs about nine SSH packets (open, exec, data, EOF, exit status,
close, each encrypted); agents make a request every few seconds for ever, so they open one
session channel on the ``ckms-rpc`` subsystem instead and send *frames* on it. The method
dispatch is the exec path's (authorization, parameters, bounds, limits, audit, replies): only
the transport differs.

Every frame is ``length`` (4 bytes, big-endian, the size of what follows) and then:

- request (client to server): ``id`` (4 bytes, big-endian, not 0), ``method length`` (1
  byte), the method name (ASCII), and the parameters, a JSON object or nothing (as an exec
  request's body);
- reply (server to client): ``id`` of the request it answers, then the reply line exactly as
  an exec request gets it on stdout (``{"ok":true,"result":...}`` or ``{"ok":false,...}``);
- channel frame (server to client): ``id`` 0, then canonical JSON: the ``hello`` the server
  sends first (protocol and its bounds), or a refusal that ends the channel (a frame that
  could not be read: oversized, truncated, a reused id). Later server-push frames (events
  relayed to the agent) use id 0 too; a client ignores a channel frame it does not know.

Replies come in any order: a slow fetch does not hold up a heartbeat sent after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ckms.errors import ProtocolError
from ckms.protocol._rpc import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, check_method
from ckms.protocol.canonical import canonical_json

CHANNEL_SUBSYSTEM = "ckms-rpc"
"""The SSH subsystem name of the channel (``ssh -s ... ckms-rpc``)."""

CHANNEL_PROTOCOL = "ckms-rpc/1"

LENGTH_BYTES = 4
ID_BYTES = 4
MAX_METHOD_BYTES = 64
MAX_REQUEST_FRAME = ID_BYTES + 1 + MAX_METHOD_BYTES + MAX_REQUEST_BYTES
"""Largest request frame (after its length): the exec bound on the parameters plus the
header. A larger length prefix is refused before any of the frame is read."""
MAX_REPLY_FRAME = ID_BYTES + MAX_REPLY_BYTES
"""Largest reply frame a client reads: the exec bound on a reply plus its id."""
MAX_REQUEST_ID = (1 << 32) - 1
CHANNEL_ID = 0
"""The id of the server's own frames (hello, refusal, push); no request has it."""


@dataclass(frozen=True)
class RequestFrame:
    """One request as read off the channel; ``method`` is checked by the dispatch, not here,
    so a bad name is refused (and counted) like a bad exec command."""

    id: int
    method: bytes
    params: bytes


@dataclass(frozen=True)
class Hello:
    """What the server says first: its protocol and how many requests it takes at once."""

    protocol: str
    max_in_flight: int
    max_request_frame: int


def length_prefix(length: int) -> bytes:
    return length.to_bytes(LENGTH_BYTES, "big")


def frame_length(prefix: bytes, *, bound: int) -> int:
    """The length a prefix announces; ProtocolError past ``bound``, before the body is read."""
    length = int.from_bytes(prefix, "big")
    if length > bound:
        raise ProtocolError(f"frame of {length} bytes exceeds the {bound}-byte bound")
    if length < ID_BYTES:
        raise ProtocolError(f"frame of {length} bytes is too short for a request id")
    return length


def encode_request(request_id: int, method: str, params: dict[str, Any] | None) -> bytes:
    """A request frame, length prefix included."""
    name = check_method(method).encode("ascii")
    body = canonical_json(params) if params else b""
    if len(body) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request exceeds {MAX_REQUEST_BYTES} bytes")
    if not 0 < request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"request id {request_id} is out of range")
    size = ID_BYTES + 1 + len(name) + len(body)
    return b"".join(
        (length_prefix(size), request_id.to_bytes(ID_BYTES, "big"), bytes([len(name)]), name, body)
    )


def decode_request(body: bytes) -> RequestFrame:
    """Split a request frame (after its length); ProtocolError when its framing is broken."""
    request_id = int.from_bytes(body[:ID_BYTES], "big")
    if request_id == CHANNEL_ID:
        raise ProtocolError("request id 0 is reserved for the server's frames")
    if len(body) < ID_BYTES + 1:
        raise ProtocolError(f"request {request_id}: frame ends before its method")
    size = body[ID_BYTES]
    start = ID_BYTES + 1
    if size > MAX_METHOD_BYTES or start + size > len(body):
        raise ProtocolError(f"request {request_id}: method length {size} does not fit the frame")
    return RequestFrame(request_id, body[start : start + size], body[start + size :])


def encode_reply(request_id: int, line: bytes) -> bytes:
    """A reply frame (the exec reply line, tagged with its request's id)."""
    return length_prefix(ID_BYTES + len(line)) + request_id.to_bytes(ID_BYTES, "big") + line


def split_reply(body: bytes) -> tuple[int, bytes]:
    """A reply frame's request id and reply line (``id`` 0: a channel frame)."""
    return int.from_bytes(body[:ID_BYTES], "big"), body[ID_BYTES:]


def encode_hello(max_in_flight: int) -> bytes:
    hello = {
        "hello": {
            "protocol": CHANNEL_PROTOCOL,
            "max_in_flight": max_in_flight,
            "max_request_frame": MAX_REQUEST_FRAME,
        }
    }
    return encode_reply(CHANNEL_ID, canonical_json(hello))


def parse_channel_frame(line: bytes) -> dict[str, Any]:
    """A channel frame's JSON object (hello, refusal, push)."""
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        raise ProtocolError("channel frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError("channel frame is not an object")
    return frame


def parse_hello(frame: dict[str, Any]) -> Hello:
    """The server's hello, or ProtocolError when the frame is not one this client speaks."""
    hello = frame.get("hello")
    if not isinstance(hello, dict) or hello.get("protocol") != CHANNEL_PROTOCOL:
        raise ProtocolError(f"the server does not speak {CHANNEL_PROTOCOL}")
    in_flight, request_frame = hello.get("max_in_flight"), hello.get("max_request_frame")
    if not isinstance(in_flight, int) or in_flight < 1 or not isinstance(request_frame, int):
        raise ProtocolError("the server's hello is malformed")
    return Hello(CHANNEL_PROTOCOL, in_flight, request_frame)
