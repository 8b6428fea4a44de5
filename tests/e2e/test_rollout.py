"""Rotation that cannot break a service: activate when converged, and staged rollouts with gates.

Real controller, real agents (processes where one must be frozen with SIGSTOP), real Kafka,
real SSH, real keyring files. Each host's health hook is a tiny encrypt/decrypt check: it seals a
message under its keyring's primary into a shared mailbox and must open every other host's
message with its own keyring. That is the A/B trap made visible: a host that does not hold the
version another host encrypts with cannot read what that host wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ckms._kafka_security import KafkaLink
from ckms.controller.models import KeyState
from ckms.controller.rollout_plan import RolloutRequest, sample_order, seed_of
from ckms.controller.service import Controller
from ckms.crypto import KeyType, build_csr, generate
from ckms.errors import PermissionDeniedError
from ckms.protocol import (
    CertSignReply,
    CertSignRequest,
    FetchRequest,
    InstallSpec,
    RolloutState,
    Targets,
    TlsProfile,
)
from ckms.store import audit as audit_log
from tests.support.cli import Operators
from tests.support.controller import running_controller
from tests.support.fleet import FAST_AGENT, enroll_agent, host_rpc, running_agent, wait_until

pytestmark = pytest.mark.kafka

WEB = {"env": "prod", "role": "web"}
KEY = "web/session"
RING = "/etc/ckms/web/session.json"
AGENT_BIN = str(Path(sys.executable).parent / "ckms-agent")

CHECK = r'''
"""Health check: seal a message under my primary, open every other host's with my keyring."""
import base64, json, os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ring_path, mailbox, me = sys.argv[1], sys.argv[2], sys.argv[3]
ring = json.load(open(ring_path))
keys = {v["version"]: base64.b64decode(v["material"]) for v in ring["versions"]}
primary = ring["primary"]
nonce = os.urandom(12)
sealed = AESGCM(keys[primary]).encrypt(nonce, me.encode(), None)
os.makedirs(mailbox, exist_ok=True)
tmp = os.path.join(mailbox, f".{me}.tmp")
with open(tmp, "w") as f:
    json.dump({"version": primary, "nonce": nonce.hex(), "sealed": sealed.hex()}, f)
os.replace(tmp, os.path.join(mailbox, f"{me}.msg"))
for name in sorted(os.listdir(mailbox)):
    if not name.endswith(".msg") or name == f"{me}.msg":
        continue
    msg = json.load(open(os.path.join(mailbox, name)))
    key = keys.get(msg["version"])
    if key is None:
        print(f"{me} cannot read {name}: it is sealed under v{msg['version']}, not held here")
        sys.exit(1)
    AESGCM(key).decrypt(bytes.fromhex(msg["nonce"]), bytes.fromhex(msg["sealed"]), None)
