"""Several SSH-serving processes for one controller (``ssh_workers`` > 1).

One Python process serves SSH on one core; a fleet's requests (handshakes, sync, fetch, ack)
need more. With ``ssh_workers = N`` the controller process becomes a **parent** that serves no
SSH itself: it starts N worker processes (``python -m ckms.controller.workers``), each a full
:class:`~ckms.controller.service.Controller` that only serves SSH, all listening on the same
port with ``SO_REUSEPORT`` (Linux spreads new connections over them; only sockets of the same
user may join the group). The parent keeps the once-only work: the outbox publisher, the
scheduler, the audit anchor and the rollout driver, so none runs twice. Acks are not among
them: each worker applies the acks of the hosts connected to it (idempotent by host and ack
seq), as it answers their syncs.

Parent and worker talk over a socket pair the worker inherits (its descriptor number is the
only argument on its command line), in length-prefixed JSON frames:

- **start** (parent → worker): the settings (paths and addresses; no secret is a setting),
  then **state**: the vault as the parent holds it (:meth:`Vault.share_state`: sealed, or the
  opened secrets). A worker listens only once it holds the parent's state.
- **vault requests** (worker → parent): unseal, submit a share, seal and seal status are
  carried out by the parent's vault (pending shares live there, so custodians may reach
  different workers), which then sends the new **state** to every worker and waits until
  each confirmed it *before* the operator's request is answered: once ``ckms unseal`` (or
  ``ckms seal``) returns, every worker is unsealed (or sealed). A worker that does not
  confirm in time is killed and restarted (it gets the state at start).
- **wake** (worker → parent): a worker committed outbox rows (publish now, not at the next
  poll) or applied acks (judge rollouts now).

Secrets cross only that socket pair: never a file, a command line or an environment variable;
a worker, like the parent, makes no core dump and lets no other process of its user read its
memory (:func:`ckms._hardening.protect_memory`).
Workers share the store (SQLite WAL): each process's caches notice the others' commits
(``Store.generation``, at most one ``PRAGMA data_version`` every 50 ms per cache). A worker that
exits is restarted with a backoff and the restart is audited (``controller.worker``); a worker
whose parent is gone stops (end of file on its socket).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ckms import errors
from ckms._aio import stop_if_cancelled
from ckms._backoff import Backoff
from ckms.controller.sealing import SealStatus, UnsealProgress, Vault
from ckms.errors import CKMSError, TransportError
from ckms.store import Clock, Store, utc_now
from ckms.store import audit as audit_log

if TYPE_CHECKING:
    from ckms.controller.service import Controller

__all__ = ["ParentLink", "RemoteVault", "WorkerPool", "reserve_port"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_MAX_FRAME = 1 << 20
CONFIRM_TIMEOUT_S = 15.0
"""How long the parent waits for a worker to confirm a new vault state before killing it."""
START_TIMEOUT_S = 60.0
"""How long a new worker may take to open the store and listen."""
STOP_TIMEOUT_S = 15.0
_HEALTHY_S = 60.0
_ANCHOR_PUSH_S = 1.0


class _Frames:
    """Length-prefixed JSON frames over one stream socket (one writer at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def over(cls, sock: socket.socket) -> _Frames:
        reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_FRAME)
        return cls(reader, writer)

    async def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        async with self._lock:
            self._writer.write(_HEADER.pack(len(body)) + body)
            await self._writer.drain()

    async def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at end of file (the other side is gone)."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > _MAX_FRAME:
                raise TransportError("worker link frame too large")
            body = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        message = json.loads(body)
        if not isinstance(message, dict):
            raise TransportError("worker link frame is not an object")
        return message

    def close(self) -> None:
        self._writer.close()


