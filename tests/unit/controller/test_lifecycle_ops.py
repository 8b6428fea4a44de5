"""Lifecycle operations: create, rotate, primary, revoke, destroy, policy, targets, atomicity."""

from __future__ import annotations

import asyncio
import base64
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from ckms.controller import rowmac
from ckms.controller.lifecycle import Lifecycle
from ckms.controller.models import (
    InstallSpec,
    KeyState,
    Policy,
    RevocationReason,
    Targets,
    Usage,
)
from ckms.controller.policy import default_policy
from ckms.controller.sealing import Vault
from ckms.crypto import InstallFormat, KeyType
from ckms.errors import (
    AlreadyExistsError,
    AuditError,
    ConfigError,
    InvalidTransitionError,
    NotFoundError,
    PolicyError,
)
from ckms.store import Store, format_time, outbox
from ckms.store import audit as audit_log
from tests.support.stores import refuse_audit_inserts, refuse_inserts

if TYPE_CHECKING:
    from conftest import FakeClock

NAME = "payments/db"
DELAYED = default_policy(KeyType.AES_256).model_copy(update={"activation_delay": timedelta(days=2)})


async def _events(store: Store) -> list[outbox.OutboxEvent]:
    return await outbox.all_events(store)


# -- create ------------------------------------------------------------------------------------


@pytest.mark.requirement("KMIP-2.1-OPERATIONS")
async def test_create_makes_active_primary_version_with_event_and_audit(
    lifecycle: Lifecycle, store: Store, vault: Vault, clock: FakeClock
) -> None:
    key = await lifecycle.create(NAME, "aes-256", actor="alice")
    assert key.type is KeyType.AES_256
    assert key.usage == {Usage.ENCRYPT, Usage.DECRYPT}
    assert key.primary_version == 1
    v1 = key.version(1)
    assert v1.state is KeyState.ACTIVE
    assert v1.activated_at == clock.now
    assert v1.digest.startswith("hmac-sha256:")
    assert key.policy == default_policy(KeyType.AES_256)
    assert key.install.mode == 0o600 and key.install.dir_mode == 0o700

    [event] = await _events(store)
    assert event.type == "key.created"
    assert event.partition_key == NAME
    assert event.data["digest"] == v1.digest
    assert event.data["state"] == "Active"
    assert event.data["primary"] == 1
    assert event.data["install"]["format"] == "raw"

    record = (await audit_log.load_records(store))[-1]
    assert (record.action, record.actor, record.outcome) == ("key.create", "alice", "ok")
    assert record.object == f"key:{NAME}"
    assert record.details["event_id"] == event.event_id
    assert record.details["digest_hmac"] == vault.identifier(v1.digest)
    assert v1.digest not in record.model_dump_json()


async def test_create_with_activation_delay_is_preactive_without_primary(
    lifecycle: Lifecycle, clock: FakeClock
) -> None:
    key = await lifecycle.create(NAME, KeyType.AES_256, actor="alice", policy=DELAYED)
    v1 = key.version(1)
    assert v1.state is KeyState.PRE_ACTIVE
    assert v1.activation_at == clock.now + timedelta(days=2)
    assert key.primary_version is None


async def test_duplicate_name_is_refused_and_audited(lifecycle: Lifecycle, store: Store) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    with pytest.raises(AlreadyExistsError):
        await lifecycle.create(NAME, KeyType.HMAC_SHA256, actor="bob")
    record = (await audit_log.load_records(store))[-1]
    assert (record.action, record.actor, record.outcome) == ("key.create", "bob", "refused")
    assert len(await _events(store)) == 1