'''


def ring_of(tmp: Path, host: str) -> Path:
    return tmp / host / "root" / RING.lstrip("/")


def keyring(tmp: Path, host: str) -> dict:
    return json.loads(ring_of(tmp, host).read_bytes())


def check_hook(tmp: Path, host: str) -> dict:
    """The host's own health hook (its config, not the controller's): the mailbox check."""
    script = tmp / "check.py"
    script.write_text(CHECK)
    argv = [sys.executable, str(script), str(ring_of(tmp, host)), str(tmp / "mailbox"), host]
    return {"abcheck": {"health": argv, "timeout_s": 20}}


def run_check(tmp: Path, host: str) -> subprocess.CompletedProcess[str]:
    """Run ``host``'s check by hand (as its service would read its keyring right now)."""
    argv = check_hook(tmp, host)["abcheck"]["health"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


async def acked(c: Controller, host: str, version: int, status: str = "installed") -> bool:
    assert c.store is not None
    return bool(
        await c.store.fetchval(
            "SELECT 1 FROM fleet_state f JOIN keys k ON k.id = f.key_id WHERE k.name = ? AND "
            "f.host_id = ? AND f.version = ? AND f.status = ?",
            (KEY, host, version, status),
        )
    )


@contextlib.asynccontextmanager
async def agent_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``ckms-agent run`` as a process (so it can be frozen with SIGSTOP)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            AGENT_BIN,
            "run",
            "--config",
            str(config),
            env={**env, **FAST_AGENT},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def two_hosts(c: Controller, tmp: Path) -> tuple[Path, Path]:
    a = await enroll_agent(c, tmp, "web-a", WEB, hooks=check_hook(tmp, "web-a"))
    b = await enroll_agent(c, tmp, "web-b", WEB, hooks=check_hook(tmp, "web-b"))
    await c.lifecycle.create(
        KEY,
        "aes-256",
        targets=Targets(selectors=(WEB,)),
        install=InstallSpec(path=RING, format="keyring-json", health="abcheck"),
        actor="alice",
    )
    return a, b


async def primary_is(tmp: Path, host: str, version: int) -> bool:
    try:
        return keyring(tmp, host)["primary"] == version
    except (OSError, ValueError):
        return False


@pytest.mark.requirement("SP800-57-7.1-PREACTIVE")
@pytest.mark.timeout(240)
async def test_converged_rotation_is_not_primary_anywhere_until_the_frozen_host_acks(
    controller: Controller, tmp_path: Path
) -> None:
    c = controller
    config_a, config_b = await two_hosts(c, tmp_path)
    async with (
        agent_process(config_a, tmp_path / "a.log"),
        agent_process(config_b, tmp_path / "b.log") as b,
    ):
        for host in ("web-a", "web-b"):
            await wait_until(lambda h=host: acked(c, h, 1), 60, f"{host} installs v1")
        b.send_signal(signal.SIGSTOP)
        await c.lifecycle.rotate(KEY, actor="alice", activate_when="converged")

        await wait_until(lambda: acked(c, "web-a", 2), 60, "web-a holds v2")
        await c.rollouts.step()
        key = await c.lifecycle.get(KEY)
        assert key.primary_version == 1
        assert key.version(2).state is KeyState.PRE_ACTIVE
        ring_a = keyring(tmp_path, "web-a")
        assert ring_a["primary"] == 1  # v2 is there, PreActive, not primary
        assert [v["version"] for v in ring_a["versions"]] == [1, 2]
        assert [v["version"] for v in keyring(tmp_path, "web-b")["versions"]] == [1]
        # What web-a writes now, web-b still reads: no trap.
        assert run_check(tmp_path, "web-a").returncode == 0
        assert run_check(tmp_path, "web-b").returncode == 0, run_check(tmp_path, "web-b").stdout

        # Status and the fleet view say who holds the rotation up.
        rollouts = await c.fleet.rollouts()
        assert [(r.key, r.state, r.waiting, r.acked) for r in rollouts] == [
            (KEY, RolloutState.RUNNING, ("web-b",), ("web-a",))
        ]
        fleet = (await c.fleet.fleet_status(KEY, 10)).keys[0]
        assert fleet.rollout is not None and fleet.rollout.waiting == ("web-b",)
        assert fleet.primary_version == 1

        b.send_signal(signal.SIGCONT)
        await wait_until(lambda: acked(c, "web-b", 2), 60, "web-b holds v2 after thawing")
        await wait_until(_primary(c, 2), 30, "v2 activated once every host acked it")
        for host in ("web-a", "web-b"):
            await wait_until(lambda h=host: primary_is(tmp_path, h, 2), 60, f"{host} primary v2")
        assert run_check(tmp_path, "web-a").returncode == 0
        assert run_check(tmp_path, "web-b").returncode == 0

    assert c.store is not None
    records = await audit_log.load_records(c.store)
    steps = [(r.action, r.actor) for r in records if r.action.startswith("rollout.")]
    assert steps == [("rollout.start", "alice"), ("rollout.complete", "rollout")]
    activations = [r for r in records if r.action == "key.activate"]
    assert [(r.actor, r.details["version"]) for r in activations] == [("rollout", 2)]
    # The activation is one signed event: exactly one PreActive -> Active for v2.
    events = await c.store.fetchall("SELECT payload FROM outbox WHERE type = 'key.state_changed'")
    changed = [json.loads(e["payload"]) for e in events]
    assert [(e["version"], e["to"], e["primary"]) for e in changed] == [(2, "Active", 2)]


def _primary(c: Controller, version: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await c.lifecycle.get(KEY)).primary_version == version

    return check


async def test_without_waiting_for_the_fleet_the_frozen_host_cannot_read_the_new_version(
    controller: Controller, tmp_path: Path
) -> None:
    """The trap itself: zero activation delay, one host frozen; the other encrypts with v2."""
    c = controller
    config_a, config_b = await two_hosts(c, tmp_path)
    async with (
        agent_process(config_a, tmp_path / "a.log"),
        agent_process(config_b, tmp_path / "b.log") as b,
    ):
        for host in ("web-a", "web-b"):
            await wait_until(lambda h=host: acked(c, h, 1), 60, f"{host} installs v1")
        b.send_signal(signal.SIGSTOP)
        await c.lifecycle.rotate(KEY, actor="alice")  # policy: delay 0, activate at once
        assert (await c.lifecycle.get(KEY)).primary_version == 2
        await wait_until(lambda: primary_is(tmp_path, "web-a", 2), 60, "web-a primary v2")
        # Acked once its own health hook (this same check) has finished: run by hand while
        # the hook runs, both wrote the same temp file and one rename found it gone.
        await wait_until(lambda: acked(c, "web-a", 2), 60, "web-a acks v2")
        assert run_check(tmp_path, "web-a").returncode == 0  # web-a's own check passes
        stuck = run_check(tmp_path, "web-b")
        assert stuck.returncode == 1
        assert "sealed under v2, not held here" in stuck.stdout
        b.send_signal(signal.SIGCONT)


# -- staged rollout with a health gate ---------------------------------------------------------

STAGED = [f"web-{i}" for i in range(1, 6)]


async def holds(tmp: Path, host: str, version: int) -> bool:
    try:
        return version in {v["version"] for v in keyring(tmp, host)["versions"]}
    except (OSError, ValueError):
        return False


async def rollout_state(c: Controller) -> RolloutState | None:
    key = await c.lifecycle.get(KEY)
    return None if key.rollout is None else key.rollout.state


@pytest.mark.requirement("PCI-6.5.1")
@pytest.mark.timeout(300)  # five agents, a controller restart and three stages on a busy box
async def test_a_failing_stage_halts_abort_rolls_it_back_and_resume_completes_it(
    tmp_path: Path, controller_kafka: KafkaLink, unique_topic: Callable[[str], str]
) -> None:
    home = tmp_path / "controller"
    topics = (unique_topic("events"), unique_topic("fleet"))
    settings = {"audit_topic": unique_topic("audit"), "rollout_interval_s": 1.0}
    broken = tmp_path / "broken"
    broken.mkdir()
    async with contextlib.AsyncExitStack() as stack:
        c = await stack.enter_async_context(
            running_controller(home, controller_kafka, *topics, **settings)
        )
        port = c.port
        configs = {}
        for i, host in enumerate(STAGED):
            hook = {"gate": {"health": ["sh", "-c", f"test ! -e {broken / host}"]}}
            labels = {**WEB, "zone": f"z{i % 2}"}
            configs[host] = await enroll_agent(c, tmp_path, host, labels, hooks=hook)
        key = await c.lifecycle.create(
            KEY,
            "aes-256",
            targets=Targets(selectors=(WEB,)),
            install=InstallSpec(path=RING, format="keyring-json", health="gate"),
            actor="alice",
        )
        ops = Operators(c, tmp_path / "ops")
        await ops.add("alice", "admin")
        agents = contextlib.AsyncExitStack()
        for host in STAGED:
            await agents.enter_async_context(running_agent(configs[host]))
        async with agents:
            for host in STAGED:
                await wait_until(lambda h=host: acked(c, h, 1), 60, f"{host} installs v1")
            # The sample is a pure function of the key, the version and the hosts: known now.
            order = sample_order(seed_of(key, 2), await c.hosts.list(), "zone")
            stage1, stage2, stage3 = order[:1], order[1:3], order[3:]
            (broken / stage2[1]).touch()  # this host's health check will fail

            started = await ops.ckms(
                "key",
                "rotate",
                KEY,
                "--stages",
                "20%,60%,100%",
                "--gate",
                "healthy",
                "--spread",
                "zone",
                who="alice",
            )
            assert started.rc == 0, started.stderr
            await wait_until(
                lambda: _state_is(c, RolloutState.HALTED), 90, "the rollout halts on the failure"
            )
            shown = await ops.ckms("rollout", "status", KEY, "--json", who="alice")
            info = shown.json()
            assert (info["state"], info["stage"], info["failed"]) == ("halted", 2, [stage2[1]])
            assert await acked(c, stage2[1], 2, "failed")
            assert await acked(c, stage2[0], 2)
            for host in STAGED:  # the old version stays primary everywhere
                assert keyring(tmp_path, host)["primary"] == 1
            assert (await c.lifecycle.get(KEY)).primary_version == 1
            for host in stage3:  # no stage-3 host got v2
                assert not await acked(c, host, 2)
                assert not await holds(tmp_path, host, 2)
            # Nor can it take v2 by asking for it.
            async with host_rpc(c, configs[stage3[0]]) as rpc:
                with pytest.raises(PermissionDeniedError, match="has not released it"):
                    await rpc.call("fetch", FetchRequest(key=KEY, version=2).model_dump())

            # A restart changes nothing: same state, same released hosts.
            released = (await c.lifecycle.get(KEY)).rollout.released  # type: ignore[union-attr]
            assert released == frozenset(stage1 + stage2)
            await stack.aclose()
            c = await stack.enter_async_context(
                running_controller(home, controller_kafka, *topics, listen_port=port, **settings)
            )
            ops.controller = c
            after = (await c.lifecycle.get(KEY)).rollout
            assert after is not None
            assert (after.state, after.released) == (RolloutState.HALTED, released)

            aborted = await ops.ckms("rollout", "abort", KEY, "--reason", "bad build", who="alice")
            assert aborted.rc == 0, aborted.stderr
            await wait_until(lambda: acked(c, stage2[0], 2, "removed"), 60, "stage 2 rolled back")
            assert not await holds(tmp_path, stage2[0], 2)
            assert await holds(tmp_path, stage1[0], 2)  # stage 1 keeps it, still PreActive

            (broken / stage2[1]).unlink()  # the fix
            resumed = await ops.ckms("rollout", "resume", KEY, "--reason", "fixed", who="alice")
            assert resumed.rc == 0, resumed.stderr
            await wait_until(lambda: _state_is(c, RolloutState.COMPLETED), 120, "completed")
            assert (await c.lifecycle.get(KEY)).primary_version == 2
            for host in STAGED:
                await wait_until(lambda h=host: primary_is(tmp_path, h, 2), 60, f"{host} on v2")

        assert c.store is not None
        records = await audit_log.load_records(c.store)
        steps = [(r.action, r.actor) for r in records if r.action.startswith("rollout.")]
        assert steps == [
            ("rollout.start", "alice"),
            ("rollout.advance", "rollout"),
            ("rollout.halt", "rollout"),
            ("rollout.abort", "alice"),
            ("rollout.resume", "alice"),
            ("rollout.advance", "rollout"),
            ("rollout.complete", "rollout"),
        ]
        resumed_at = next(i for i, r in enumerate(records) if r.action == "rollout.resume")
        fetched_v2 = {
            r.actor.removeprefix("host:")
            for r in records[:resumed_at]
            if r.action == "key.fetch" and r.outcome == "ok" and r.details["version"] == 2
        }
        assert fetched_v2 <= set(stage1 + stage2)  # before the resume, never a stage-3 host
        # Their syncs after the rotation's event asked for v2 along; that was left out of the
        # replies, not audited as a refusal per host (only the explicit fetch above was).
        noise = [
            r
            for r in records[:resumed_at]
            if r.action == "key.fetch"
            and r.outcome == "refused"
            and r.actor.removeprefix("host:") in stage3
        ]
        assert noise == []
        assert [
            r.action for r in records if r.outcome == "refused" and r.actor == f"host:{stage3[0]}"
        ] == ["rpc.fetch"]


async def _state_is(c: Controller, state: RolloutState) -> bool:
    return await rollout_state(c) is state


@pytest.mark.requirement("PCI-3.7.2")
async def test_a_host_outside_the_stage_gets_no_certificate_for_the_waiting_version(
    controller: Controller, tmp_path: Path
) -> None:
    """A tls-cert version in a rollout: a host its stage did not release asks to be certified."""
    c = controller
    labels = {"env": "prod", "role": "db"}
    configs = {h: await enroll_agent(c, tmp_path, h, labels) for h in ("db-1", "db-2")}
    spec = InstallSpec(path="/etc/ckms/tls/{purpose}", format="tls-pem", tls=TlsProfile())
    await c.lifecycle.create(
        "db/server", "tls-cert", targets=Targets(selectors=(labels,)), install=spec, actor="alice"
    )
    await c.lifecycle.rotate("db/server", actor="alice", rollout=RolloutRequest(stages=(50, 100)))
    key = await c.lifecycle.get("db/server")
    assert key.rollout is not None and key.rollout.released is not None
    (inside,) = key.rollout.released
    (outside,) = {"db-1", "db-2"} - {inside}
    csr = build_csr(generate(KeyType.ECDSA_P256), None).decode()
    ask = CertSignRequest(key="db/server", version=2, csr=csr).model_dump(mode="json")
    async with host_rpc(c, configs[outside]) as rpc:
        with pytest.raises(PermissionDeniedError, match="has not released it"):
            await rpc.call("cert_sign", ask)
    async with host_rpc(c, configs[inside]) as rpc:
        assert CertSignReply.model_validate(await rpc.call("cert_sign", ask)).serial
