"""``key.import`` and ``key.rotate --import-file`` across the trust boundary: who may call them,
dual control where the key's policy puts ``create``/``rotate`` under it (the stored request holds
the material sealed, never in the clear), refusals that never echo the material, and the
``origin`` mark bound by the version's row MAC."""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import pytest

from ckms.cli._errors import ExitCode
from ckms.controller.service import Controller
from ckms.errors import IntegrityError, PermissionDeniedError, ProtocolError
from ckms.protocol import admin as api
from ckms.ssh import Principal
from tests.support.audit import tamper
from tests.support.cli import Operators, audit_records

pytestmark = pytest.mark.kafka


def key_file(tmp_path: Path, data: bytes | None = None, name: str = "k.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(32) if data is None else data)
    return path


def db_bytes(c: Controller) -> bytes:
    """Every byte of the controller's database files (WAL included)."""
    db = c.settings.db_path
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


@pytest.mark.requirement("PCI-3.6.1")
async def test_roles_of_key_import(controller: Controller, ops: Operators, tmp_path: Path) -> None:
    f = key_file(tmp_path)
    for who in ("erin", "carol"):  # auditor, custodian
        run = await ops.ckms("key", "import", f"app/{who}", "--type", "aes-256",
                             "--file", str(f), who=who)  # fmt: skip
        assert run.rc == ExitCode.FAILED
        assert "may not call key.import" in run.stderr
    run = await ops.ckms("key", "import", "app/dave", "--type", "aes-256", "--file", str(f),
                         "--json", who="dave")  # fmt: skip
    assert run.rc == 0, run.stderr
    assert await controller.vault.material("app/dave", 1) == f.read_bytes()
    actions = [(r.actor, r.action, r.outcome) for r in await audit_records(controller)]
    assert ("erin", "rpc.key.import", "refused") in actions
    assert ("carol", "rpc.key.import", "refused") in actions
    assert ("dave", "key.import", "ok") in actions
    # A rotation that brings material is a rotation: an auditor may not.
    run = await ops.ckms("key", "rotate", "app/dave", "--import-file", str(f), who="erin")
    assert run.rc == ExitCode.FAILED and "may not call key.rotate" in run.stderr


@pytest.mark.requirement("PCI-3.6.1.2")
async def test_import_under_dual_control_stores_the_material_sealed(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    c = controller
    material = os.urandom(32)
    f = key_file(tmp_path, material)
    args = ("key", "import", "app/dual", "--type", "aes-256", "--file", str(f),
            "--approvals", "create,rotate,destroy")  # fmt: skip
    run = await ops.ckms(*args, who="dave")  # an operator may not even ask
    assert run.rc == ExitCode.FAILED and "ask an admin" in run.stderr
    run = await ops.ckms(*args, who="alice")
    assert run.rc == ExitCode.APPROVAL_REQUIRED, run.stderr
    (request,) = await c.admin.requests.list()
    assert request.operation == "key.import"
    assert request.params["material"] is None and request.params["staged"]
    for shown in (material, material.hex().encode(), base64.b64encode(material)):
        assert shown not in db_bytes(c)
    with pytest.raises(PermissionDeniedError, match="a different admin or custodian"):
        await c.admin.dual.approve(ops_principal(c, "alice"), request.id)
    approved = await ops.ckms("request", "approve", request.id, who="bob")
    assert approved.rc == 0, approved.stderr
    key = await c.lifecycle.get("app/dual")
    assert key.version(1).origin == "imported"
    assert await c.vault.material("app/dual", 1) == material

    # A rotation with material, under dual control too: sealed while it waits.
    second = os.urandom(32)
    f2 = key_file(tmp_path, second, "k2.bin")
    run = await ops.ckms("key", "rotate", "app/dual", "--import-file", str(f2), who="alice")
    assert run.rc == ExitCode.APPROVAL_REQUIRED, run.stderr
    (pending,) = await c.admin.requests.list()
    assert pending.params["staged"] and pending.params["material"] is None
    assert second not in db_bytes(c) and base64.b64encode(second) not in db_bytes(c)
    approved = await ops.ckms("request", "approve", pending.id, "--json", who="carol")
    assert approved.rc == 0, approved.stderr
    assert await c.vault.material("app/dual", 2) == second
    assert (await c.lifecycle.get("app/dual")).version(2).origin == "imported"
    records = [r for r in await audit_records(c) if r.action == "key.rotate"]
    assert records[-1].actor == "alice+carol" and records[-1].details["origin"] == "imported"


def ops_principal(c: Controller, name: str) -> Principal:
    """``name`` as an admin, for calls made in-process (roles checked as for a remote one)."""
    return Principal(name=name, role="admin", key_fingerprint="SHA256:in-process")


async def test_a_caller_cannot_hand_in_staged_material(controller: Controller) -> None:
    """``staged`` is the controller's own sealed form; a caller replaying one (say, read from
    a database copy) is refused before anything is opened."""
    c = controller
    await c.lifecycle.create("app/k", "aes-256", actor="test-setup")
    for method, params in (
        ("key.import", {"name": "app/x", "type": "aes-256", "staged": "AAAA"}),
        ("key.rotate", {"name": "app/k", "staged": "AAAA"}),
    ):
        with pytest.raises(ProtocolError, match="set by the controller"):
            await c.rpc.call(ops_principal(c, "alice"), method, params)
    assert (await c.lifecycle.get("app/k")).latest_version == 1


async def test_refusals_name_the_problem_and_never_the_material(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    c = controller
    weak = key_file(tmp_path, bytes(32), "zero.bin")
    run = await ops.ckms("key", "import", "app/w", "--type", "aes-256", "--file", str(weak),
                         who="alice")  # fmt: skip
    assert run.rc == ExitCode.USAGE and "fewer than 8 distinct" in run.stderr
    secret = key_file(tmp_path, b"Winter2025!!\n", "pw.txt")
    run = await ops.ckms("key", "import", "app/pw", "--type", "secret", "--file", str(secret),
                         who="alice")  # fmt: skip
    assert run.rc == ExitCode.USAGE and "bits of entropy" in run.stderr
    assert "Winter2025" not in run.stderr + run.stdout
    await c.lifecycle.create("app/ed", "ed25519", actor="test-setup")
    rsa_like = key_file(tmp_path, os.urandom(32), "junk.der")
    run = await ops.ckms("key", "rotate", "app/ed", "--import-file", str(rsa_like),
                         "--import-format", "der", who="alice")  # fmt: skip
    assert run.rc == ExitCode.USAGE and "not a readable unencrypted der" in run.stderr
    assert (await c.lifecycle.get("app/ed")).latest_version == 1
    refused = [r for r in await audit_records(c) if r.outcome == "refused"]
    assert {r.object for r in refused} >= {"key:app/w", "key:app/pw", "key:app/ed"}
    text = "".join(str(r.details) for r in refused)
    assert "Winter2025" not in text and rsa_like.read_bytes().hex()[:16] not in text
    assert {k.name for k in await c.lifecycle.list_keys()} == {"app/ed"}


async def test_origin_is_bound_by_the_version_mac(
    controller: Controller, ops: Operators, tmp_path: Path
) -> None:
    """A database owner who marks a generated version imported (or clears an imported mark,
    to hide where material came from) is caught when the row is read."""
    c = controller
    await c.lifecycle.create("app/gen", "aes-256", actor="test-setup")
    await c.admin.key_import(
        ops_principal(c, "alice"),
        api.KeyImportParams(
            name="app/imp",
            type="aes-256",
            material=base64.b64encode(os.urandom(32)).decode(),  # type: ignore[arg-type]
        ),
    )
    assert (await c.lifecycle.get("app/imp")).version(1).origin == "imported"
    assert c.store is not None
    db = c.settings.db_path
    for name, value in (("app/gen", "imported"), ("app/imp", None)):
        tamper(
            db,
            "UPDATE key_versions SET origin = ? "
            "WHERE key_id = (SELECT id FROM keys WHERE name = ?)",
            params=(value, name),
        )
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await c.lifecycle.get(name)
    with sqlite3.connect(db, timeout=60) as raw:
        assert raw.execute("SELECT count(*) FROM key_versions WHERE origin IS NOT NULL").fetchone()
