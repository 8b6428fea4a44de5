"""Host rows and enrollment tokens are bound to the root KEK; so are a version's times.

Each attack is done with plain sqlite3 on the real database file while the controller is
stopped; then the controller is opened and unsealed again, as after a restart. Before these
rows carried a MAC, each edit was read back and acted on: a swapped identity key logged in as
the host, a cleared ``revoked`` let a revoked host back in, edited labels made keys target it,
and a token row of the file owner's own enrolled a host with labels of their choosing.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckms.controller import rowmac
from ckms.controller.models import Targets
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.crypto import (
    KeyType,
    WrapSuite,
    generate_signing_key,
    generate_wrapping_keypair,
    signer_key_id,
    signing_public_openssh,
)
from ckms.errors import IntegrityError
from ckms.protocol import EnrollRequest
from ckms.store import audit as audit_log
from ckms_agent.identity import AgentKeys

PASSPHRASE = "a passphrase long enough for tests"
NAME = "payments/db"


@dataclass
class Fleet:
    path: Path
    home: Path
    web: AgentKeys
    old: AgentKeys
    spare_token: str


def _agent() -> AgentKeys:
    return AgentKeys(generate_signing_key(), generate_wrapping_keypair(WrapSuite.X25519)[0])


def _request(keys: AgentKeys, token: str) -> EnrollRequest:
    return EnrollRequest(
        token=token,
        identity_key=signing_public_openssh(keys.identity_public),
        signing_key=base64.b64encode(keys.identity_public).decode(),
        wrapping_key=base64.b64encode(keys.wrapping_public).decode(),
    )


async def _enroll(c: Controller, keys: AgentKeys, host: str, labels: dict[str, str]) -> None:
    token = await c.hosts.create_token(host, labels, actor="alice")
    await c.hosts.enroll(
        _request(keys, token.token), presented_key=signing_public_openssh(keys.identity_public)
    )


async def _controller(home: Path) -> Controller:
    c = Controller(ControllerSettings(home=home, listen_port=0))
    await c.open()
    await c.vault.unseal_with_passphrase(PASSPHRASE)
    return c


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """A closed store: web-1 enrolled (env=prod), old-1 enrolled then revoked, a spare unused
    token for web-2 (env=dev), one key targeting env=prod (v1 superseded by v2)."""
    home = tmp_path / "ctl"
    c = Controller(ControllerSettings(home=home, listen_port=0))
    await c.open()
    assert c.store is not None
    await init_controller(c.store, passphrase=PASSPHRASE)
    await c.vault.unseal_with_passphrase(PASSPHRASE)
    web, old = _agent(), _agent()
    await _enroll(c, web, "web-1", {"env": "prod"})
    await _enroll(c, old, "old-1", {"env": "prod"})
    await c.hosts.revoke("old-1", actor="alice")
    spare = await c.hosts.create_token("web-2", {"env": "dev"}, actor="alice")
    await c.lifecycle.create(
        NAME, KeyType.AES_256, targets=Targets.parse(["env=prod"], env="prod"), actor="alice"
    )
    await c.lifecycle.rotate(NAME, actor="alice")
    path = c.store.path
    await c.close()
    yield Fleet(path, home, web, old, spare.token)


def _edit(path: Path, statement: str, params: tuple[object, ...] = ()) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute(statement, params)


async def test_an_untouched_fleet_reads_back(fleet: Fleet) -> None:
    c = await _controller(fleet.home)
    try:
        assert await c.authenticate("web-1", fleet.web.ssh_key()) is not None
        host, suite = await c.hosts.identity("web-1")
        assert host.labels == {"env": "prod"} and suite == "x25519"
        assert host.identity_public_key == fleet.web.identity_public  # what its acks verify with
        assert [h.id for h in await c.lifecycle.hosts_for(NAME)] == ["web-1"]
    finally:
        await c.close()


async def test_a_swapped_identity_key_does_not_log_in_as_the_host(fleet: Fleet) -> None:
    """The file owner puts their own key on web-1 to fetch every key aimed at it."""
    mine = _agent()
    _edit(
        fleet.path,
        "UPDATE hosts SET identity_public_key = ?, signer_key_id = ? WHERE id = 'web-1'",
        (mine.identity_public, signer_key_id(mine.identity_public)),
    )
    c = await _controller(fleet.home)
    try:
        assert await c.authenticate("web-1", mine.ssh_key()) is None
        with pytest.raises(IntegrityError, match="host web-1 failed integrity check"):
            await c.hosts.identity("web-1")
    finally:
        await c.close()


async def test_a_swapped_wrapping_key_is_refused(fleet: Fleet) -> None:
    """Material would be wrapped to the file owner's key: the host's row is refused instead."""
    mine = _agent()
    _edit(
        fleet.path,
        "UPDATE hosts SET wrapping_public_key = ? WHERE id = 'web-1'",
        (mine.wrapping_public,),
    )
    c = await _controller(fleet.home)
    try:
        with pytest.raises(IntegrityError, match="host web-1 failed integrity check"):
            await c.hosts.identity("web-1")
        assert await c.authenticate("web-1", fleet.web.ssh_key()) is None
    finally:
        await c.close()


async def test_edited_labels_do_not_change_what_targets_the_host(fleet: Fleet) -> None:
    """old-1 is revoked; web-2-like labels edited onto web-1 would retarget it."""
    _edit(fleet.path, """UPDATE hosts SET labels = '{"env": "dev"}' WHERE id = 'web-1'""")
    c = await _controller(fleet.home)
    try:
        with pytest.raises(IntegrityError, match="host web-1 failed integrity check"):
            await c.hosts.identity("web-1")
        with pytest.raises(IntegrityError, match="host web-1 failed integrity check"):
            await c.lifecycle.hosts_for(NAME)
    finally:
        await c.close()


async def test_a_revoked_host_cleared_in_the_file_stays_out(fleet: Fleet) -> None:
    _edit(fleet.path, "UPDATE hosts SET revoked = 0, revoked_at = NULL WHERE id = 'old-1'")
    c = await _controller(fleet.home)
    try:
        assert await c.authenticate("old-1", fleet.old.ssh_key()) is None
        with pytest.raises(IntegrityError):  # nor are its requests (acks included) answered
            await c.hosts.identity("old-1")
    finally:
        await c.close()


async def test_a_token_of_the_file_owners_own_enrolls_nobody(fleet: Fleet) -> None:
    token = "ckms-enroll-" + "x" * 43
    _edit(
        fleet.path,
        "INSERT INTO enrollment_tokens(token_hash, host_name, labels, created_at, created_by, "
        "expires_at) VALUES (?, 'evil-1', '{\"env\": \"prod\"}', '2025-01-01T00:00:00Z', "
        "'alice', '2999-01-01T00:00:00Z')",
        (hashlib.sha256(token.encode()).hexdigest(),),
    )
    mine = _agent()
    c = await _controller(fleet.home)
    try:
        with pytest.raises(IntegrityError, match="enrollment token for host evil-1"):
            await c.hosts.enroll(
                _request(mine, token),
                presented_key=signing_public_openssh(mine.identity_public),
            )
        assert [h.id for h in await c.hosts.list()] == ["old-1", "web-1"]
    finally:
        await c.close()


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("""UPDATE enrollment_tokens SET labels = '{"env": "prod"}'""", id="labels"),
        pytest.param("UPDATE enrollment_tokens SET host_name = 'web-9'", id="host"),
        pytest.param(
            "UPDATE enrollment_tokens SET expires_at = '2999-01-01T00:00:00Z'", id="expiry"
        ),
    ],
)
async def test_an_edited_token_row_enrolls_nobody(fleet: Fleet, statement: str) -> None:
    _edit(fleet.path, statement + " WHERE used_at IS NULL")
    agent = _agent()
    c = await _controller(fleet.home)
    try:
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await c.hosts.enroll(
                _request(agent, fleet.spare_token),
                presented_key=signing_public_openssh(agent.identity_public),
            )
    finally:
        await c.close()


async def test_the_spare_token_still_enrolls(fleet: Fleet) -> None:
    agent = _agent()
    c = await _controller(fleet.home)
    try:
        enrolled = await c.hosts.enroll(
            _request(agent, fleet.spare_token),
            presented_key=signing_public_openssh(agent.identity_public),
        )
        assert enrolled.host.labels == {"env": "dev"}
    finally:
        await c.close()


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("UPDATE key_versions SET superseded_at = NULL WHERE version = 1", id="super"),
        pytest.param(
            "UPDATE key_versions SET activated_at = '2999-01-01T00:00:00.000000Z' "
            "WHERE version = 2",
            id="activated",
        ),
        pytest.param(
            "UPDATE key_versions SET created_at = '2999-01-01T00:00:00.000000Z' WHERE version = 2",
            id="created",
        ),
    ],
)
async def test_an_edited_version_time_is_refused(fleet: Fleet, statement: str) -> None:
    """Clearing superseded_at (or moving activated_at) keeps an old version served."""
    _edit(fleet.path, statement)
    c = await _controller(fleet.home)
    try:
        with pytest.raises(IntegrityError, match="failed integrity check"):
            await c.lifecycle.get(NAME)
    finally:
        await c.close()


async def test_a_store_bound_at_level_1_is_bound_for_hosts_and_times_at_unseal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store bound by the earlier version (versions without their times, hosts and tokens
    without MACs) is brought up once: edits after that are refused."""
    home = tmp_path / "ctl"
    with monkeypatch.context() as m:
        m.setattr(rowmac, "BIND_LEVEL", 1)
        m.setattr(rowmac, "VERSION_FIELDS", rowmac.VERSION_FIELDS_V1)
        c = Controller(ControllerSettings(home=home, listen_port=0))
        await c.open()
        assert c.store is not None
        await init_controller(c.store, passphrase=PASSPHRASE)
        await c.vault.unseal_with_passphrase(PASSPHRASE)
        await _enroll(c, _agent(), "web-1", {"env": "prod"})
        await c.lifecycle.create(NAME, KeyType.AES_256, actor="alice")
        await c.lifecycle.rotate(NAME, actor="alice")
        path = c.store.path
        await c.close()
    _edit(path, "UPDATE hosts SET mac = NULL")
    _edit(path, "UPDATE enrollment_tokens SET mac = NULL")
    c = await _controller(home)
    try:
        assert c.store is not None
        binds = [
            r.details
            for r in await audit_log.load_records(c.store)
            if r.action == rowmac.BIND_ACTION
        ]
        # level 1 stamped the first unseal's rows; now 2 versions, 1 host, 1 token
        assert binds[-1] == {"rows": 4, "level": 3, "from_level": 1}
        assert (await c.hosts.identity("web-1"))[0].labels == {"env": "prod"}
        assert [v.version for v in (await c.lifecycle.get(NAME)).versions] == [1, 2]
    finally:
        await c.close()
    _edit(path, "UPDATE key_versions SET superseded_at = NULL WHERE version = 1")
    _edit(path, """UPDATE hosts SET labels = '{"env": "dev"}'""")
    c = await _controller(home)
    try:
        with pytest.raises(IntegrityError):
            await c.lifecycle.get(NAME)
        with pytest.raises(IntegrityError):
            await c.hosts.identity("web-1")
    finally:
        await c.close()


async def test_a_level_1_marker_put_back_does_not_rebind_edited_hosts(fleet: Fleet) -> None:
    """Putting back an older marker (saved before the upgrade) with a host's MAC dropped would
    have that host stamped afresh: the audit log says the store was bound at level 2."""
    c = await _controller(fleet.home)
    assert c.store is not None
    old_marker = rowmac._marker(c.vault.row_key(), 1).encode()
    await c.close()
    _edit(fleet.path, "UPDATE meta SET value = ? WHERE name = 'rows.bound'", (old_marker,))
    _edit(fleet.path, """UPDATE hosts SET mac = NULL, labels = '{"env": "dev"}'""")
    c = Controller(ControllerSettings(home=fleet.home, listen_port=0))
    await c.open()
    try:
        with pytest.raises(IntegrityError, match="older than the audit log says"):
            await c.vault.unseal_with_passphrase(PASSPHRASE)
        assert c.vault.sealed
    finally:
        await c.close()
