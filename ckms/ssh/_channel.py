"""Both ends of the framed ``ckms-rpc`` channel (ckms.protocol._frames): the server's frame
loop and the client's request multiplexer.

The server side only moves frames: each request frame goes to the same dispatch an exec
request goes to (authorization, parameters, limits, audit, the reply line), so a rule about
requests lives once, in :class:`ckms.ssh.RpcServer`. What is the channel's own: the frame bound
(checked on the length prefix, before the body is read), the id bookkeeping, a cap on requests
in flight on the channel (refused as busy, like a connection's), and back-pressure (no frame is
read while replies wait for a client that does not read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from ckms.errors import CKMSError, ProtocolError
from ckms.protocol._frames import (
    CHANNEL_ID,
    CHANNEL_SUBSYSTEM,
    LENGTH_BYTES,
    MAX_REPLY_FRAME,
    MAX_REQUEST_FRAME,
    MAX_REQUEST_ID,
    Hello,
    RequestFrame,
    decode_request,
    encode_hello,
    encode_reply,
    encode_request,
    frame_length,
    parse_channel_frame,
    parse_hello,
    split_reply,
)
from ckms.protocol._rpc import RpcErrorInfo, error_from_info, error_reply

log = logging.getLogger(__name__)

_CHANNEL_GONE = (
    OSError,
    asyncssh.Error,
    asyncssh.BreakReceived,
    asyncssh.SignalReceived,
    asyncssh.TerminalSizeChanged,
)
"""What reading or writing a channel raises once the peer is gone or misbehaves at the SSH
level (a break or signal on a channel that is no terminal)."""


class NotSent(Exception):
    """The request never reached the server (its channel did not open, or was closed before
    the request was written): safe to send again, even to another replica."""


Dispatch = Callable[[RequestFrame], Awaitable[bytes]]
Refuse = Callable[[ProtocolError], Awaitable[CKMSError]]


async def _read_frame(
    reader: asyncssh.SSHReader[bytes], *, bound: int, timeout_s: float | None = None
) -> bytes | None:
    """The next frame's body, None at a clean end of the channel (between frames).

    Only a frame begun is timed (``timeout_s`` from its first byte to its last): a channel
    idles between frames for as long as its peer likes (keepalives find dead peers)."""
    first = await reader.read(1)
    if not first:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            prefix = first + await reader.readexactly(LENGTH_BYTES - 1)
            length = frame_length(prefix, bound=bound)
            return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the channel ended inside a frame") from None
    except TimeoutError:
        raise ProtocolError(f"a frame did not arrive within {timeout_s:g} s") from None


class ChannelServer:
    """Serves one ``ckms-rpc`` channel until the client ends it or breaks its framing."""

    def __init__(
        self,
        process: asyncssh.SSHServerProcess[bytes],
        *,
        dispatch: Dispatch,
        busy: Callable[[RequestFrame], bytes],
        refuse: Refuse,
        max_in_flight: int,
        frame_timeout_s: float,
        who: str,
    ) -> None:
        self._process = process
        self._dispatch = dispatch
        self._busy = busy
        self._refuse = refuse
        self._max_in_flight = max_in_flight
        self._frame_timeout_s = frame_timeout_s
        self._who = who
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._gone = False

    async def run(self) -> None:
        self._write(encode_hello(self._max_in_flight))
        try:
            while not self._gone:
                # Back-pressure: replies the client has not read stay in asyncssh's buffer;
                # read no more requests until they have left.
                await self._process.stdout.drain()
                frame = await self._next()
                if frame is None:
                    break
                self._admit(frame)
        except ProtocolError as exc:
            refusal = await self._refuse(exc)
            log.info("channel of %s closed: %s", self._who, refusal)
            self._write(encode_reply(CHANNEL_ID, error_reply(refusal)))
            self._exit(1)
            return
        except _CHANNEL_GONE as exc:
            self._went_away(exc)
        if self._tasks:  # the client ended its side: answer what it asked, then close
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._exit(0)

    async def _next(self) -> RequestFrame | None:
        body = await _read_frame(
            self._process.stdin, bound=MAX_REQUEST_FRAME, timeout_s=self._frame_timeout_s
        )
        if body is None:
            return None
        frame = decode_request(body)
        if frame.id in self._tasks:
            raise ProtocolError(f"request id {frame.id} is already in flight")
        return frame

    def _admit(self, frame: RequestFrame) -> None:
        if len(self._tasks) >= self._max_in_flight:
            self._write(encode_reply(frame.id, self._busy(frame)))
            return
        task = asyncio.get_running_loop().create_task(self._serve(frame))
        self._tasks[frame.id] = task
        task.add_done_callback(lambda _t, rid=frame.id: self._tasks.pop(rid, None))

    async def _serve(self, frame: RequestFrame) -> None:
        line = await self._dispatch(frame)
        self._write(encode_reply(frame.id, line))

    def _write(self, data: bytes) -> None:
        if self._gone:
            return
        try:
            self._process.stdout.write(data)
        except _CHANNEL_GONE as exc:
            self._went_away(exc)

    def _exit(self, status: int) -> None:
        if self._gone:
            return
        try:
            self._process.exit(status)
        except _CHANNEL_GONE as exc:
            self._went_away(exc)
        # Requests still running after a refusal answer a closed channel: nothing to write.
        self._gone = True

    def _went_away(self, exc: BaseException) -> None:
        if not self._gone:
            self._gone = True
            # Only the class name: a disconnect reason is text chosen by the peer.
            log.info("channel of %s: the client went away (%s)", self._who, type(exc).__name__)


class ChannelClient:
    """The client half: requests by id on one channel, each reply handed to its caller."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], hello: Hello, peer: str) -> None:
        self._process = process
        self.hello = hello
        self._peer = peer
        self._slots = asyncio.Semaphore(hello.max_in_flight)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._closed: str | None = None
        """Why the channel ended (None while it is open)."""
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def open(
        cls, conn: asyncssh.SSHClientConnection, *, timeout_s: float, peer: str
    ) -> ChannelClient | None:
        """The channel, or None when the server does not offer it (then exec per request)."""
        try:
            process = await asyncio.wait_for(
                conn.create_process(
                    subsystem=CHANNEL_SUBSYSTEM, encoding=None, stderr=asyncssh.DEVNULL
                ),
                timeout_s,
            )
        except asyncssh.ChannelOpenError:
            log.info(
                "%s offers no %s channel: one exec channel per request", peer, CHANNEL_SUBSYSTEM
            )
            return None
        try:
            async with asyncio.timeout(timeout_s):
                body = await _read_frame(process.stdout, bound=MAX_REPLY_FRAME)
            if body is None:
                raise ProtocolError("the channel closed before the server's hello")
            request_id, line = split_reply(body)
            if request_id != CHANNEL_ID:
                raise ProtocolError("the server's first frame is no hello")
            hello = parse_hello(parse_channel_frame(line))
        except (ProtocolError, TimeoutError) as exc:
            process.close()
            log.info("%s: no %s channel (%s): one exec channel per request", peer,
                     CHANNEL_SUBSYSTEM, exc or type(exc).__name__)  # fmt: skip
            return None
        return cls(process, hello, peer)

    @property
    def alive(self) -> bool:
        return self._closed is None

    async def wait_closed(self) -> None:
        """Return once the channel has ended (its reader stopped), whatever ended it."""
        await asyncio.wait([self._reader])

    async def call(self, method: str, params: dict[str, Any] | None) -> bytes:
        """Send one request and wait for its reply line (the caller bounds the wait).

        Raises NotSent when the channel was down before the request went out, and
        ConnectionResetError when it broke after (the request may have been applied).

        A slot is held from the request until its reply, even when the caller gave up before
        (a timeout): the server still counts the request in flight, so the client does too,
        and never sends more than the server takes."""
        await self._slots.acquire()
        if self._closed is not None:
            self._slots.release()
            raise NotSent(self._closed)
        frame_id = self._next_id()
        try:
            data = encode_request(frame_id, method, params)  # refused if malformed or too big
            self._process.stdin.write(data)
        except _CHANNEL_GONE as exc:
            self._slots.release()
            raise NotSent(str(exc) or type(exc).__name__) from None
        except BaseException:
            self._slots.release()
            raise
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = reply
        # Cancelled with its caller; the reply that comes later is then dropped.
        return await reply

    def _next_id(self) -> int:
        while True:
            frame_id = next(self._ids)
            if frame_id > MAX_REQUEST_ID:
                self._ids = itertools.count(1)
                continue
            if frame_id not in self._pending:
                return frame_id

    async def _read_replies(self) -> None:
        reason = f"the channel to {self._peer} closed"
        try:
            while True:
                body = await _read_frame(self._process.stdout, bound=MAX_REPLY_FRAME)
                if body is None:
                    break
                request_id, line = split_reply(body)
                if request_id == CHANNEL_ID:
                    refusal = self._channel_frame(line)
                    if refusal is not None:
                        reason = f"the channel to {self._peer} was closed by the server: {refusal}"
                        break
                    continue
                waiter = self._pending.pop(request_id, None)
                if waiter is None:
                    raise ProtocolError(f"a reply to request {request_id}, which is not in flight")
                self._slots.release()
                if not waiter.done():
                    waiter.set_result(line)
        except ProtocolError as exc:
            # A server breaking the framing (or a reply past the bound) is not read further.
            reason = f"the channel to {self._peer} is broken: {exc}"
        except _CHANNEL_GONE as exc:
            reason = f"the channel to {self._peer} failed: {str(exc) or type(exc).__name__}"
        self._fail(reason)

    def _channel_frame(self, line: bytes) -> CKMSError | None:
        """A server frame: a refusal that ends the channel is returned; others are ignored."""
        frame = parse_channel_frame(line)
        if frame.get("ok") is False:
            try:
                return error_from_info(RpcErrorInfo.model_validate(frame.get("error")))
            except ValueError:
                return ProtocolError("malformed refusal")
        log.debug("ignoring a channel frame from %s: %s", self._peer, sorted(frame)[:4])
        return None

    def _fail(self, reason: str) -> None:
        self._closed = reason
        for waiter in self._pending.values():
            self._slots.release()
            if not waiter.done():
                waiter.set_exception(ConnectionResetError(reason))
        self._pending.clear()
        self._process.close()

    async def close(self) -> None:
        """Close the channel and stop reading; pending calls fail (ConnectionResetError)."""
        if self._closed is None:
            self._fail(f"the channel to {self._peer} was closed")
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, *_CHANNEL_GONE):
            await self._reader
