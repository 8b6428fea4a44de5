"""Bring your own key, end to end: ``ckms key import`` (the real CLI, over SSH) of every key type
from the files operators have (``openssl``, ``ssh-keygen``, JWK, raw), installed by a real agent
byte-identical to the canonical material and read back by ``openssl``/``ssh-keygen``; the
imported bytes appear in no log record (DEBUG, every logger) and no Kafka record."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ckms.controller.fleet import key_fleet_status
from ckms.controller.service import Controller
from ckms.crypto import InstallFormat, KeyType, SubjectRole, encode_for_install, generate
from ckms.store import audit as audit_log
from tests.support.cli import Operators, audit_records
from tests.support.fleet import enroll_agent, running_agent, wait_until
from tests.support.kafka import link_as
from tests.support.records import read_raw

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
        reason="needs openssl and ssh-keygen",
    ),
]

HOST = {"env": "prod", "role": "app"}


def sh(*argv: str) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


def openssl_der(path: Path, *, inform: str = "PEM") -> bytes:
    """What openssl reads from ``path``: the private key as PKCS#8 DER."""
    return sh(
        "openssl", "pkcs8", "-topk8", "-nocrypt", "-inform", inform, "-in", str(path),
        "-outform", "DER",
    )  # fmt: skip


def variants(data: bytes) -> list[bytes]:
    """The encodings a leak of ``data`` would show up in."""
    out = [data, data.hex().encode(), base64.b64encode(data), base64.urlsafe_b64encode(data)]
    out += [v.rstrip(b"=") for v in out[2:]]
    return [v for v in out if len(v) >= 16]


async def converged(c: Controller, key: str, hosts: set[str]) -> bool:
    assert c.store is not None
    status = await key_fleet_status(c.store, c.lifecycle, c.hosts, key)
    return {s.host for s in status if s.converged} >= hosts


