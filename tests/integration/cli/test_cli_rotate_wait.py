"""``ckms key rotate --wait``: exits 0 once every targeted host acked, 3 naming the ones that
did not (real CLI subprocess, real controller, acks signed by the enrolled hosts' keys)."""

from __future__ import annotations

import asyncio

import pytest

from ckms.cli._errors import ExitCode
from ckms.controller.models import Key
from ckms.controller.service import Controller
from ckms.protocol import AckStatus, Targets
from tests.support.cli import Operators, enroll_host, send_installed_ack
from tests.support.waiting import wait_until

pytestmark = pytest.mark.kafka

KEY = "web/tls"


async def fleet_of_two(controller: Controller) -> dict[str, bytes]:
    """A key for env=prod,role=web, two such hosts, both holding version 1."""
    targets = Targets(selectors=({"env": "prod", "role": "web"},))
    key = await controller.lifecycle.create(KEY, "ed25519", targets=targets, actor="test-setup")
    signers = {}
    for host in ("web-1", "web-2"):
        signers[host] = await enroll_host(controller, host, {"env": "prod", "role": "web"})
        await send_installed_ack(controller, signers[host], host, KEY, 1, key.version(1).digest, 1)
    await until(lambda: controller.acks.stats.applied >= 2)
    return signers


async def until(predicate, wait_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    await wait_until(predicate, wait_s)


async def rotated(controller: Controller) -> Key:
    """Wait until the CLI's rotation committed; return the key."""

    async def has_v2() -> bool:
        return (await controller.lifecycle.get(KEY)).latest_version == 2

    await until(has_v2)
    return await controller.lifecycle.get(KEY)


async def test_rotate_wait_exits_3_naming_the_host_that_never_acked(
    controller: Controller, ops: Operators
) -> None:
    signers = await fleet_of_two(controller)
    cli = asyncio.create_task(
        ops.ckms("key", "rotate", KEY, "--wait", "--timeout", "6", who="dave")
    )
    key = await rotated(controller)
    await send_installed_ack(
        controller, signers["web-1"], "web-1", KEY, 2, key.version(2).digest, 2
    )
    run = await cli
    assert run.rc == ExitCode.NOT_CONVERGED, (run.stdout, run.stderr)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ckms: NotConvergedError: web/tls: 1 of 2 targeted hosts")
    assert last.endswith("did not converge within 6s: web-2")
    assert "rotated web/tls v2" in run.stdout


async def test_rotate_wait_exits_0_once_every_host_acked(
    controller: Controller, ops: Operators
) -> None:
    signers = await fleet_of_two(controller)
    cli = asyncio.create_task(
        ops.ckms("key", "rotate", KEY, "--wait", "--timeout", "30", who="dave")
    )
    key = await rotated(controller)
    for host, signer in signers.items():
        await send_installed_ack(controller, signer, host, KEY, 2, key.version(2).digest, 2)
    run = await cli
    assert run.rc == 0, run.stderr
    assert "all 2 targeted hosts converged" in run.stderr

    fleet = await ops.ckms("fleet", "status", KEY, "--json", who="erin")
    (view,) = fleet.json()["keys"]
    assert (view["targeted"], view["converged"], view["converged_pct"]) == (2, 2, 100.0)
    assert view["wanted_versions"] == [1, 2]
    assert {h["host"]: h["versions"] for h in view["hosts"]} == {
        "web-1": {"1": "installed", "2": "installed"},
        "web-2": {"1": "installed", "2": "installed"},
    }


async def test_fleet_status_shows_why_a_host_refused_a_key(
    controller: Controller, ops: Operators
) -> None:
    signers = await fleet_of_two(controller)
    reason = "install path /etc/cron.d/x is outside this host's allowed paths (/etc/ckms/keys)"
    await send_installed_ack(
        controller, signers["web-2"], "web-2", KEY, 1, None, 2, status=AckStatus.FAILED,
        error=reason,
    )  # fmt: skip
    await until(lambda: controller.acks.stats.applied >= 3)
    fleet = await ops.ckms("fleet", "status", KEY, "--json", who="erin")
    (view,) = fleet.json()["keys"]
    assert {h["host"]: h["error"] for h in view["hosts"]} == {"web-1": None, "web-2": reason}
    shown = await ops.ckms("fleet", "status", KEY, who="erin")
    assert shown.rc == 0, shown.stderr
    assert "/etc/cron.d/x" in shown.stdout and "outside" in shown.stdout  # the reason column
