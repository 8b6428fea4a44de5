"""No secret reaches a log: unseal (passphrase and shares) and enroll run end to end with every
logger at DEBUG on both ends, asyncssh's included, and every log is searched for the secrets.

Real processes throughout: ``ckms init``, ``ckms controller run``, ``ckms unseal``,
``ckms operator add`` and ``ckms-agent enroll``. No Kafka is needed (the controller serves SSH
while its publisher waits for a broker), so the bootstrap points at a closed port.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import make_ssh_key
from tests.support.processes import BIN, base_env, controller_process, run

PASSPHRASE = "tr0ub4dor-and-3-horses-for-logs"


def assert_absent(secrets: list[str], logs: list[Path]) -> None:
    for log in logs:
        text = log.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{secret[:12]}... found in {log.name}"
            # A share also must not leak word by word (a run of its words).
            words = secret.split()
            if len(words) > 4:
                for i in range(len(words) - 3):
                    assert " ".join(words[i : i + 4]) not in text, f"share words in {log.name}"


@pytest.mark.parametrize("mode", ["passphrase", "shares"])
async def test_unseal_and_enroll_leave_no_secret_in_any_log(tmp_path: Path, mode: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    home = tmp_path / "ctl"
    alice_key, _ = make_ssh_key(tmp_path / "keys" / "alice")
    bob_key, bob_public = make_ssh_key(tmp_path / "keys" / "bob")
    passfile = tmp_path / "passphrase"
    passfile.write_text(PASSPHRASE)
    secret_args = (
        ["--passphrase-file", str(passfile)] if mode == "passphrase" else ["--shares", "2/3"]
    )
    init_log = logs / "init.log"
    rc, out = await run(
        str(BIN / "ckms"), "init", "--home", str(home), "--admin", "alice",
        "--admin-key", f"{alice_key}.pub", *secret_args, *plain_shares_flag(mode),
        "--kafka", "127.0.0.1:9", "--listen", "127.0.0.1:0", "--json",
        env=base_env(), log=init_log,
    )  # fmt: skip
    assert rc == 0, init_log.read_text()
    init = json.loads(out)
    secrets = [PASSPHRASE] if mode == "passphrase" else list(init["shares"])
    controller_log = logs / "controller.log"
    # No broker here: plaintext Kafka, said explicitly (no TLS files to provide).
    async with controller_process(
        home / "controller.toml", controller_log, CKMS_KAFKA_SECURITY_PROTOCOL="PLAINTEXT"
    ) as port:

        def as_(who: str, identity: Path) -> dict[str, str]:
            return base_env(
                CKMS_CONTROLLER=f"127.0.0.1:{port}",
                CKMS_CONTROLLER_FINGERPRINT=init["host_key_fingerprint"],
                CKMS_USER=who,
                CKMS_IDENTITY=str(identity),
            )

        client_logs: list[Path] = []
        if mode == "passphrase":
            client_logs.append(logs / "unseal.log")
            rc, _ = await run(
                str(BIN / "ckms"), "unseal", "--passphrase-file", str(passfile),
                env=as_("alice", alice_key), log=client_logs[-1],
            )  # fmt: skip
            assert rc == 0, client_logs[-1].read_text()[-3000:]
        else:
            add_log = logs / "operator-add.log"
            (tmp_path / "bob.pub").write_text(bob_public)
            rc, _ = await run(
                str(BIN / "ckms"), "operator", "add", "bob", "--role", "custodian",
                "--key", str(tmp_path / "bob.pub"), env=as_("alice", alice_key), log=add_log,
            )  # fmt: skip
            assert rc == 0, add_log.read_text()[-3000:]
            for who, identity, share in (("alice", alice_key, 0), ("bob", bob_key, 1)):
                share_file = tmp_path / f"share-{who}"
                share_file.write_text(secrets[share])
                client_logs.append(logs / f"unseal-{who}.log")
                rc, _ = await run(
                    str(BIN / "ckms"), "unseal", "--share-file", str(share_file),
                    env=as_(who, identity), log=client_logs[-1],
                )  # fmt: skip
                assert rc == 0, client_logs[-1].read_text()[-3000:]

        token_log = logs / "host-enroll.log"
        rc, out = await run(
            str(BIN / "ckms"), "host", "enroll", "web-1", "--json",
            env=as_("alice", alice_key), log=token_log,
        )  # fmt: skip
        assert rc == 0, token_log.read_text()[-3000:]
        token = json.loads(out)["token"]
        assert token not in json.loads(out)["agent_command"]
        secrets.append(token)
        enroll_log = logs / "agent-enroll.log"
        state = tmp_path / "agent"
        rc, out = await run(
            str(BIN / "ckms-agent"), "enroll",
            "--controller", f"127.0.0.1:{port}",
            "--host-key-fingerprint", init["host_key_fingerprint"],
            "--state-dir", str(state / "state"), "--config", str(state / "agent.toml"),
            "--root", str(state / "root"),
            env=base_env(CKMS_AGENT_ENROLL_TOKEN=token), log=enroll_log,
        )  # fmt: skip
        assert rc == 0, enroll_log.read_text()[-3000:]
        assert "enrolled as host web-1" in out

    every_log = [controller_log, init_log, token_log, enroll_log, *client_logs]
    assert_absent(secrets, every_log)
    controller_text = controller_log.read_text()
    # The logs really were at DEBUG with asyncssh on: the exec commands are there, bare.
    assert "Command: unseal" in controller_text and "Command: enroll" in controller_text
    assert "DEBUG ckms" in controller_text
    for client_log in (enroll_log, *client_logs):
        assert "DEBUG asyncssh" in client_log.read_text(), client_log.name


def plain_shares_flag(mode: str) -> list[str]:
    """Shares in clear on stdout (the test reads them): the explicit opt-in of ``ckms init``."""
    return [] if mode == "passphrase" else PLAIN_SHARES


PLAIN_SHARES = ["--print-shares"]