def _error_reply(exc: CKMSError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _raise_reply(error: dict[str, Any]) -> None:
    """Raise the parent's error as the same ckms error class (the RPC reply stays the same)."""
    cls = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message", "the controller's parent process refused"))
    if isinstance(cls, type) and issubclass(cls, CKMSError):
        raise cls(message)
    raise CKMSError(message)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening ``SO_REUSEPORT`` socket holding ``host:port`` for the workers.

    It receives no connections (only listening sockets do) but keeps the port, and names it
    when ``port`` is 0, for as long as the parent lives, across worker restarts.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise CKMSError("ssh_workers > 1 needs SO_REUSEPORT (Linux, BSD); set ssh_workers = 1")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


# -- the parent ------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    frames: _Frames
    confirmations: dict[int, asyncio.Future[None]]
    ready: asyncio.Event
    replies: dict[int, asyncio.Future[dict[str, Any]]]


class WorkerPool:
    """The parent's side: start, supervise and keep ``count`` SSH workers in the vault's state."""

    def __init__(
        self,
        controller: Controller,
        count: int,
        *,
        wake: dict[str, Callable[[], None]],
        clock: Clock = utc_now,
    ) -> None:
        self._controller = controller
        self._count = count
        self._wake = wake
        self._clock = clock
        self._workers: dict[int, _Worker] = {}
        self._state_lock = asyncio.Lock()
        self._seq = 0
        self._calls = 0
        self._reservation: socket.socket | None = None
        self.port: int | None = None
        self.restarts = 0
        """Workers restarted since the parent started (a metric and for tests)."""
        self.started = asyncio.Event()
        self._answering: set[asyncio.Task[None]] = set()
        self._anchor_sent: dict[str, Any] | None = None

    @property
    def _vault(self) -> Vault:
        return self._controller.vault

    @property
    def _store(self) -> Store:
        assert self._controller.store is not None
        return self._controller.store

    def pids(self) -> dict[int, int]:
        """The live workers' process ids by worker number."""
        return {i: w.process.pid for i, w in self._workers.items() if w.ready.is_set()}

    async def run(self) -> None:
        """Start every worker, keep restarting those that exit, until cancelled."""
        settings = self._controller.settings
        self._reservation = reserve_port(settings.listen_host, settings.listen_port)
        self.port = int(self._reservation.getsockname()[1])
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(self._count):
                    group.create_task(self._keep(index), name=f"ssh-worker-{index}")
                group.create_task(self._watch_anchor(), name="ssh-workers-anchor")
        finally:
            self._reservation.close()

    async def _keep(self, index: int) -> None:
        """Run worker ``index``; when it exits, audit that and start it again (backoff)."""
        backoff = Backoff(0.2, 10.0)
        while True:
            stop_if_cancelled()
            began = time.monotonic()
            code = await self._run_one(index)
            if time.monotonic() - began > _HEALTHY_S:
                backoff.reset()  # it had been serving: one crash, not a crash loop
            self.restarts += 1
            log.error("ssh worker %d exited (%s); restarting it", index, code)
            await self._audit_exit(index, code)
            await asyncio.sleep(backoff.next())

    async def _audit_exit(self, index: int, code: int | str | None) -> None:
        try:
            async with self._store.write() as tx:
                await audit_log.append(
                    tx,
                    now=self._clock(),
                    actor="controller",
                    action="controller.worker",
                    object=f"ssh-worker:{index}",
                    outcome="failed",
                    details={"worker": index, "exit": code, "restarts": self.restarts},
                )
        except CKMSError:
            log.exception("could not audit the exit of ssh worker %d", index)

    async def _run_one(self, index: int) -> int | str | None:
        parent_end, child_end = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ckms.controller.workers",
                str(child_end.fileno()),
                self._controller.settings.event_loop,
                pass_fds=(child_end.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        frames = await _Frames.over(parent_end)
        worker = _Worker(index, process, frames, {}, asyncio.Event(), {})
        try:
            settings = self._controller.settings.model_copy(
                update={"listen_port": self.port, "reuse_port": True, "ssh_workers": 1}
            )
            await frames.send(
                {
                    "op": "start",
                    "index": index,
                    "settings": settings.model_dump(mode="json"),
                    "log_level": logging.getLogger().getEffectiveLevel(),
                    "replica": {
                        "name": self._controller.leader.name,
                        "incarnation": self._controller.leader.incarnation,
                    },
                }
            )
            async with self._state_lock:  # no vault change between this state and the next
                self._workers[index] = worker
                await frames.send({"op": "state", "seq": 0, "state": self._vault.share_state()})
                await frames.send({"op": "anchor", "anchor": self._anchor_state()})
            reader = asyncio.create_task(self._serve(worker), name=f"ssh-worker-{index}-link")
            exited = asyncio.create_task(process.wait())
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    await asyncio.wait(
                        [exited, asyncio.create_task(worker.ready.wait())],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            except TimeoutError:
                log.error("ssh worker %d did not start within %.0f s", index, START_TIMEOUT_S)
                return "start timeout"
            await asyncio.wait([exited, reader], return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():  # its link closed first: it is going or wedged
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_TIMEOUT_S):
                        await asyncio.shield(exited)
            return process.returncode if process.returncode is not None else "link closed"
        finally:
            for future in worker.confirmations.values():
                if not future.done():
                    future.set_result(None)  # gone: it will get the state when it restarts
            try:
                await _stop(process)
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # cancelled again while stopping: no worker outlives us
                raise
            finally:
                if self._workers.get(index) is worker:
                    del self._workers[index]
                frames.close()
                parent_end.close()

    async def _serve(self, worker: _Worker) -> None:
        """Read one worker's frames: ready, confirmations, vault requests, wakes."""
        while (message := await worker.frames.receive()) is not None:
            op = message.get("op")
            if op == "ready":
                worker.ready.set()
                if len(self.pids()) == self._count:
                    self.started.set()
            elif op == "confirm":
                future = worker.confirmations.pop(int(message["seq"]), None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif op == "reply":
                pending = worker.replies.pop(int(message["id"]), None)
                if pending is not None and not pending.done():
                    pending.set_result(message)
            elif op == "wake":
                wake = self._wake.get(str(message.get("what")))
                if wake is not None:
                    wake()
            elif op == "disconnect":
                self.disconnect(str(message["name"]), list(message["roles"]), besides=worker.index)
            elif op == "call":
                task = asyncio.create_task(self._answer(worker, message))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
            else:
                log.error("ssh worker %d sent an unknown frame %r", worker.index, op)

    async def _answer(self, worker: _Worker, message: dict[str, Any]) -> None:
        try:
            result = await self.vault_call(str(message.get("method")), message.get("args") or {})
            reply: dict[str, Any] = {"op": "result", "id": message["id"], "result": result}
        except CKMSError as exc:
            reply = {"op": "result", "id": message["id"], "error": _error_reply(exc)}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await worker.frames.send(reply)

    async def vault_call(self, method: str, args: dict[str, Any]) -> Any:
        """Carry out one vault request for a worker; after a change, every worker has it."""
        vault = self._vault
        if method == "checkpoint":  # signed here: the parent holds the anchor (and the lease)
            cp = await vault.checkpoint_audit()
            await self._push_anchor()
            signed = cp.model_dump()
            signed["signature"] = base64.b64encode(cp.signature).decode("ascii")
            return signed
        async with self._state_lock:
            if method == "status":
                return asdict(await vault.status())
            try:
                if method == "unseal_with_passphrase":
                    passphrase = str(args["passphrase"])
                    await vault.unseal_with_passphrase(passphrase, actor=str(args["actor"]))
                    return None
                if method == "unseal_with_shares":
                    mnemonics = list(args["mnemonics"])
                    await vault.unseal_with_shares(mnemonics, actor=str(args["actor"]))
                    return None
                if method == "submit_share":
                    progress = await vault.submit_share(
                        str(args["mnemonic"]),
                        custodian=str(args["custodian"]),
                        key=args.get("key"),
                    )
                    return asdict(progress)
                if method == "seal":
                    await vault.seal(actor=str(args["actor"]))
                    return None
                raise CKMSError(f"unknown vault request {method!r}")
            finally:
                # Failed attempts may have changed it too (a failed unseal forgets everything).
                await self._broadcast_locked()

    def _anchor_state(self) -> dict[str, Any]:
        anchor = self._vault.anchor
        return {
            "loaded": anchor.loaded,
            # Size and head only: what status and verify compare (the checkpoint's signature
            # bytes stay with the parent, which signs and publishes).
            "last": None
            if anchor.last is None
            else {"size": anchor.last.size, "head_hash": anchor.last.head_hash},
            "published_size": anchor.published_size,
            "broken": anchor.broken,
        }

    async def _push_anchor(self) -> None:
        """Send the audit anchor's state to every worker if it changed since the last push.

        Workers answer ``ckms status`` and ``audit verify`` with it, and a broken anchor
        (``audit_blocked``) must refuse their audited operations as it does here."""
        state = self._anchor_state()
        if state == self._anchor_sent:
            return
        self._anchor_sent = state
        for worker in list(self._workers.values()):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await worker.frames.send({"op": "anchor", "anchor": state})

    async def _watch_anchor(self) -> None:
        """Push the anchor's state within a second of any change (loads, checkpoints, breaks)."""
        while True:
            stop_if_cancelled()
            try:
                await self._push_anchor()
            except Exception:
                log.exception("could not send the audit anchor's state to the SSH workers")
            await asyncio.sleep(_ANCHOR_PUSH_S)

    async def broadcast(self) -> None:
        """Send the vault's state to every worker and wait until each confirmed it."""
        async with self._state_lock:
            await self._broadcast_locked()

    async def _broadcast_locked(self) -> None:
        self._seq += 1
        seq, state = self._seq, self._vault.share_state()
        waits: list[tuple[_Worker, asyncio.Future[None]]] = []
        for worker in list(self._workers.values()):
            if worker.process.returncode is not None:
                continue  # exited: it restarts with the state of the day
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            worker.confirmations[seq] = future
            try:
                await worker.frames.send({"op": "state", "seq": seq, "state": state})
            except (ConnectionError, RuntimeError):
                future.set_result(None)  # gone; it restarts with the state of the day
            waits.append((worker, future))
        del state
        for worker, future in waits:
            try:
                async with asyncio.timeout(CONFIRM_TIMEOUT_S):
                    await future
            except TimeoutError:
                log.error("ssh worker %d did not take the vault state; killing it", worker.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    def disconnect(self, name: str, roles: Collection[str], *, besides: int | None = None) -> None:
        """Have every worker (but ``besides``) close ``name``'s connections (best effort)."""
        message = {"op": "disconnect", "name": name, "roles": sorted(roles)}
        for index, worker in list(self._workers.items()):
            if index != besides:
                task = asyncio.create_task(_send_quietly(worker.frames, message))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)

    async def describe(self) -> dict[int, dict[str, Any]]:
        """Each live worker's own account of itself (pid, sealed): what tests and status use."""
        out: dict[int, dict[str, Any]] = {}
        for index, worker in list(self._workers.items()):
            self._calls += 1
            ident = self._calls
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            worker.replies[ident] = future
            await worker.frames.send({"op": "describe", "id": ident})
            async with asyncio.timeout(CONFIRM_TIMEOUT_S):
                reply = await future
            out[index] = {"pid": reply["pid"], "sealed": reply["sealed"]}
        return out

    async def close(self) -> None:
        """Stop every worker still running (SIGTERM, then SIGKILL)."""
        await asyncio.gather(*(_stop(w.process) for w in list(self._workers.values())))
        self._workers.clear()


async def _send_quietly(frames: _Frames, message: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await frames.send(message)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


# -- the worker ------------------------------------------------------------------------------


class ParentLink:
    """A worker's side of the socket pair: vault calls to the parent, state from it."""

    def __init__(self, frames: _Frames) -> None:
        self._frames = frames
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self.vault: RemoteVault | None = None
        self.state_received = asyncio.Event()
        self._waking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_disconnect: Callable[[str, list[str]], None] | None = None
        """Close a principal's connections here (a host revoked, an operator removed)."""

    async def call(self, method: str, **args: Any) -> Any:
        """Have the parent's vault carry out ``method``; its error is raised here as is."""
        self._next += 1
        ident = self._next
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[ident] = future
        try:
            await self._frames.send({"op": "call", "id": ident, "method": method, "args": args})
            reply = await future
        finally:
            self._calls.pop(ident, None)
        if "error" in reply:
            _raise_reply(reply["error"])
        return reply.get("result")

    def wake(self, what: str) -> None:
        """Tell the parent to run ``what`` now (``outbox``, ``rollouts``); best effort, and
        one wake in flight per kind (a burst of commits is one frame)."""
        if what in self._waking:
            return
        self._waking.add(what)
        self._tasks.add(asyncio.get_running_loop().create_task(self._send_wake(what)))

    async def _send_wake(self, what: str) -> None:
        try:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._frames.send({"op": "wake", "what": what})
        finally:
            self._waking.discard(what)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)

    def disconnect(self, name: str, roles: Collection[str]) -> None:
        """Have the parent tell every other worker to close ``name``'s connections."""
        message = {"op": "disconnect", "name": name, "roles": sorted(roles)}
        task = asyncio.get_running_loop().create_task(_send_quietly(self._frames, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ready(self) -> None:
        await self._frames.send({"op": "ready"})

    async def serve(self) -> None:
        """Read the parent's frames until it is gone (then return: the worker stops)."""
        while (message := await self._frames.receive()) is not None:
            op = message.get("op")
            if op == "state":
                assert self.vault is not None
                await self.vault.adopt_state(message.get("state"))
                self.state_received.set()
                await self._frames.send({"op": "confirm", "seq": message["seq"]})
            elif op == "disconnect":
                if self.on_disconnect is not None:
                    self.on_disconnect(str(message["name"]), list(message["roles"]))
            elif op == "anchor":
                assert self.vault is not None
                self.vault.adopt_anchor(message.get("anchor") or {})
            elif op == "result":
                future = self._calls.get(int(message["id"]))
                if future is not None and not future.done():
                    future.set_result(message)
            elif op == "describe":
                assert self.vault is not None
                await self._frames.send(
                    {
                        "op": "reply",
                        "id": message["id"],
                        "pid": os.getpid(),
                        "sealed": self.vault.sealed,
                    }
                )
        for future in self._calls.values():
            if not future.done():
                future.set_exception(TransportError("the controller's parent process is gone"))


class RemoteVault(Vault):
    """A worker's vault: holds what the parent hands over; unseal and seal go to the parent."""

    def __init__(self, store: Store, parent: ParentLink, *, clock: Clock = utc_now) -> None:
        super().__init__(store, clock=clock)
        self._parent = parent
        parent.vault = self

    async def status(self) -> SealStatus:
        return SealStatus(**await self._parent.call("status"))

    async def unseal_with_passphrase(self, passphrase: str, *, actor: str = "custodian") -> None:
        await self._parent.call("unseal_with_passphrase", passphrase=passphrase, actor=actor)

    async def unseal_with_shares(self, mnemonics: Any, *, actor: str = "custodian") -> None:
        if isinstance(mnemonics, str) or not all(isinstance(m, str) for m in mnemonics):
            raise errors.UnsealError("shares must be given as a list of mnemonics")
        await self._parent.call("unseal_with_shares", mnemonics=list(mnemonics), actor=actor)

    async def submit_share(
        self, mnemonic: str, *, custodian: str, key: str | None = None
    ) -> UnsealProgress:
        if not isinstance(mnemonic, str):
            raise errors.UnsealError("a share must be a mnemonic")
        result = await self._parent.call(
            "submit_share", mnemonic=mnemonic, custodian=custodian, key=key
        )
        result["contributors"] = tuple(tuple(pair) for pair in result.get("contributors", ()))
        return UnsealProgress(**result)

    async def seal(self, *, actor: str = "operator") -> None:
        await self._parent.call("seal", actor=actor)

    async def checkpoint_audit(self) -> audit_log.AuditCheckpoint:
        signed = await self._parent.call("checkpoint")
        signed["signature"] = base64.b64decode(signed["signature"], validate=True)
        return audit_log.AuditCheckpoint.model_validate(signed)

    def adopt_anchor(self, state: dict[str, Any]) -> None:
        """Mirror the parent's audit anchor (this process never loads or signs one)."""
        anchor = self.anchor
        last = state.get("last")
        anchor.last = None if last is None else audit_log.Anchor.model_validate(last)
        anchor.loaded = bool(state.get("loaded"))
        anchor.published_size = state.get("published_size")
        anchor.broken = state.get("broken")
        self._store.audit_blocked = anchor.broken


async def _worker_main(fd: int) -> int:
    from ckms._hardening import protect_memory
    from ckms._logging import configure_logging
    from ckms.controller.service import Controller, ControllerSettings

    protect_memory()  # before the parent's state (the opened secrets) arrives
    frames = await _Frames.over(socket.socket(fileno=fd))
    start = await frames.receive()
    if start is None or start.get("op") != "start":
        return 2
    configure_logging(int(start.get("log_level", logging.WARNING)), stream=sys.stderr)
    settings = ControllerSettings.model_validate(start["settings"])
    parent = ParentLink(frames)
    controller = Controller(settings, parent=parent)
    replica = start.get("replica") or {}
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the parent to act on
    try:
        async with controller:
            # This process is part of the parent's replica: it answers for its leadership.
            controller.leader.name = str(replica.get("name", controller.leader.name))
            controller.leader.incarnation = str(
                replica.get("incarnation", controller.leader.incarnation)
            )
            await controller.run()
    except asyncio.CancelledError:
        return 0
    return 0


if __name__ == "__main__":
    from ckms._aio import run

    loop = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    sys.exit(run(_worker_main(int(sys.argv[1])), loop=loop))  # type: ignore[arg-type]
