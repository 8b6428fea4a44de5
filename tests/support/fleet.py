"""Test support: real agents enrolled with a real controller, run in-process or as processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ckms._kafka_security import KafkaProtocol
from ckms.controller.service import Controller
from ckms.ssh import Endpoint, RpcClient
from ckms_agent.config import AgentConfig, load_config
from ckms_agent.daemon import Agent
from ckms_agent.enroll import enroll
from ckms_agent.identity import load_keys
from tests.support.kafka import dev_ca, use_test_broker_certificate
from tests.support.waiting import wait_until as wait_until  # tests import it from here

FAST_AGENT = {
    "CKMS_AGENT_HEARTBEAT_INTERVAL_S": "1",
    "CKMS_AGENT_RECONNECT_BACKOFF_MIN_S": "0.1",
    "CKMS_AGENT_RECONNECT_BACKOFF_MAX_S": "0.5",
    "CKMS_AGENT_KAFKA_FETCH_MAX_WAIT_MS": "200",
    "CKMS_AGENT_RPC_TIMEOUT_S": "10",
}
"""Environment overrides that make agents react quickly enough for tests."""

TEST_ALLOWED_PATHS = ("/etc/ckms", "/keys", "/var/lib/ckms/keys")
"""The install roots test hosts allow (each host's own config says so, as its admin would)."""


async def enroll_agent(
    controller: Controller,
    base: Path,
    name: str,
    labels: dict[str, str],
    *,
    hooks: dict[str, Any] | None = None,
) -> Path:
    """Create a token on the controller and enroll a real agent with it; return its config.

    The host allows keys under :data:`TEST_ALLOWED_PATHS` and defines ``hooks`` (name → the
    ``[hooks.<name>]`` table of its config).
    """
    token = await controller.hosts.create_token(name, labels, actor="alice")
    config_path = base / name / "agent.toml"
    await enroll(
        controller_host="127.0.0.1",
        controller_port=controller.port,
        token=token.token,
        host_key_fingerprint=controller.host_key_fingerprint,
        state_dir=base / name / "state",
        config_path=config_path,
        root=base / name / "root",
        policy={"allowed_paths": TEST_ALLOWED_PATHS, "hooks": hooks or {}},
    )
    if controller.settings.kafka_security.protocol is not KafkaProtocol.PLAINTEXT:
        use_test_broker_certificate(dev_ca(controller), config_path, name)
    return config_path


def agent_config(config_path: Path, **env: str) -> AgentConfig:
    """The agent's config as its daemon would load it, with the fast test overrides."""
    return load_config(config_path, {**FAST_AGENT, **env})


@contextlib.asynccontextmanager
async def running_agent(config_path: Path, **env: str) -> AsyncIterator[Agent]:
    """Run a real agent in this process until the block ends (a clean stop)."""
    agent = Agent(agent_config(config_path, **env))
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def host_rpc(
    controller: Controller,
    config_path: Path,
    *,
    channel: bool = True,
    also: Sequence[Controller] = (),
) -> AsyncIterator[RpcClient]:
    """An RPC connection to ``controller`` as the host enrolled with ``config_path`` (its keys),
    with its requests on one framed channel as the agent sends them (``channel=False``: an
    exec channel each, as OpenSSH's ssh would); ``also``: other replicas it may fail over to."""
    cfg = agent_config(config_path)
    keys = load_keys(cfg.identity_key_path, cfg.wrapping_key_path, cfg.wrap_suite)
    async with RpcClient(
        endpoints=[Endpoint("127.0.0.1", c.port) for c in (controller, *also)],
        username=cfg.host_id,
        client_key=keys.ssh_key(),
        host_key_fingerprint=controller.host_key_fingerprint,
        channel=channel,
    ) as rpc:
        yield rpc
