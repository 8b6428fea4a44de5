"""Split knowledge one person cannot undo: shares age-encrypted to custodians' SSH keys at init
(checked with Debian's ``age``), unsealed with ``ckms unseal --share-file NAME.age``, counted
once per identity key, and the bootstrap waiver closed for good once custodians confirm."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shamir_mnemonic.wordlist import WORDLIST

from ckms._kafka_security import KafkaProtocol
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.errors import ApprovalRequiredError, UnsealError
from ckms.protocol import admin as api
from ckms.ssh import RpcClient, load_private_key
from ckms.store import audit as audit_log
from tests.support.cli import make_ssh_key
from tests.support.processes import BIN, base_env, controller_process, run

NO_KAFKA = "127.0.0.1:9"
NO_KAFKA_SECURITY = {"CKMS_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
"""No broker in these tests: no TLS files either (the development setting, said explicitly)."""
WORDS = frozenset(WORDLIST)


def mnemonic_runs(text: str) -> list[str]:
    """Runs of 8+ SLIP-39 words: what a share on a terminal looks like."""
    runs, current = [], []
    for word in re.findall(r"[A-Za-z]+", text):
        if word in WORDS:
            current.append(word)
            continue
        if len(current) >= 8:
            runs.append(" ".join(current))
        current = []
    if len(current) >= 8:
        runs.append(" ".join(current))
    return runs


def age_decrypt(age: str, identity: Path, path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [age, "-d", "-i", str(identity), str(path)], capture_output=True, timeout=30, check=False
    )


async def test_init_encrypts_each_share_to_its_custodian_and_age_decrypts_it(
    tmp_path: Path, age_binary: str
) -> None:
    keys = {n: make_ssh_key(tmp_path / "keys" / n) for n in ("boss", "alice", "bob", "carol")}
    for name, (_, public) in keys.items():
        (tmp_path / f"{name}.pub").write_text(public + "\n")
    home, shares = tmp_path / "ctl", tmp_path / "shares"
    logs = tmp_path / "logs"
    logs.mkdir()
    init_log = logs / "init.log"
    rc, out = await run(
        str(BIN / "ckms"), "init", "--home", str(home), "--admin", "boss",
        "--admin-key", str(tmp_path / "boss.pub"), "--shares", "2/3",
        *(f"--custodian={n}={tmp_path / n}.pub" for n in ("alice", "bob", "carol")),
        "--share-dir", str(shares), "--kafka", NO_KAFKA, "--listen", "127.0.0.1:0",
        env=base_env(CKMS_LOG_LEVEL="WARNING"), log=init_log,
    )  # fmt: skip
    assert rc == 0, init_log.read_text()
    # No terminal shows a share: neither what init printed nor its log.
    assert mnemonic_runs(out + init_log.read_text()) == []
    assert sorted(p.name for p in shares.iterdir()) == ["alice.age", "bob.age", "carol.age"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in shares.iterdir())
    # Debian's age, with alice's SSH key, opens alice's share; bob's key does not.
    opened = await asyncio.to_thread(
        age_decrypt, age_binary, keys["alice"][0], shares / "alice.age"
    )
    assert opened.returncode == 0, opened.stderr.decode()
    alice_share = opened.stdout.decode().strip()
    assert len(alice_share.split()) in (20, 33) and set(alice_share.split()) <= WORDS
    wrong = await asyncio.to_thread(age_decrypt, age_binary, keys["bob"][0], shares / "alice.age")
    assert wrong.returncode != 0 and not wrong.stdout

    fingerprint = re.search(r"controller host key: (SHA256:\S+)", out)
    assert fingerprint, out
    async with controller_process(
        home / "controller.toml", logs / "controller.log", **NO_KAFKA_SECURITY
    ) as port:

        def as_(who: str) -> dict[str, str]:
            return base_env(
                CKMS_LOG_LEVEL="WARNING",
                CKMS_CONTROLLER=f"127.0.0.1:{port}",
                CKMS_CONTROLLER_FINGERPRINT=fingerprint.group(1),
                CKMS_USER=who,
                CKMS_IDENTITY=str(keys[who][0]),
            )

        # The wrong identity is refused before anything is sent.
        rc, _ = await run(
            str(BIN / "ckms"), "unseal", "--share-file", str(shares / "alice.age"),
            "--identity", str(keys["bob"][0]), env=as_("alice"), log=logs / "wrong.log",
        )  # fmt: skip
        assert rc != 0 and "cannot decrypt" in (logs / "wrong.log").read_text()
        for who in ("alice", "bob"):
            rc, said = await run(
                str(BIN / "ckms"), "unseal", "--share-file", str(shares / f"{who}.age"),
                env=as_(who), log=logs / f"unseal-{who}.log",
            )  # fmt: skip
            assert rc == 0, (logs / f"unseal-{who}.log").read_text()
        assert "controller unsealed" in said
        # The custodians confirmed their set: the root admin now needs an approval.
        (tmp_path / "eve.pub").write_text(make_ssh_key(tmp_path / "keys" / "eve")[1])
        rc, _ = await run(
            str(BIN / "ckms"), "operator", "add", "eve", "--role", "admin",
            "--key", str(tmp_path / "eve.pub"), env=as_("boss"), log=logs / "add.log",
        )  # fmt: skip
        assert rc == 5, (logs / "add.log").read_text()  # approval required


def test_init_refuses_custodian_sets_that_one_person_could_hold(tmp_path: Path) -> None:
    _, public = make_ssh_key(tmp_path / "k1")
    (tmp_path / "k1.pub").write_text(public)
    _, admin = make_ssh_key(tmp_path / "adm")
    (tmp_path / "adm.pub").write_text(admin)
    base = [
        str(BIN / "ckms"), "init", "--home", str(tmp_path / "h"), "--admin", "boss",
        "--admin-key", str(tmp_path / "adm.pub"), "--shares", "2/2",
    ]  # fmt: skip
    cases = [
        ([f"--custodian=a={tmp_path}/k1.pub", f"--custodian=b={tmp_path}/k1.pub"], "already"),
        ([f"--custodian=a={tmp_path}/k1.pub"], "one custodian per share"),
        ([f"--custodian=a={tmp_path}/k1.pub", f"--custodian=b={tmp_path}/adm.pub"], "already"),
        ([], "--print-shares"),
    ]
    for extra, message in cases:
        done = subprocess.run([*base, *extra], capture_output=True, timeout=60, check=False)
        assert done.returncode != 0 and message in done.stderr.decode(), done.stderr.decode()
        assert not (tmp_path / "h").exists()  # refused before anything was written


@contextlib.asynccontextmanager
async def share_controller(tmp_path: Path) -> AsyncIterator[tuple[Controller, list[str]]]:
    controller = Controller(
        ControllerSettings(
            home=tmp_path / "ctl",
            listen_port=0,
            kafka_bootstrap=NO_KAFKA,
            kafka_security_protocol=KafkaProtocol.PLAINTEXT,
        )
    )
    await controller.open()
    assert controller.store is not None
    made = await init_controller(controller.store, shares=(2, 3))
    task = asyncio.create_task(controller.run())
    try:
        await asyncio.wait_for(controller.wait_started(), 10)
        yield controller, made.mnemonics
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await controller.close()


async def person(controller: Controller, tmp_path: Path, name: str, role: str) -> RpcClient:
    path, public = make_ssh_key(tmp_path / "keys" / name)
    await controller.admin.operators.add(name, role, public, actor="test-setup")
    return RpcClient(
        host="127.0.0.1",
        port=controller.port,
        username=name,
        client_key=load_private_key(path),
        host_key_fingerprint=controller.host_key_fingerprint,
    )


async def test_shares_count_once_per_identity_key_not_per_name(tmp_path: Path) -> None:
    async with share_controller(tmp_path) as (controller, shares):
        vault = controller.vault
        await vault.submit_share(shares[0], custodian="alice", key="SHA256:same-key")
        with pytest.raises(UnsealError, match="identity key already gave a share"):
            await vault.submit_share(shares[1], custodian="alice-laptop", key="SHA256:same-key")
        assert vault.sealed
        progress = await vault.submit_share(shares[1], custodian="bob", key="SHA256:bob")
        assert not progress.sealed
        assert progress.contributors == (("alice", "SHA256:same-key"), ("bob", "SHA256:bob"))


@pytest.mark.requirement("PCI-3.7.8")
async def test_bootstrap_ends_for_good_once_custodians_confirm(tmp_path: Path) -> None:
    async with share_controller(tmp_path) as (controller, shares):
        root = await person(controller, tmp_path, "boss", "admin")
        c1 = await person(controller, tmp_path, "c1", "custodian")
        c2 = await person(controller, tmp_path, "c2", "custodian")
        for client, share in ((c1, shares[0]), (c2, shares[1])):
            async with client:
                params = api.UnsealParams(share=share).model_dump(mode="json", exclude_none=True)
                await client.call("unseal", params)
        assert not controller.vault.sealed
        assert not await controller.admin.operators.bootstrap_open()
        # Both custodians leave (say, each removal was approved); nobody else could approve.
        for name in ("c1", "c2"):
            await controller.admin.operators.remove(name, actor="test-setup")
        _, public = make_ssh_key(tmp_path / "keys" / "sock")
        add = api.OperatorAddParams(name="sock", role="admin", ssh_public_key=public)
        async with root:
            # Before confirmation this was waived; now the root admin cannot add a second
            # identity for themselves alone.
            with pytest.raises(ApprovalRequiredError):
                await root.call("operator.add", add.model_dump(mode="json"))
        assert controller.store is not None
        actions = [r.action for r in await audit_log.load_records(controller.store)]
        assert "custodians.confirm" in actions
