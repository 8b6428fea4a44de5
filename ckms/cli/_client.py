"""How the CLI reaches the controller: root options → one pinned SSH connection → typed replies.

Options (each with an environment variable): ``--controller HOST:PORT`` (``CKMS_CONTROLLER``,
default ``127.0.0.1:2222``), ``--identity PATH`` (``CKMS_IDENTITY``, default
``~/.ssh/id_ed25519``), ``--user NAME`` (``CKMS_USER``, default the login name) and
``--host-key-fingerprint SHA256:...`` (``CKMS_CONTROLLER_FINGERPRINT``, required: the CLI never
trusts a controller key on first use).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ckms.cli._errors import UsageError
from ckms.cli._parse import parse_controller
from ckms.errors import ConfigError, ProtocolError
from ckms.ssh import RpcClient, load_private_key

__all__ = ["DEFAULT_CONTROLLER", "Connection", "Session", "run"]

DEFAULT_CONTROLLER = "127.0.0.1:2222"

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion (the CLI is synchronous at its edges)."""
    return asyncio.run(coro)


class Session:
    """One open connection: ``await session.call("key.list", None, KeyListReply)``."""

    def __init__(self, client: RpcClient) -> None:
        self._client = client

    async def call(
        self, method: str, params: BaseModel | dict[str, Any] | None, reply: type[M]
    ) -> M:
        """Make one request and parse its reply with ``reply``."""
        body = (
            params.model_dump(mode="json", exclude_none=True)
            if isinstance(params, BaseModel)
            else params
        )
        result = await self._client.call(method, body or None, timeout_s=120.0)
        try:
            return reply.model_validate(result)
        except ValidationError:
            raise ProtocolError(f"the controller's reply to {method} is not understood") from None


@dataclass
class Connection:
    """The root connection options; nothing is checked until a command needs the controller."""

    controller: str | None = None
    identity: Path | None = None
    user: str | None = None
    fingerprint: str | None = None

    def client(self) -> RpcClient:
        """A pinned RPC client, or UsageError naming the missing or bad option."""
        host, port = parse_controller(self.controller or DEFAULT_CONTROLLER)
        if not self.fingerprint:
            raise UsageError(
                "--host-key-fingerprint (or CKMS_CONTROLLER_FINGERPRINT) is required: the "
                "controller's SSH host key fingerprint, SHA256:..., as `ckms init` printed it"
            )
        identity = self.identity or Path.home() / ".ssh" / "id_ed25519"
        try:
            key = load_private_key(identity)
        except ConfigError as exc:
            raise UsageError(f"--identity: {exc}") from None
        try:
            return RpcClient(
                host=host,
                port=port,
                username=self.user or getpass.getuser(),
                client_key=key,
                host_key_fingerprint=self.fingerprint,
            )
        except ConfigError as exc:
            raise UsageError(f"--host-key-fingerprint: {exc}") from None

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the controller as the user named it."""
        return self.controller or DEFAULT_CONTROLLER

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """Open one connection for several requests."""
        async with self.client() as client:
            yield Session(client)

    def call(self, method: str, params: BaseModel | dict[str, Any] | None, reply: type[M]) -> M:
        """One request on a connection of its own (synchronous)."""

        async def once() -> M:
            async with self.session() as session:
                return await session.call(method, params, reply)

        return run(once())
