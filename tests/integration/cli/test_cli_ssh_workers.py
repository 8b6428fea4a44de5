"""``ckms controller run`` with ``ssh_workers = 2`` as a real process: two custodians give their
shares one at a time (each ``ckms unseal`` a new connection, to whichever worker the kernel
picks), every later connection finds the controller unsealed, ``ckms seal`` seals every worker,
and SIGTERM stops the parent and its workers."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckms.cli._errors import ExitCode
from ckms.crypto import SubjectRole
from ckms.devkafka import LocalKafka
from tests.integration.cli.test_cli_e2e import LISTENING, _drain, operator_env
from tests.support.cli import make_ssh_key, run_cli

pytestmark = pytest.mark.kafka


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.requirement("PCI-3.7.6")
@pytest.mark.timeout(300)  # many CLI processes and worker restarts on a busy machine
async def test_shares_given_to_different_workers_unseal_every_worker(
    tmp_path: Path, local_kafka: LocalKafka, unique_topic: Callable[[str], str]
) -> None:
    alice_key, alice_pub = make_ssh_key(tmp_path / "keys" / "alice")
    (tmp_path / "alice.pub").write_text(alice_pub)
    home = tmp_path / "home"
    init = await run_cli(
        "init", "--home", str(home), "--shares", "2/3", "--print-shares", "--admin", "alice",
        "--admin-key", str(tmp_path / "alice.pub"), "--kafka", local_kafka.bootstrap,
        "--listen", "127.0.0.1:0", "--json",
    )  # fmt: skip
    assert init.rc == 0, init.stderr
    shares = init.json()["shares"]
    local_kafka.ca.install(SubjectRole.CONTROLLER, "controller", home / "kafka")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_")}
    env |= {
        "CKMS_EVENTS_TOPIC": unique_topic("events"),
        "CKMS_FLEET_TOPIC": unique_topic("fleet"),
        "CKMS_AUDIT_TOPIC": unique_topic("audit"),
        "CKMS_SSH_WORKERS": "2",
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

        port, fingerprint = await asyncio.wait_for(listening(), 60)
        drain = asyncio.create_task(_drain(proc.stderr, log))
        workers = _children(proc.pid)
        assert len(workers) == 2
        alice = operator_env(port, fingerprint, "alice", alice_key)

        for number, share in enumerate(shares[:2], start=1):
            (tmp_path / f"share{number}").write_text(share + "\n")
        first = await run_cli("unseal", "--share-file", str(tmp_path / "share1"), env=alice)
        assert first.rc == 0 and "1 of 2 given; still sealed" in first.stdout, first.stderr
        for _ in range(3):  # the one share given is counted wherever a request lands
            status = await run_cli("status", "--json", env=alice)
            assert status.rc == ExitCode.SEALED
        again = await run_cli("unseal", "--share-file", str(tmp_path / "share1"), env=alice)
        assert again.rc != 0 and "already" in again.stderr
        # The same custodian may not give the second share; shares count per custodian.
        (tmp_path / "bob.pub").write_text(make_ssh_key(tmp_path / "keys" / "bob")[1])
        added = await run_cli(
            "operator", "add", "bob", "--role", "custodian", "--key", str(tmp_path / "bob.pub"),
            env=alice,
        )  # fmt: skip
        assert added.rc == 0, added.stderr
        bob = operator_env(port, fingerprint, "bob", tmp_path / "keys" / "bob")
        second = await run_cli("unseal", "--share-file", str(tmp_path / "share2"), env=bob)
        assert second.rc == 0 and "controller unsealed" in second.stdout, second.stderr
        for _ in range(4):  # new connections, each to one of the two workers
            created = await run_cli(
                "key", "create", f"app/k{_}", "--type", "aes-256", env=alice
            )
            assert created.rc == 0, created.stderr

        sealed = await run_cli("seal", env=alice)
        assert sealed.rc == 0, sealed.stderr
        for _ in range(4):
            refused = await run_cli("key", "rotate", "app/k0", env=alice)
            assert refused.rc == ExitCode.SEALED, refused.stderr

        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 60) == 0, b"".join(log).decode()
        await drain
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