@pytest.mark.parametrize(
    "name",
    ["payments", "Payments/db", "a/b/c", "/db", "team/", "team/-x", "te am/db", "t/" + "x" * 70],
)
async def test_invalid_names_are_refused(lifecycle: Lifecycle, name: str) -> None:
    with pytest.raises(ConfigError, match="team/purpose"):
        await lifecycle.create(name, KeyType.AES_256, actor="alice")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key_type": "des"}, ConfigError, "unsupported key type"),
        ({"usage": ["sign"]}, ConfigError, "not available"),
        ({"usage": ["encrypt", "wrap-key"]}, ConfigError, "one purpose"),
        ({"usage": []}, ConfigError, "empty"),
        ({"usage": ["fly"]}, ConfigError, "unknown usage"),
        (
            {"install": InstallSpec(path="/etc/k/{version}.pem", format=InstallFormat.PEM)},
            ConfigError,
            "not available for key type",
        ),
        (
            {"policy": Policy(cryptoperiod=timedelta(days=3 * 365), grace=timedelta(days=1))},
            PolicyError,
            "SP 800-57",
        ),
        ({"secret_length": 20}, ConfigError, "only to type 'secret'"),
    ],
)
async def test_create_validates_arguments(
    lifecycle: Lifecycle, store: Store, kwargs: dict, error: type, match: str
) -> None:
    kwargs = dict(kwargs)  # the parameter is shared by every backend's run
    key_type = kwargs.pop("key_type", KeyType.AES_256)
    with pytest.raises(error, match=match):
        await lifecycle.create(NAME, key_type, actor="alice", **kwargs)
    assert await _events(store) == []


async def test_secret_keeps_its_length_across_rotation(lifecycle: Lifecycle, vault: Vault) -> None:
    await lifecycle.create(
        "app/api-token", KeyType.SECRET, actor="alice", secret_length=50, secret_alphabet="abcdef"
    )
    await lifecycle.rotate("app/api-token", actor="alice")
    for version in (1, 2):
        material = await vault.material("app/api-token", version)
        assert len(material) == 50
        assert set(material.decode()) <= set("abcdef")


async def test_a_weak_secret_spec_is_refused_before_anything_is_stored(
    lifecycle: Lifecycle, store: Store
) -> None:
    with pytest.raises(ConfigError, match=r"8\.0 bits of entropy.*at least 128"):
        await lifecycle.create(
            "app/pin", KeyType.SECRET, actor="alice", secret_length=8, secret_alphabet="01"
        )
    assert await _events(store) == []


