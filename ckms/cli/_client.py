"""How the CLI reaches the controller: root options → one pinned SSH connection → typed replies.

Options (each with an environment variable): ``--controller HOST:PORT`` (``CKMS_CONTROLLER``,
default ``127.0.0.1:2222``; several replicas separated by commas, tried in turn),
``--identity PATH`` (``CKMS_IDENTITY``, default ``~/.ssh/id_ed25519``), ``--user NAME``
(``CKMS_USER``, default the login name) and
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
from ckms.errors import ConfigError, ProtocolError
from ckms.ssh import Endpoint, RpcClient, load_private_key, parse_endpoints

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

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The controllers named (one, or several replicas), or UsageError."""
        try:
            return parse_endpoints(self.controller or DEFAULT_CONTROLLER)
        except ConfigError as exc:
            raise UsageError(f"--controller: {exc}") from None

    def client(self, endpoint: Endpoint | None = None) -> RpcClient:
        """A pinned RPC client over every controller named (or only ``endpoint``), or
        UsageError naming the missing or bad option."""
        endpoints = self.endpoints if endpoint is None else (endpoint,)
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
                endpoints=endpoints,
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
    async def session(self, endpoint: Endpoint | None = None) -> AsyncIterator[Session]:
        """Open one connection for several requests (to ``endpoint`` only, if given)."""
        async with self.client(endpoint) as client:
            yield Session(client)

    def call(
        self,
        method: str,
        params: BaseModel | dict[str, Any] | None,
        reply: type[M],
        *,
        endpoint: Endpoint | None = None,
    ) -> M:
        """One request on a connection of its own (synchronous), to any controller named
        (or only ``endpoint``: a replica's own state, such as its seal)."""

        async def once() -> M:
            async with self.session(endpoint) as session:
                return await session.call(method, params, reply)

        return run(once())
