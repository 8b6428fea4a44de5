"""Every caller agrees on what a host should hold: agent sync, heartbeat drift, the fleet view and
``fleet status`` all answer the same table of cases the way ``desired_versions`` does.

The cases mix every reason a version or a host falls out: states that are not distributable, an
Active version whose material is gone, a host the selectors miss, a host listed by id in another
environment, and a revoked host. Before these callers shared one rule, the fleet view and
``fleet status`` counted the materialless Active version as wanted while sync did not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ckms.controller import rowmac
from ckms.controller.desired import desired_versions, drifted_keys
from ckms.controller.fleet import key_fleet_status
from ckms.controller.models import Host, Key
from ckms.controller.sealing import init_controller
from ckms.controller.service import Controller, ControllerSettings
from ckms.controller.targets import host_matches
from ckms.crypto import KeyType
from ckms.errors import PermissionDeniedError
from ckms.protocol import Targets
from ckms.protocol import admin as api
from ckms.ssh import Principal
from ckms.store import format_time

if TYPE_CHECKING:
    from conftest import FakeClock

HOSTS = {
    "web-1": {"env": "prod", "role": "web"},
    "web-2": {"env": "prod", "role": "web"},
    "db-1": {"env": "prod", "role": "db"},  # selectors miss it
    "dev-1": {"env": "prod", "role": "app"},  # listed by id, relabelled env=dev below
    "old-1": {"env": "prod", "role": "web"},  # revoked
}


@pytest.fixture
async def controller(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Controller]:
    c = Controller(ControllerSettings(home=tmp_path / "ctl", listen_port=0), clock=clock)
    await c.open()
    assert c.store is not None
    await init_controller(c.store, passphrase="a long enough passphrase", clock=clock)
    await c.vault.unseal_with_passphrase("a long enough passphrase")
    async with c.store.write() as tx:
        for host_id, labels in HOSTS.items():
            await tx.execute(
                "INSERT INTO hosts(id, name, labels, identity_public_key, wrapping_public_key, "
                "enrolled_at, revoked) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    host_id,
                    host_id,
                    json.dumps(labels),
                    b"\x00",
                    b"\x00",
                    format_time(clock()),
                    int(host_id == "old-1"),
                ),
            )
            await rowmac.stamp_host(tx, host_id)
    try:
        yield c
    finally:
        await c.close()


async def _keys(c: Controller, clock: FakeClock) -> list[Key]:
    """Three keys whose versions cover every state a host may or may not hold."""
    web = Targets.parse(["env=prod,role=web", "host:dev-1", "host:old-1"], env="prod")
    lc = c.lifecycle
    # app/web: v1 Deactivated, v2 Active (primary), v3 PreActive (pre-distributed).
    await lc.create("app/web", KeyType.AES_256, actor="t", targets=web)
    await lc.rotate("app/web", actor="t")
    await lc.deactivate("app/web", 1, actor="t")
    key = await lc.get("app/web")
    delayed = key.policy.model_copy(update={"activation_delay": timedelta(days=1)})
    await lc.set_policy("app/web", delayed, actor="t")
    await lc.rotate("app/web", actor="t")
    # app/gone: v1 Active, but its material is gone (a damaged row): distributable to nobody.
    await lc.create("app/gone", KeyType.HMAC_SHA256, actor="t", targets=web)
    assert c.store is not None
    async with c.store.write() as tx:
        await tx.execute(
            "UPDATE key_versions SET sealed_material = NULL WHERE version = 1 AND key_id = "
            "(SELECT id FROM keys WHERE name = 'app/gone')"
        )
    # app/db: v1 Compromised, v2 Active.
    db = Targets.parse(["role=db"])
    await lc.create("app/db", KeyType.ED25519, actor="t", targets=db)
    await lc.rotate("app/db", actor="t")
    await lc.revoke("app/db", "keyCompromise", actor="t", version=1)
    # dev-1 moves to another environment after the keys named it: the guard keeps them away.
    await c.hosts.set_labels("dev-1", {"env": "dev", "role": "app"}, actor="t")
    clock.advance(seconds=1)
    return await lc.list_keys()


def _pairs(key: Key, host: Host) -> set[tuple[str, int, str]]:
    return {(key.name, v.version, v.digest) for v in desired_versions(key, host)}


@pytest.mark.requirement("ISO27002-8.24")
async def test_every_caller_agrees_with_desired_versions(
    controller: Controller, clock: FakeClock
) -> None:
    c = controller
    assert c.store is not None
    keys = await _keys(c, clock)
    hosts = await c.hosts.list()
    # The table itself, written out: what each host should hold of each key.
    expected = {
        (k.name, h.id): sorted(v.version for v in desired_versions(k, h))
        for k in keys
        for h in hosts
    }
    assert {kh: vs for kh, vs in expected.items() if vs} == {
        ("app/web", "web-1"): [2, 3],
        ("app/web", "web-2"): [2, 3],
        ("app/db", "db-1"): [2],
    }

    for host in hosts:
        principal = Principal(host.id, "agent", "SHA256:test")
        if host.revoked:
            with pytest.raises(PermissionDeniedError):
                await c.agents.sync(principal, {"installed": [], "fetch": []})
            continue
        # Agent sync: the keys and versions the reply lists.
        reply = await c.agents.sync(principal, {"installed": [], "fetch": []})
        synced = {d.key: sorted(v.version for v in d.versions) for d in reply.keys}
        for key in keys:
            assert synced.get(key.name, []) == expected[(key.name, host.id)], (key.name, host.id)
        # Heartbeat: holding exactly the desired versions is no drift; one missing, or one
        # extra, is drift for that key and that key only.
        held = {p for k in keys for p in _pairs(k, host)}
        beat = await c.agents.heartbeat(principal, {"installed": _installed(held)})
        assert beat.drift == ()
        assert drifted_keys(keys, host, held) == []
        for key in keys:
            if expected[(key.name, host.id)]:
                less = held - {min(_pairs(key, host))}
                beat = await c.agents.heartbeat(principal, {"installed": _installed(less)})
                assert beat.drift == (key.name,)
            else:
                extra = held | {(key.name, key.versions[0].version, key.versions[0].digest)}
                beat = await c.agents.heartbeat(principal, {"installed": _installed(extra)})
                assert beat.drift == (key.name,)

    # The fleet view and `fleet status`: acks for exactly the desired versions converge every
    # targeted host, and the targeted hosts are those host_matches names.
    await _ack_desired(c, keys, hosts, clock)
    for key in keys:
        statuses = await key_fleet_status(c.store, c.lifecycle, c.hosts, key.name)
        assert sorted(s.host for s in statuses) == sorted(
            h.id for h in hosts if host_matches(key.targets, h)
        )
        for s in statuses:
            assert s.converged, (key.name, s.host)
    admin_principal = Principal("alice", "admin", "SHA256:test")
    fleet = await c.admin.fleet_status(admin_principal, api.FleetStatusParams())
    by_key = {f.key: f for f in fleet.keys}
    for key in keys:
        targeted = [h for h in hosts if host_matches(key.targets, h)]
        row = by_key[key.name]
        wanted = sorted({v for h in targeted for v in expected[(key.name, h.id)]})
        assert list(row.wanted_versions) == wanted
        assert row.converged == row.targeted == len(targeted)
        assert row.drift == 0


def _installed(pairs: set[tuple[str, int, str]]) -> list[dict[str, object]]:
    return [{"key": k, "version": v, "digest": d} for k, v, d in sorted(pairs)]


async def _ack_desired(c: Controller, keys: list[Key], hosts: list[Host], clock: FakeClock) -> None:
    """Fleet rows as acks would leave them: every desired version installed."""
    assert c.store is not None
    clock.advance(seconds=1)
    async with c.store.write() as tx:
        for key in keys:
            for host in hosts:
                for v in desired_versions(key, host):
                    await tx.execute(
                        "INSERT INTO fleet_state(host_id, key_id, version, status, digest, "
                        "updated_at) VALUES (?, ?, ?, 'installed', ?, ?)",
                        (host.id, key.id, v.version, v.digest, format_time(clock())),
                    )


async def test_targeting_decides_once_per_targets_object_and_agrees_with_host_matches(
    controller: Controller, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckms.controller import desired

    keys = await _keys(controller, clock)
    hosts = await controller.hosts.list()
    assert len({id(k.targets) for k in keys}) < len(keys)  # loaded keys share targets
    calls: list[int] = []
    real = desired.host_matches

    def counted(targets: Targets, host: Host) -> bool:
        calls.append(1)
        return real(targets, host)

    monkeypatch.setattr(desired, "host_matches", counted)
    for host in hosts:
        calls.clear()
        picked = [k.name for k in desired.targeting(keys, host)]
        assert picked == [k.name for k in keys if real(k.targets, host)]
        assert len(calls) == len({id(k.targets) for k in keys})  # app/web, app/gone share one