@pytest.mark.requirement("PCI-3.6.1.2", "KMIP-2.1-OPERATIONS")
async def test_every_type_imports_installs_byte_identical_and_never_leaks(
    controller: Controller, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = controller
    ops = Operators(c, tmp_path)
    await ops.add("alice", "admin")
    src = tmp_path / "src"
    src.mkdir()
    config = await enroll_agent(c, tmp_path, "app-1", HOST)
    root = tmp_path / "app-1" / "root" / "keys"

    # One file per key, as an operator would have it: (name, type, file, file format, install).
    (src / "aes.bin").write_bytes(os.urandom(32))
    (src / "hmac.hex").write_bytes(sh("openssl", "rand", "-hex", "32"))
    (src / "secret.txt").write_bytes(sh("openssl", "rand", "-base64", "33"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(src / "ed25519"))
    sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-out", str(src / "p256.pem"))  # fmt: skip
    p384 = generate(KeyType.ECDSA_P384)
    (src / "p384.jwk").write_bytes(
        encode_for_install(KeyType.ECDSA_P384, p384, InstallFormat.JWK, key_name="x", version=1)
    )
    sh("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072",
       "-out", str(src / "rsa.pem"))  # fmt: skip
    (src / "rsa.der").write_bytes(openssl_der(src / "rsa.pem"))
    sh("openssl", "genpkey", "-algorithm", "x25519", "-out", str(src / "x25519.pem"))
    keys = [
        ("app/aes", "aes-256", "aes.bin", "auto", "raw"),
        ("app/hmac", "hmac-sha256", "hmac.hex", "hex", "base64"),
        ("app/secret", "secret", "secret.txt", "auto", "raw"),
        ("app/ssh", "ed25519", "ed25519", "auto", "openssh"),
        ("app/p256", "ecdsa-p256", "p256.pem", "auto", "pem"),
        ("app/p384", "ecdsa-p384", "p384.jwk", "jwk", "jwk"),
        ("app/rsa", "rsa-3072", "rsa.der", "der", "raw"),
        ("app/x25519", "x25519", "x25519.pem", "pem", "pem"),
    ]
    runs = []
    async with running_agent(config):
        for name, kt, file, file_format, install in keys:
            run = await ops.ckms(
                "key", "import", name, "--type", kt, "--file", str(src / file),
                "--file-format", file_format, "--format", install,
                "--path", "/keys/{purpose}", "--target", "env=prod,role=app", "--json",
                who="alice",
            )  # fmt: skip
            assert run.rc == 0, run.stderr
            runs.append(run)
            shown = run.json()["key"]
            assert [v["origin"] for v in shown["versions"]] == ["imported"]
            assert shown["type"] == kt
        for name, *_ in keys:
            await wait_until(lambda n=name: converged(c, n, {"app-1"}), what=f"{name} installed")

        def canonical(name: str) -> bytes:
            return (root / name.removeprefix("app/")).read_bytes()

        assert canonical("app/aes") == (src / "aes.bin").read_bytes()
        hmac_key = bytes.fromhex((src / "hmac.hex").read_text().strip())
        assert base64.b64decode(canonical("app/hmac")) == hmac_key
        assert canonical("app/secret") == (src / "secret.txt").read_bytes().rstrip(b"\n")
        # What the tools read from the installed files is the key the operator brought.
        installed_ssh = root / "ssh"
        public = sh("ssh-keygen", "-y", "-f", str(installed_ssh)).decode().split()[:2]
        assert public == (src / "ed25519.pub").read_text().split()[:2]
        assert openssl_der(root / "p256") == openssl_der(src / "p256.pem")
        assert openssl_der(root / "p256") == await c.vault.material("app/p256", 1)
        assert (root / "p256").read_bytes() == (src / "p256.pem").read_bytes()
        assert openssl_der(root / "x25519") == openssl_der(src / "x25519.pem")
        assert canonical("app/rsa") == (src / "rsa.der").read_bytes()
        assert openssl_der(root / "rsa", inform="DER") == (src / "rsa.der").read_bytes()
        jwk = json.loads(canonical("app/p384"))
        assert jwk == json.loads((src / "p384.jwk").read_bytes()) | {"kid": "app/p384#1"}
        assert await c.vault.material("app/p384", 1) == p384

        # Rotation of an imported key generates, unless --import-file gives the next version.
        (src / "aes2.bin").write_bytes(os.urandom(32))
        run = await ops.ckms(
            "key", "rotate", "app/aes", "--import-file", str(src / "aes2.bin"), "--json",
            who="alice",
        )  # fmt: skip
        assert run.rc == 0, run.stderr
        assert [v["origin"] for v in run.json()["key"]["versions"]] == ["imported", "imported"]
        await wait_until(lambda: converged(c, "app/aes", {"app-1"}), what="v2 installed")
        assert canonical("app/aes") == (src / "aes2.bin").read_bytes()
        run = await ops.ckms("key", "rotate", "app/aes", "--json", who="alice")
        assert run.rc == 0, run.stderr
        assert run.json()["key"]["versions"][2]["origin"] == "generated"
        await wait_until(lambda: converged(c, "app/aes", {"app-1"}), what="v3 installed")
        assert canonical("app/aes") == await c.vault.material("app/aes", 3)
        assert canonical("app/aes") != (src / "aes2.bin").read_bytes()

    # Audit: each import and the imported rotation say origin=imported, and the log verifies.
    records = await audit_records(c)
    imports = [r for r in records if r.action == "key.import" and r.outcome == "ok"]
    assert sorted(r.object for r in imports) == sorted(f"key:{k[0]}" for k in keys)
    assert all(r.details["origin"] == "imported" for r in imports)
    rotations = [r.details["origin"] for r in records if r.action == "key.rotate"]
    assert rotations == ["imported", "generated"]
    assert c.store is not None
    assert (await audit_log.verify_store(c.store, await c.vault.public_key())).ok

    # No imported byte in any log record or any Kafka record, in any encoding.
    secrets: list[bytes] = []
    for name, *_ in keys:
        secrets += variants(await c.vault.material(name, 1))
    for file in src.iterdir():
        data = file.read_bytes()
        if not file.name.endswith(".pub"):
            secrets += variants(data)
            secrets += [line for line in data.splitlines() if len(line) >= 40]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records).encode()
    assert b"imported key app/rsa" in logged  # the controller's log really was captured
    logged += "\n".join(r.stdout + r.stderr for r in runs).encode()
    reader = link_as(c, SubjectRole.SUBSCRIBER, "import-check")
    published = await read_raw(reader, c.settings.events_topic, len(keys) + 2)
    kafka = b"\n".join((r.value or b"") + b"".join(v for _, v in r.headers) for r in published)
    for secret in secrets:
        assert secret not in logged
        assert secret not in kafka
