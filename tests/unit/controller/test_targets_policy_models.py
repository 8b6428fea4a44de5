"""Pure parts: target matching, the environment guard, policy defaults/limits, install specs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from ckms.controller.models import Host, InstallSpec, Policy, Targets, Usage
from ckms.controller.policy import (
    LIMITS,
    Purpose,
    check_policy,
    check_usage,
    default_policy,
    purpose_of,
)
from ckms.controller.targets import env_blocked, host_matches, match_hosts
from ckms.crypto import InstallFormat, KeyType
from ckms.errors import ConfigError, PolicyError
from ckms.protocol import HookSpec

YEAR = timedelta(days=365)

HOSTS = [
    Host(id="web-1", name="web-1", labels={"env": "prod", "role": "web"}),
    Host(id="web-2", name="web-2", labels={"env": "prod", "role": "web", "zone": "b"}),
    Host(id="db-1", name="db-1", labels={"env": "prod", "role": "db"}),
    Host(id="dev-1", name="dev-1", labels={"env": "dev", "role": "web"}),
    Host(id="bare", name="bare", labels={}),
    Host(id="old", name="old", labels={"env": "prod", "role": "web"}, revoked=True),
]


def _ids(targets: Targets) -> list[str]:
    return [h.id for h in match_hosts(targets, HOSTS)]


def test_selector_is_and_of_labels_and_selectors_are_or() -> None:
    assert _ids(Targets.parse(["env=prod,role=web"])) == ["web-1", "web-2"]
    assert _ids(Targets.parse(["role=db", "zone=b"])) == ["web-2", "db-1"]
    assert _ids(Targets.parse(["role=web"])) == ["web-1", "web-2", "dev-1"]


def test_explicit_hosts_and_revoked_hosts() -> None:
    assert _ids(Targets.parse(["host:bare", "host:db-1"])) == ["db-1", "bare"]
    assert _ids(Targets.parse(["host:old"])) == []
    assert _ids(Targets()) == []


def test_prod_key_never_reaches_another_environment() -> None:
    targets = Targets.parse(["env=prod,role=web", "host:dev-1", "host:bare"])
    assert targets.effective_env == "prod"
    assert _ids(targets) == ["web-1", "web-2"]
    assert [h.id for h in env_blocked(targets, HOSTS)] == ["dev-1", "bare"]
    explicit = Targets.parse(["host:dev-1", "host:web-1"], env="prod")
    assert _ids(explicit) == ["web-1"]
    assert not host_matches(explicit, HOSTS[3])


def test_mixed_environments_have_no_guard() -> None:
    targets = Targets.parse(["env=prod,role=db", "env=dev"])
    assert targets.effective_env is None
    assert _ids(targets) == ["db-1", "dev-1"]


@pytest.mark.parametrize(
    ("specs", "env"),
    [
        (["role"], None),
        (["env=prod,env=dev"], None),
        (["Role=web"], None),
        (["host:bad host"], None),
        (["env=dev"], "prod"),
        ([""], None),
    ],
)
def test_bad_target_specs(specs: list[str], env: str | None) -> None:
    with pytest.raises(ConfigError):
        Targets.parse(specs, env=env)


def test_targets_round_trip_and_describe() -> None:
    targets = Targets.parse(["role=web,env=prod", "host:b", "host:a", "host:a"])
    assert targets.describe() == ["env=prod,role=web", "host:a", "host:b"]
    assert Targets.model_validate_json(targets.model_dump_json()) == targets


# -- policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "usage", "purpose", "cryptoperiod", "grace"),
    [
        (KeyType.AES_256, None, Purpose.ENCRYPTION, YEAR, timedelta(days=90)),
        (KeyType.AES_256, {"wrap-key", "unwrap-key"}, Purpose.WRAPPING, YEAR, timedelta(days=90)),
        (KeyType.HMAC_SHA256, None, Purpose.MAC, YEAR, timedelta(days=30)),
        (KeyType.ED25519, None, Purpose.SIGNATURE, YEAR, timedelta(days=7)),
        (KeyType.RSA_3072, {"decrypt"}, Purpose.ENCRYPTION, YEAR, timedelta(days=90)),
        (KeyType.X25519, None, Purpose.AGREEMENT, YEAR, timedelta(days=7)),
        (KeyType.SECRET, None, Purpose.AUTHENTICATION, YEAR, timedelta(days=7)),
    ],
)
@pytest.mark.requirement("SP800-57-5.3")
def test_defaults_follow_the_table(
    key_type: KeyType,
    usage: set[str] | None,
    purpose: Purpose,
    cryptoperiod: timedelta,
    grace: timedelta,
) -> None:
    mask = check_usage(key_type, None if usage is None else frozenset(usage))  # type: ignore[arg-type]
    assert purpose_of(mask) is purpose
    policy = default_policy(key_type, mask)
    assert (policy.cryptoperiod, policy.grace) == (cryptoperiod, grace)
    assert policy.activation_delay == timedelta(0)
    assert {str(op) for op in policy.approvals_required} == {"destroy", "policy", "role", "targets"}
    check_policy(key_type, mask, policy)


@pytest.mark.requirement("SP800-57-5.3")
def test_symmetric_data_keys_never_over_two_years_signing_keys_three() -> None:
    aes = check_usage(KeyType.AES_256, None)
    ed = check_usage(KeyType.ED25519, None)
    two_years = Policy(cryptoperiod=2 * YEAR, grace=timedelta(days=1))
    three_years = Policy(cryptoperiod=3 * YEAR, grace=timedelta(days=1))
    check_policy(KeyType.AES_256, aes, two_years)
    check_policy(KeyType.ED25519, ed, three_years)
    with pytest.raises(PolicyError, match="symmetric data-encryption"):
        check_policy(KeyType.AES_256, aes, three_years)
    with pytest.raises(PolicyError, match="grace"):
        check_policy(KeyType.ED25519, ed, Policy(cryptoperiod=YEAR, grace=2 * YEAR))
    assert LIMITS[Purpose.DERIVATION].max_cryptoperiod == YEAR


@pytest.mark.requirement("SP800-57-5.2")
def test_rsa_cannot_both_sign_and_encrypt() -> None:
    with pytest.raises(ConfigError, match="one purpose"):
        check_usage(KeyType.RSA_4096, frozenset({Usage.SIGN, Usage.DECRYPT}))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cryptoperiod": timedelta(minutes=5), "grace": timedelta(0)},
        {"cryptoperiod": YEAR, "grace": timedelta(days=-1)},
        {"cryptoperiod": YEAR, "grace": timedelta(0), "activation_delay": YEAR},
        {"cryptoperiod": YEAR, "grace": timedelta(0), "max_staleness": timedelta(0)},
        {"cryptoperiod": YEAR, "grace": timedelta(0), "approvals_required": {"launch"}},
    ],
)
def test_policy_validation(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Policy(**kwargs)


def test_policy_serialises_durations_as_seconds_and_round_trips() -> None:
    policy = default_policy(KeyType.AES_256)
    dumped = policy.model_dump(mode="json")
    assert dumped["cryptoperiod"] == 365 * 86400
    assert dumped["approvals_required"] == ["destroy", "policy", "role", "targets"]
    assert Policy.model_validate(dumped) == policy
    assert Policy.model_validate_json(policy.model_dump_json()) == policy


# -- install spec ------------------------------------------------------------------------------


def test_install_spec_defaults_and_rendering() -> None:
    spec = InstallSpec(
        path="/etc/ckms/{team}/{purpose}-{version}.key",
        format=InstallFormat.RAW,
        reload="nginx",
        health={"argv": ["curl", "-fsS", "http://localhost/health"], "timeout_s": 5},
    )
    assert (spec.mode, spec.dir_mode, spec.owner) == (0o600, 0o700, None)  # the agent's user
    assert spec.reload == "nginx"  # a name: the host's own config says what it runs
    assert isinstance(spec.health, HookSpec)  # the legacy form, refused by default on hosts
    assert spec.health.argv == ("curl", "-fsS", "http://localhost/health")
    assert spec.render_path("payments/db", 3, "web-1") == "/etc/ckms/payments/db-3.key"


def test_a_hook_is_a_name_not_a_command_line() -> None:
    with pytest.raises(ValidationError, match=r"\[hooks.<name>\]"):
        InstallSpec(path="/etc/ckms/k", reload="systemctl reload nginx")


def test_group_write_needs_a_stated_reason_and_directories_never_get_it() -> None:
    with pytest.raises(ValidationError, match="group_write_reason"):
        InstallSpec(path="/etc/ckms/k", mode=0o660)
    spec = InstallSpec(path="/etc/ckms/k", mode=0o660, group_write_reason="app rewrites it")
    assert spec.mode == 0o660
    for dir_mode in (0o770, 0o730, 0o707):
        with pytest.raises(ValidationError, match="dir_mode"):
            InstallSpec(path="/etc/ckms/k", dir_mode=dir_mode, group_write_reason="no")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "relative/key"},
        {"path": "/etc/../shadow"},
        {"path": "/etc/{secret}"},
        {"path": "/etc/{version!r}"},
        {"path": "/etc/keys/"},
        {"mode": 0o644},
        {"mode": 0o200},
        {"dir_mode": 0o777},
        {"dir_mode": 0o770},
        {"mode": 0o620},
        {"owner": "root; rm -rf /"},
        {"format": "keyring-json"},
        {"reload": ""},
        {"health": {"argv": ["x"], "timeout_s": 0}},
        {"extra": 1},
    ],
)
def test_install_spec_refuses_unsafe_values(kwargs: dict) -> None:
    base = {"path": "/etc/ckms/{version}.key", "format": "raw"}
    with pytest.raises(ValidationError):
        InstallSpec(**(base | kwargs))


def test_keyring_spec_needs_one_path_for_all_versions() -> None:
    spec = InstallSpec(path="/etc/app/{purpose}.keyring.json", format="keyring-json")
    assert spec.format is InstallFormat.KEYRING_JSON
