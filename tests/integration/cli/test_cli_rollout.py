"""Rollouts through the real CLI: who may start, resume and abort one, and bad arguments.

The roles are those of ``key rotate`` (admin, operator); resuming passes the dual control a
rotation of the key needs, aborting (which only withdraws a version that was never primary)
needs the role alone. Bad stage lists and gates are refused before anything is sent.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from ckms.cli._errors import ExitCode
from ckms.controller.models import Targets
from ckms.controller.policy import patch_policy
from ckms.controller.service import Controller
from ckms.protocol import RolloutState
from ckms.protocol.admin import PolicyPatch
from tests.support.browser import console_process
from tests.support.cli import Operators, audit_records
from tests.support.fleet import enroll_agent

pytestmark = pytest.mark.kafka

KEY = "pay/api"


async def a_key_with_a_silent_host(controller: Controller, tmp_path: Path) -> None:
    """A key targeting one enrolled host whose agent never runs (the rollout stays running)."""
    await enroll_agent(controller, tmp_path / "hosts", "web-1", {"env": "prod"})
    await controller.lifecycle.create(
        KEY, "aes-256", targets=Targets.parse(["env=prod"], env="prod"), actor="test-setup"
    )


async def console_key_page(env: dict[str, str], name: str) -> str:
    """The console's page of one key as the operator of ``env`` sees it (signed in by its
    one-time URL)."""
    async with console_process(env) as url:
        base = url.split("/login")[0]
        jar = aiohttp.CookieJar(unsafe=True)  # the console listens on 127.0.0.1
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(url) as signed_in:
                assert signed_in.status == 200, await signed_in.text()
            async with http.get(f"{base}/keys/{name}") as page:
                assert page.status == 200
                return await page.text()


async def state(controller: Controller) -> RolloutState | None:
    key = await controller.lifecycle.get(KEY)
    return None if key.rollout is None else key.rollout.state


@pytest.mark.requirement("PCI-6.5.1")
@pytest.mark.timeout(240)  # about twenty CLI processes and a console
async def test_who_may_start_resume_and_abort_a_rollout(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    await a_key_with_a_silent_host(controller, tmp_path)
    start = ("key", "rotate", KEY, "--stages", "50%,100%", "--gate", "installed")
    for who in ("erin", "carol"):  # auditor, custodian
        refused = await ops.ckms(*start, who=who)
        assert refused.rc == ExitCode.FAILED, refused.stderr
        assert "not allowed" in refused.stderr or "may not" in refused.stderr
    assert (await controller.lifecycle.get(KEY)).latest_version == 1

    started = await ops.ckms(*start, who="dave")  # operator
    assert started.rc == 0, started.stderr
    shown = await ops.ckms("rollout", "status", KEY, "--json", who="erin")  # reading is fine
    assert shown.rc == 0, shown.stderr
    info = shown.json()
    assert (info["state"], info["stage"], info["waiting"]) == ("running", 1, ["web-1"])
    listed = await ops.ckms("status", who="erin")
    assert "rollout pay/api v2: running, stage 1 of 2; held up by web-1" in listed.stdout
    fleet = await ops.ckms("fleet", "status", KEY, who="erin")
    assert "rollout v2: running, stage 1 of 2 (gate installed); held up by web-1" in fleet.stdout
    page = await console_key_page(ops.env("erin"), KEY)  # the console's key page shows it too
    assert "Rollout of v2" in page and "Held up by: web-1" in page
    await controller.metrics.refresh()
    exposition = (await controller.metrics.render()).decode()
    assert 'ckms_rollouts{state="running"} 1.0' in exposition

    for who in ("erin", "carol"):
        refused = await ops.ckms("rollout", "abort", KEY, who=who)
        assert refused.rc == ExitCode.FAILED, refused.stderr
    assert await state(controller) is RolloutState.RUNNING
    aborted = await ops.ckms("rollout", "abort", KEY, "--reason", "wrong build", who="dave")
    assert aborted.rc == 0, aborted.stderr
    assert await state(controller) is RolloutState.ROLLED_BACK

    # With rotate under dual control, resuming waits for a second person; aborting does not.
    key = await controller.lifecycle.get(KEY)
    approvals = tuple(sorted({*map(str, key.policy.approvals_required), "rotate"}))
    policy = patch_policy(key.policy, PolicyPatch(approvals_required=approvals))
    await controller.lifecycle.set_policy(KEY, policy, actor="test-setup")
    refused = await ops.ckms("rollout", "resume", KEY, who="dave")
    assert refused.rc == ExitCode.FAILED and "ask an admin" in refused.stderr
    asked = await ops.ckms("rollout", "resume", KEY, "--reason", "fixed", who="alice")
    assert asked.rc == ExitCode.APPROVAL_REQUIRED, asked.stderr
    assert await state(controller) is RolloutState.ROLLED_BACK
    match = re.search(r"request (r-[0-9a-f]+)", asked.stderr)
    assert match, asked.stderr
    own = await ops.ckms("approve", match.group(1), who="alice")
    assert own.rc == ExitCode.FAILED
    approved = await ops.ckms("approve", match.group(1), who="bob")
    assert approved.rc == 0, approved.stderr
    assert await state(controller) is RolloutState.RUNNING

    records = await audit_records(controller)
    refusals = [
        (r.actor, r.action) for r in records if r.outcome == "refused" and "rollout" in r.action
    ]
    assert ("erin", "rpc.rollout.abort") in refusals and ("carol", "rpc.rollout.abort") in refusals
    steps = [(r.action, r.actor) for r in records if r.action.startswith("rollout.")]
    assert steps == [
        ("rollout.start", "dave"),
        ("rollout.abort", "dave"),
        ("rollout.resume", "alice+bob"),  # the requester and the approver
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--stages", "0%,150%"), "--stages: stages 0%,150%: 0% is not a share of hosts"),
        (("--stages", "5%,150%"), "150% is not a share of hosts"),
        (("--stages", "25%,5%,100%"), "strictly increasing"),
        (("--stages", "5%,25%"), "the last stage must be 100%"),
        (("--stages", "50%,100%", "--gate", "green"), "--gate: unknown gate 'green'"),
        (("--activate-when", "soon"), "--activate-when: unknown value 'soon'"),
        (("--activate-when", "delay", "--stages", "50%,100%"), "cannot go with --stages"),
    ],
)
async def test_bad_rollout_arguments_are_refused_with_a_clear_message(
    controller: Controller, ops: Operators, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    await controller.lifecycle.create(KEY, "aes-256", actor="test-setup")
    run = await ops.ckms("key", "rotate", KEY, *args, who="alice")
    assert run.rc == ExitCode.USAGE, run.stderr
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert (await controller.lifecycle.get(KEY)).latest_version == 1


async def test_gate_healthy_without_a_health_check_is_refused_by_the_controller(
    controller: Controller, ops: Operators
) -> None:
    await controller.lifecycle.create(KEY, "aes-256", actor="test-setup")
    run = await ops.ckms(
        "key", "rotate", KEY, "--stages", "10%,100%", "--gate", "healthy", who="alice"
    )
    assert run.rc != 0
    assert "gate healthy needs a health check" in run.stderr
    assert (await controller.lifecycle.get(KEY)).latest_version == 1


async def test_wait_on_a_converging_rotation_names_the_host_holding_it_up(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    await a_key_with_a_silent_host(controller, tmp_path)
    policy = await ops.ckms(
        "key",
        "policy",
        KEY,
        "--activate-when",
        "converged",
        "--activation-deadline",
        "2h",
        who="alice",
    )
    assert policy.rc == ExitCode.APPROVAL_REQUIRED  # a policy change: dual control
    match = re.search(r"request (r-[0-9a-f]+)", policy.stderr)
    assert match, policy.stderr
    assert (await ops.ckms("approve", match.group(1), who="bob")).rc == 0
    key = await controller.lifecycle.get(KEY)
    assert (str(key.policy.activate_when), key.policy.activation_deadline.total_seconds()) == (
        "converged",
        7200,
    )

    waited = await ops.ckms("key", "rotate", KEY, "--wait", "--timeout", "3", who="dave")
    assert waited.rc == ExitCode.NOT_CONVERGED, waited.stderr
    assert "pay/api v2: rollout not complete within 3s at stage 1 of 1, held up by: web-1" in (
        waited.stderr
    )
    key = await controller.lifecycle.get(KEY)
    assert key.primary_version == 1 and key.rollout is not None
    assert key.rollout.deadline_at - key.rollout.started_at == timedelta(hours=2)


async def test_a_failure_budget_from_the_cli_reaches_the_rollout(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    """`key rotate --max-failures` sets the rollout's budget, `rollout resume --max-failures`
    changes it, `rollout status` shows it; a budget that is no count or percent is refused
    before anything is sent."""
    await a_key_with_a_silent_host(controller, tmp_path)
    bad = await ops.ckms(
        "key", "rotate", KEY, "--stages", "50,100", "--max-failures", "x", who="dave"
    )
    assert bad.rc != 0 and "max_failures" in bad.stderr, bad.stderr
    started = await ops.ckms(
        "key", "rotate", KEY, "--stages", "50,100", "--max-failures", "10%", who="dave"
    )
    assert started.rc == 0, started.stderr
    key = await controller.lifecycle.get(KEY)
    assert key.rollout is not None and key.rollout.max_failures == "10%"
    aborted = await ops.ckms("rollout", "abort", KEY, "--reason", "test", who="dave")
    assert aborted.rc == 0, aborted.stderr
    resumed = await ops.ckms("rollout", "resume", KEY, "--max-failures", "2", who="dave")
    assert resumed.rc == 0, resumed.stderr
    shown = await ops.ckms("rollout", "status", KEY, "--json", who="erin")
    assert shown.rc == 0 and shown.json()["max_failures"] == "2", shown.stdout