async def test_the_event_digest_of_a_weak_secret_does_not_recover_it(
    lifecycle: Lifecycle, store: Store, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret made before the entropy floor (8 bits here): reading ``key.created`` off the
    topic and trying all 256 candidates recovered it from the plain digest; not any more."""
    import hashlib
    import itertools

    monkeypatch.setattr("ckms.crypto._keytypes.MIN_SECRET_BITS", 0, raising=False)
    await lifecycle.create(
        "app/pin", KeyType.SECRET, actor="alice", secret_length=8, secret_alphabet="01"
    )
    (event,) = await _events(store)
    digest = event.data["digest"]
    candidates = ["".join(bits).encode() for bits in itertools.product("01", repeat=8)]
    recovered = [c for c in candidates if "sha256:" + hashlib.sha256(c).hexdigest() == digest]
    assert recovered == []
    assert digest == vault.digest(await vault.material("app/pin", 1))


# -- rotate and primary ------------------------------------------------------------------------


@pytest.mark.requirement("KMIP-2.1-OPERATIONS")
async def test_rotate_moves_primary_and_marks_old_superseded(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    clock.advance(days=10)
    v2 = await lifecycle.rotate(NAME, actor="sched", reason="cryptoperiod")
    assert v2.version == 2 and v2.state is KeyState.ACTIVE
    key = await lifecycle.get(NAME)
    assert key.primary_version == 2
    assert key.version(1).state is KeyState.ACTIVE  # stays for processing during grace
    assert key.version(1).superseded_at == clock.now
    event = (await _events(store))[-1]
    assert event.type == "key.rotated"
    assert (event.data["version"], event.data["primary"], event.data["previous_primary"]) == (
        2,
        2,
        1,
    )


async def test_rotate_with_delay_keeps_primary_until_activation(
    lifecycle: Lifecycle, store: Store, clock: FakeClock
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    await lifecycle.set_policy(NAME, DELAYED, actor="alice")
    v2 = await lifecycle.rotate(NAME, actor="alice")
    assert v2.state is KeyState.PRE_ACTIVE
    assert v2.activation_at == clock.now + timedelta(days=2)
    key = await lifecycle.get(NAME)
    assert key.primary_version == 1
    assert key.version(1).superseded_at is None
    clock.advance(days=2)
    await lifecycle.activate(NAME, 2, actor="sched")
    key = await lifecycle.get(NAME)
    assert key.primary_version == 2
    assert key.version(1).superseded_at == clock.now
    event = (await _events(store))[-1]
    assert (event.type, event.data["to"], event.data["primary"]) == (
        "key.state_changed",
        "Active",
        2,
    )


@pytest.mark.requirement("KMIP-2.1-OPERATIONS")
async def test_suspending_the_primary_leaves_no_primary_until_resumed(
    lifecycle: Lifecycle,
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    await lifecycle.rotate(NAME, actor="alice")
    await lifecycle.suspend(NAME, 2, actor="alice", reason="investigating")
    assert (await lifecycle.get(NAME)).primary_version is None  # never falls back to v1
    await lifecycle.resume(NAME, 2, actor="alice")
    assert (await lifecycle.get(NAME)).primary_version == 2


async def test_resumed_older_version_does_not_take_primary_back(lifecycle: Lifecycle) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    await lifecycle.suspend(NAME, 1, actor="alice")
    await lifecycle.rotate(NAME, actor="alice")
    await lifecycle.resume(NAME, 1, actor="alice")
    key = await lifecycle.get(NAME)
    assert key.primary_version == 2
    assert key.version(1).superseded_at is not None


async def test_unknown_key_and_version_are_not_found(lifecycle: Lifecycle) -> None:
    with pytest.raises(NotFoundError):
        await lifecycle.rotate("no/such", actor="alice")
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    with pytest.raises(NotFoundError, match="no version 7"):
        await lifecycle.suspend(NAME, 7, actor="alice")


# -- revoke and destroy ------------------------------------------------------------------------


@pytest.mark.requirement("PCI-3.7.5")
async def test_whole_key_compromise_revokes_every_version(
    lifecycle: Lifecycle, store: Store
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice", policy=DELAYED)
    await lifecycle.destroy(NAME, 1, actor="alice")  # PreActive -> Destroyed
    await lifecycle.rotate(NAME, actor="alice")  # v2 PreActive
    await lifecycle.activate(NAME, 2, actor="alice")
    await lifecycle.rotate(NAME, actor="alice")  # v3 PreActive
    before = len(await _events(store))
    versions = await lifecycle.revoke(
        NAME, RevocationReason.KEY_COMPROMISE, actor="alice", message="leaked in a log"
    )
    assert [(v.version, v.state) for v in versions] == [
        (1, KeyState.DESTROYED_COMPROMISED),
        (2, KeyState.COMPROMISED),
        (3, KeyState.COMPROMISED),
    ]
    events = (await _events(store))[before:]
    assert [e.type for e in events] == ["key.revoked"] * 3
    assert all(e.data["compromise"] and e.data["reason"] == "keyCompromise" for e in events)
    assert (await lifecycle.get(NAME)).primary_version is None


async def test_whole_key_deactivation_refuses_a_preactive_version(
    lifecycle: Lifecycle, store: Store
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    await lifecycle.set_policy(NAME, DELAYED, actor="alice")
    await lifecycle.rotate(NAME, actor="alice")  # v2 PreActive
    before = len(await _events(store))
    with pytest.raises(InvalidTransitionError, match="version 2: it is PreActive"):
        await lifecycle.revoke(NAME, RevocationReason.CESSATION_OF_OPERATION, actor="alice")
    assert (await lifecycle.get(NAME)).version(1).state is KeyState.ACTIVE  # nothing half-done
    assert len(await _events(store)) == before


async def test_whole_key_revoke_with_nothing_left_is_refused(lifecycle: Lifecycle) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    await lifecycle.revoke(NAME, RevocationReason.SUPERSEDED, actor="alice")
    with pytest.raises(InvalidTransitionError, match="no version can be revoked"):
        await lifecycle.revoke(NAME, RevocationReason.SUPERSEDED, actor="alice")


@pytest.mark.requirement("KMIP-2.1-REVOCATION-REASONS")
async def test_unknown_revocation_reason_is_refused(lifecycle: Lifecycle) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    with pytest.raises(ConfigError, match="revocation reason"):
        await lifecycle.revoke(NAME, "bored", actor="alice")


@pytest.mark.requirement("SP800-130-DESTROY")
async def test_destroy_wipes_material_and_keeps_metadata(
    lifecycle: Lifecycle, store: Store, vault: Vault, clock: FakeClock
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    await lifecycle.revoke(NAME, RevocationReason.CESSATION_OF_OPERATION, actor="alice", version=1)
    digest = (await lifecycle.get(NAME)).version(1).digest
    clock.advance(hours=1)
    v1 = await lifecycle.destroy(NAME, 1, actor="bob", reason="retired")
    assert v1.state is KeyState.DESTROYED
    assert v1.digest == digest
    assert v1.destroyed_at == clock.now
    assert not v1.has_material
    assert (
        await store.fetchone("SELECT 1 FROM key_versions WHERE sealed_material IS NOT NULL") is None
    )
    with pytest.raises(NotFoundError, match="destroyed"):
        await vault.material(NAME, 1)
    event = (await _events(store))[-1]
    assert (event.type, event.data["digest"], event.data["to"]) == (
        "key.destroyed",
        digest,
        "Destroyed",
    )


# -- policy and targets ------------------------------------------------------------------------


@pytest.mark.requirement("PCI-3.7.4")
async def test_set_policy_emits_event_and_checks_limits(lifecycle: Lifecycle, store: Store) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    longer = default_policy(KeyType.AES_256).model_copy(
        update={"cryptoperiod": timedelta(days=700)}
    )
    key = await lifecycle.set_policy(NAME, longer, actor="alice")
    assert key.policy.cryptoperiod == timedelta(days=700)
    event = (await _events(store))[-1]
    assert event.type == "key.policy_changed"
    assert event.data["policy"]["cryptoperiod"] == 700 * 86400
    too_long = longer.model_copy(update={"cryptoperiod": timedelta(days=800)})
    with pytest.raises(PolicyError, match="exceeds the maximum of 730 days"):
        await lifecycle.set_policy(NAME, too_long, actor="alice")
    assert (await lifecycle.get(NAME)).policy.cryptoperiod == timedelta(days=700)


async def _enroll(store: Store, host_id: str, labels: str) -> None:
    async with store.write() as tx:
        await tx.execute(
            "INSERT INTO hosts(id, name, labels, identity_public_key, wrapping_public_key, "
            "enrolled_at) VALUES (?, ?, ?, ?, ?, ?)",
            (host_id, host_id, labels, b"\x00", b"\x00", "2025-01-01T00:00:00.000000Z"),
        )
        await rowmac.stamp_host(tx, host_id)


async def test_set_targets_and_env_guard(lifecycle: Lifecycle, store: Store) -> None:
    await _enroll(store, "web-1", '{"env":"prod","role":"web"}')
    await _enroll(store, "web-2", '{"env":"prod","role":"web"}')
    await _enroll(store, "dev-1", '{"env":"dev","role":"web"}')
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    targets = Targets.parse(["env=prod,role=web"])
    key = await lifecycle.set_targets(NAME, targets, actor="alice")
    assert key.targets == targets
    assert [h.id for h in await lifecycle.hosts_for(NAME)] == ["web-1", "web-2"]
    event = (await _events(store))[-1]
    assert event.type == "key.targets_changed"
    assert event.data["targets"]["selectors"] == [{"env": "prod", "role": "web"}]

    with pytest.raises(PolicyError, match="dev-1"):
        await lifecycle.set_targets(
            NAME, Targets.parse(["env=prod,role=web", "host:dev-1"]), actor="alice"
        )
    assert (await lifecycle.get(NAME)).targets == targets


async def test_set_targets_can_change_install_spec(lifecycle: Lifecycle) -> None:
    await lifecycle.create("tls/web", KeyType.ED25519, actor="alice")
    spec = InstallSpec(
        path="/etc/ssl/private/{purpose}.pem", format="pem", group="ssl-cert", mode=0o640
    )
    key = await lifecycle.set_targets("tls/web", Targets(), actor="alice", install=spec)
    assert key.install == spec
    with pytest.raises(ConfigError, match="not available"):
        await lifecycle.set_targets(
            "tls/web", Targets(), actor="alice", install=spec.model_copy(update={"format": "bogus"})
        )


# -- one transaction, fail closed --------------------------------------------------------------


async def _break_audit(store: Store) -> None:
    await refuse_audit_inserts(store)


async def _counts(store: Store) -> tuple[int, ...]:
    out = []
    for table in ("keys", "key_versions", "version_transitions", "outbox", "audit"):
        row = await store.fetchone(f"SELECT COUNT(*) FROM {table}")  # noqa: S608
        assert row is not None
        out.append(int(row[0]))
    return tuple(out)


async def test_failed_audit_write_undoes_create(lifecycle: Lifecycle, store: Store) -> None:
    before = await _counts(store)
    await _break_audit(store)
    with pytest.raises(AuditError):
        await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    assert await _counts(store) == before
    assert await store.fetchone("SELECT 1 FROM keys WHERE name = ?", (NAME,)) is None


async def test_failed_audit_write_undoes_rotate_and_revoke(
    lifecycle: Lifecycle, store: Store
) -> None:
    await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    before = await _counts(store)
    await _break_audit(store)
    with pytest.raises(AuditError):
        await lifecycle.rotate(NAME, actor="alice")
    with pytest.raises(AuditError):
        await lifecycle.revoke(NAME, RevocationReason.KEY_COMPROMISE, actor="alice")
    with pytest.raises(AuditError):
        await lifecycle.set_policy(NAME, DELAYED, actor="alice")
    assert await _counts(store) == before
    key = await lifecycle.get(NAME)
    assert [(v.version, v.state) for v in key.versions] == [(1, KeyState.ACTIVE)]
    assert key.policy == default_policy(KeyType.AES_256)


async def test_outbox_failure_also_undoes_the_change(lifecycle: Lifecycle, store: Store) -> None:
    await refuse_inserts(store, "outbox", "outbox broken")
    with pytest.raises(Exception, match="outbox broken"):
        await lifecycle.create(NAME, KeyType.AES_256, actor="alice")
    assert await store.fetchone("SELECT 1 FROM keys") is None
    assert await store.fetchone("SELECT 1 FROM audit WHERE action = 'key.create'") is None


# -- no material outside the sealed column -----------------------------------------------------


@pytest.mark.requirement("PCI-3.6.1.2", "ISO27002-8.24")
async def test_events_and_audit_never_carry_material(
    lifecycle: Lifecycle, store: Store, vault: Vault
) -> None:
    await lifecycle.create("app/sign", KeyType.ED25519, actor="alice")
    await lifecycle.rotate("app/sign", actor="alice")
    materials = [await vault.material("app/sign", v) for v in (1, 2)]
    blobs = [e.payload for e in await _events(store)]
    blobs += [r.model_dump_json().encode() for r in await audit_log.load_records(store)]
    for material in materials:
        for form in (material, material.hex().encode(), base64.b64encode(material)):
            assert not any(form in blob for blob in blobs)
    assert format_time(lifecycle._clock()).encode() in blobs[0]


# -- reads and concurrency ---------------------------------------------------------------------


async def test_list_history_and_concurrent_rotations(lifecycle: Lifecycle) -> None:
    await lifecycle.create("b/key", KeyType.HMAC_SHA256, actor="alice")
    await lifecycle.create("a/key", KeyType.AES_256, actor="alice")
    assert [k.name for k in await lifecycle.list_keys()] == ["a/key", "b/key"]
    # Rotations race for the one writer; each still gets its own version number.
    results = await asyncio.gather(*(lifecycle.rotate("a/key", actor="bot") for _ in range(5)))
    assert sorted(v.version for v in results) == [2, 3, 4, 5, 6]
    key = await lifecycle.get("a/key")
    assert key.primary_version == 6
    assert all(v.superseded_at is not None for v in key.versions if v.version < 6)
    history = await lifecycle.history("a/key")
    assert [(h["version"], h["operation"], h["to_state"]) for h in history][:2] == [
        (1, "create", "Active"),
        (2, "rotate", "Active"),
    ]
    assert len(history) == 6


async def test_a_prod_key_can_never_be_retargeted_to_another_environment(
    lifecycle: Lifecycle, store: Store
) -> None:
    await _enroll(store, "web-1", '{"env":"prod","role":"web"}')
    await _enroll(store, "dev-1", '{"env":"dev","role":"web"}')
    await lifecycle.create(
        NAME, KeyType.AES_256, targets=Targets.parse(["env=prod,role=web"]), actor="alice"
    )
    for other in (["env=dev,role=web"], ["env=dev"], ["env=prod", "env=dev"]):
        with pytest.raises(PolicyError, match="belongs to env=prod"):
            await lifecycle.set_targets(NAME, Targets.parse(other), actor="alice")
    with pytest.raises(PolicyError, match="belongs to env=prod"):
        await lifecycle.set_targets(NAME, Targets.parse(["role=web"], env="dev"), actor="alice")
    # Targets naming no environment keep the key's: role=web means prod hosts with that role.
    key = await lifecycle.set_targets(NAME, Targets.parse(["role=web"]), actor="alice")
    assert key.targets.effective_env == "prod"
    assert [h.id for h in await lifecycle.hosts_for(NAME)] == ["web-1"]
