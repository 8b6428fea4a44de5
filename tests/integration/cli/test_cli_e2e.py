"""The operator's whole path with real processes: ``ckms init``, ``ckms controller run``,
``ckms unseal`` by two custodians, keys, audit export verified offline, SIGTERM; and every read
command's ``--json`` output against a running controller."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms.cli._errors import ExitCode
from ckms.controller.service import Controller
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from ckms.protocol import Targets
from tests.support.cli import Operators, make_ssh_key, run_cli

pytestmark = pytest.mark.kafka

LISTENING = re.compile(
    rb"ckms: controller listening on 127\.0\.0\.1:(\d+) \(host key (\S+), sealed\)"
)


def operator_env(port: int, fingerprint: str, name: str, identity: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    env |= {
        "CKMS_CONTROLLER": f"127.0.0.1:{port}",
        "CKMS_CONTROLLER_FINGERPRINT": fingerprint,
        "CKMS_USER": name,
        "CKMS_IDENTITY": str(identity),
    }
    return env


async def test_init_run_unseal_with_two_custodians_then_stop(
    tmp_path: Path, local_kafka: LocalKafka, unique_topic: Callable[[str], str]
) -> None:
    kafka_bootstrap = local_kafka.bootstrap
    alice_key, alice_pub = make_ssh_key(tmp_path / "keys" / "alice")
    bob_key, bob_pub = make_ssh_key(tmp_path / "keys" / "bob")
    (tmp_path / "alice.pub").write_text(alice_pub)
    (tmp_path / "bob.pub").write_text(bob_pub)
    home = tmp_path / "home"

    init = await run_cli(
        "init", "--home", str(home), "--shares", "2/3", "--print-shares", "--admin", "alice",
        "--admin-key", str(tmp_path / "alice.pub"), "--kafka", kafka_bootstrap,
        "--listen", "127.0.0.1:0", "--json",
    )  # fmt: skip
    assert init.rc == 0, init.stderr
    made = init.json()
    assert (made["mode"], made["threshold"], made["count"]) == ("shares", 2, 3)
    assert len(made["shares"]) == 3
    again = await run_cli(
        "init", "--home", str(home), "--passphrase-file", str(tmp_path / "alice.pub"),
        "--admin", "alice", "--admin-key", str(tmp_path / "alice.pub"),
    )  # fmt: skip
    assert again.rc == ExitCode.FAILED and "this home is initialised" in again.stderr
    # The controller's Kafka certificate, where it looks by default (<home>/kafka/).
    local_kafka.ca.install(SubjectRole.CONTROLLER, "controller", home / "kafka")

    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    env |= {
        "CKMS_EVENTS_TOPIC": unique_topic("events"),
        "CKMS_FLEET_TOPIC": unique_topic("fleet"),
        "CKMS_FLEET_PARTITIONS": "3",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ckms.cli", "controller", "run",
        "--config", str(home / "controller.toml"), "--log-level", "WARNING",
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[bytes] = []
    try:

        async def listening() -> tuple[int, str]:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                log.append(line)
                if match := LISTENING.search(line):
                    return int(match.group(1)), match.group(2).decode()
            raise AssertionError(b"".join(log).decode())

        port, fingerprint = await asyncio.wait_for(listening(), 30)
        assert fingerprint == made["host_key_fingerprint"]
        drain = asyncio.create_task(_drain(proc.stderr, log))

        alice = operator_env(port, fingerprint, "alice", alice_key)
        bob = operator_env(port, fingerprint, "bob", bob_key)
        assert (await run_cli("status", env=alice)).rc == ExitCode.SEALED
        refused = await run_cli("key", "create", "app/k", "--type", "aes-256", env=alice)
        assert refused.rc == ExitCode.SEALED, refused.stderr

        for number, share in enumerate(made["shares"][:2], start=1):
            (tmp_path / f"share{number}").write_text(share + "\n")
        first = await run_cli("unseal", "--share-file", str(tmp_path / "share1"), env=alice)
        assert first.rc == 0 and "1 of 2 given; still sealed" in first.stdout
        # Right after init nobody else could approve, so this operator change runs directly.
        added = await run_cli(
            "operator", "add", "bob", "--role", "custodian", "--key", str(tmp_path / "bob.pub"),
            env=alice,
        )  # fmt: skip
        assert added.rc == 0, added.stderr
        second = await run_cli("unseal", "--share-file", str(tmp_path / "share2"), env=bob)
        assert second.rc == 0 and "controller unsealed" in second.stdout, second.stderr

        status = await run_cli("status", "--json", env=alice)
        assert status.rc == 0, status.stderr
        state = status.json()
        assert state["sealed"] is False and state["host_key_fingerprint"] == fingerprint
        created = await run_cli("key", "create", "app/k", "--type", "aes-256", env=alice)
        assert created.rc == 0, created.stderr

        export = tmp_path / "audit.jsonl"
        exported = await run_cli("audit", "export", "-o", str(export), env=bob)
        assert exported.rc == ExitCode.FAILED  # a custodian does not read the audit log
        exported = await run_cli("audit", "export", "-o", str(export), env=alice)
        assert exported.rc == 0, exported.stderr
        lines = export.read_text().splitlines()
        assert json.loads(lines[-1])["kind"] == "checkpoint"
        signing_key = state["signing_public_key"]
        offline = await run_cli(
            "audit", "verify", "--file", str(export), "--signing-key", signing_key, "--json"
        )
        assert offline.rc == 0, offline.stderr
        assert offline.json()["ok"] and offline.json()["checkpoints_verified"] >= 1

        record = json.loads(lines[3])
        record["actor"] = "mallory"
        lines[3] = json.dumps(record, sort_keys=True, separators=(",", ":"))
        export.write_text("\n".join(lines) + "\n")
        tampered = await run_cli(
            "audit", "verify", "--file", str(export), "--signing-key", signing_key
        )
        assert tampered.rc == ExitCode.FAILED
        assert "first bad record 3" in tampered.stderr

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await asyncio.wait_for(drain, 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"Traceback" not in b"".join(log)


async def _drain(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


async def test_every_read_command_prints_json(controller: Controller, ops: Operators) -> None:
    targets = Targets(selectors=({"env": "prod"},))
    await controller.lifecycle.create("app/k", "aes-256", targets=targets, actor="test-setup")
    await controller.hosts.create_token("web-1", {"env": "prod"}, actor="test-setup")
    enrolled = await ops.ckms("host", "enroll", "web-2", "-l", "env=prod", "--json", who="alice")
    assert enrolled.rc == 0, enrolled.stderr
    token = enrolled.json()
    assert token["token"].startswith("ckms-enroll-")
    assert token["agent_command"] == (
        f"ckms-agent enroll --controller 127.0.0.1:{controller.port} "
        f"--host-key-fingerprint {controller.host_key_fingerprint}"
    )
    reads = {
        ("status",): "kafka",
        ("key", "list"): "keys",
        ("key", "show", "app/k"): "versions",
        ("key", "history", "app/k"): "history",
        ("key", "policy", "app/k"): "cryptoperiod_s",
        ("key", "targets", "app/k"): "targets",
        ("host", "list"): "hosts",
        ("fleet", "status"): "keys",
        ("fleet", "status", "app/k"): "keys",
        ("audit", "verify"): "ok",
        ("audit", "tail", "-n", "3"): "records",
        ("operator", "list"): "operators",
        ("request", "list"): "requests",
    }
    for args, field in reads.items():
        run = await ops.ckms(*args, "--json", who="alice")
        assert run.rc == 0, (args, run.stderr)
        assert field in run.json(), (args, run.stdout)
    tail = (await ops.ckms("audit", "tail", "-n", "3", "--json", who="erin")).json()
    assert len(tail["records"]) == 3
    assert tail["records"][-1]["index"] == tail["size"] - 1
    status = (await ops.ckms("status", "--json", who="erin")).json()
    assert status["due_counts"] == {"overdue": 0, "1d": 0, "7d": 0, "30d": 0}
    assert status["keys"] == 1 and status["sealed"] is False
