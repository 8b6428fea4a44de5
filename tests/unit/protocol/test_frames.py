"""The ckms-rpc frame codec: what a frame holds, and what is refused before it is used."""

from __future__ import annotations

import pytest

from ckms.errors import ProtocolError
from ckms.protocol._frames import (
    MAX_REQUEST_FRAME,
    MAX_REQUEST_ID,
    decode_request,
    encode_hello,
    encode_reply,
    encode_request,
    frame_length,
    parse_channel_frame,
    parse_hello,
    split_reply,
)
from ckms.protocol._rpc import MAX_REQUEST_BYTES


def test_a_request_frame_round_trips() -> None:
    frame = encode_request(7, "key.show", {"key": "payments/db"})
    length = frame_length(frame[:4], bound=MAX_REQUEST_FRAME)
    assert length == len(frame) - 4
    request = decode_request(frame[4:])
    assert (request.id, request.method, request.params) == (
        7,
        b"key.show",
        b'{"key":"payments/db"}',
    )
    assert decode_request(encode_request(MAX_REQUEST_ID, "status", None)[4:]).params == b""


def test_the_client_refuses_what_the_server_would() -> None:
    with pytest.raises(ProtocolError, match="bad method name"):
        encode_request(1, "status\n", None)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_request(1, "echo", {"x": "a" * MAX_REQUEST_BYTES})
    for bad_id in (0, MAX_REQUEST_ID + 1):
        with pytest.raises(ProtocolError, match="out of range"):
            encode_request(bad_id, "echo", None)


def test_a_length_past_the_bound_is_refused_from_the_prefix_alone() -> None:
    with pytest.raises(ProtocolError, match=f"exceeds the {MAX_REQUEST_FRAME}-byte bound"):
        frame_length((MAX_REQUEST_FRAME + 1).to_bytes(4, "big"), bound=MAX_REQUEST_FRAME)
    with pytest.raises(ProtocolError, match="too short"):
        frame_length((3).to_bytes(4, "big"), bound=MAX_REQUEST_FRAME)


def test_replies_and_the_hello() -> None:
    reply = encode_reply(9, b'{"ok":true,"result":{}}\n')
    assert split_reply(reply[4:]) == (9, b'{"ok":true,"result":{}}\n')
    request_id, line = split_reply(encode_hello(16)[4:])
    assert request_id == 0
    hello = parse_hello(parse_channel_frame(line))
    assert (hello.protocol, hello.max_in_flight) == ("ckms-rpc/1", 16)
    with pytest.raises(ProtocolError, match="does not speak"):
        parse_hello({"hello": {"protocol": "ckms-rpc/2"}})
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_channel_frame(b"{nope")
