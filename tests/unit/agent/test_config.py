"""Agent settings: env > file > defaults, validated once, errors that name the field."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ckms.errors import ConfigError
from ckms_agent.config import (
    AgentConfig,
    build_config,
    dump_toml,
    load_config,
    write_config,
)


def test_defaults_apply_when_file_and_env_say_nothing(values: dict[str, Any]) -> None:
    cfg = build_config(values, environ={})
    assert cfg.reconcile_interval_s == 300
    assert cfg.heartbeat_interval_s == 60
    assert (cfg.reconnect_backoff_min_s, cfg.reconnect_backoff_max_s) == (0.5, 30)
    assert cfg.events_topic == "ckms.events" and not hasattr(cfg, "acks_topic")
    assert cfg.default_max_staleness_s is None and cfg.root is None
    assert cfg.identity_key_path == Path(values["state_dir"]) / "identity.key"
    assert cfg.wrapping_key_path.name == "wrapping.key"
    assert cfg.state_db_path.name == "state.db"


def test_environment_beats_file_beats_defaults(values: dict[str, Any], tmp_path: Path) -> None:
    values["heartbeat_interval_s"] = 20
    values["reconcile_interval_s"] = 120
    path = tmp_path / "agent.toml"
    path.write_text(dump_toml(values))
    env = {
        "CKMS_AGENT_HEARTBEAT_INTERVAL_S": "5",
        "CKMS_AGENT_LABELS": "env=prod,role=db",
        "CKMS_AGENT_ROOT": str(tmp_path / "root"),
        "CKMS_AGENT_FAULT": "crash-before-rename",  # not a setting: ignored here
        "CKMS_AGENT_CONFIG": str(path),  # not a setting either
        "OTHER_HEARTBEAT_INTERVAL_S": "1",
    }
    cfg = load_config(None, environ=env)  # path from CKMS_AGENT_CONFIG
    assert cfg.heartbeat_interval_s == 5  # env
    assert cfg.reconcile_interval_s == 120  # file
    assert cfg.reconnect_backoff_max_s == 30  # default
    assert cfg.labels == {"env": "prod", "role": "db"}
    assert cfg.root == tmp_path / "root"


def test_written_config_reads_back_identically_with_mode_0600(
    values: dict[str, Any], tmp_path: Path
) -> None:
    values["root"] = str(tmp_path / "root")
    values["default_max_staleness_s"] = 3600
    values["labels"] = {"env": "test", "zone": "eu-1"}
    cfg = build_config(values, environ={})
    path = tmp_path / "etc" / "agent.toml"
    write_config(path, cfg)
    assert path.stat().st_mode & 0o777 == 0o600
    assert tomllib.loads(path.read_text())["host_id"] == "web-1"
    assert load_config(path, environ={}) == cfg


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("host_key_fingerprint", "MD5:aa", "host_key_fingerprint"),
        ("controller_port", 70000, "controller_port"),
        ("controller_signing_key", "not base64!", "controller_signing_key"),
        ("controller_key_id", "ed25519:someone-else", "controller_key_id does not name"),
        ("host_id", "bad host", "host_id"),
        ("labels", {"Env": "x"}, "labels"),
        ("state_dir", "relative/dir", "state_dir"),
        ("log_level", "CHATTY", "log_level"),
        ("heartbeat_interval_s", 0, "heartbeat_interval_s"),
    ],
)
def test_bad_values_name_the_field(
    values: dict[str, Any], field: str, value: object, message: str
) -> None:
    values[field] = value
    with pytest.raises(ConfigError, match=message):
        build_config(values, environ={})


def test_bad_environment_value_names_the_variable(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="CKMS_AGENT_RECONCILE_INTERVAL_S"):
        build_config(values, environ={"CKMS_AGENT_RECONCILE_INTERVAL_S": "soon"})
    with pytest.raises(ConfigError, match="CKMS_AGENT_LABELS"):
        build_config(values, environ={"CKMS_AGENT_LABELS": "env"})


def test_unknown_file_keys_missing_fields_and_files_are_errors(
    values: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*kafka_bootstrp"):
        build_config({**values, "kafka_bootstrp": "x"}, environ={})
    del values["kafka_bootstrap"]
    with pytest.raises(ConfigError, match="kafka_bootstrap"):
        build_config(values, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("host_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})


def test_backoff_bounds_must_be_ordered(values: dict[str, Any]) -> None:
    values.update(reconnect_backoff_min_s=10, reconnect_backoff_max_s=1)
    with pytest.raises(ConfigError, match="reconnect_backoff_max_s"):
        build_config(values, environ={})


def test_config_is_immutable(values: dict[str, Any]) -> None:
    cfg = build_config(values, environ={})
    with pytest.raises(ValueError, match="frozen"):
        cfg.host_id = "other"  # type: ignore[misc]
    assert isinstance(cfg, AgentConfig)


def test_the_host_policy_round_trips_and_defaults_allow_only_the_key_roots(
    values: dict[str, Any], tmp_path: Path
) -> None:
    assert build_config(values, environ={}).allowed_paths == (
        Path("/etc/ckms/keys"),
        Path("/var/lib/ckms/keys"),
    )
    values |= {
        "allowed_paths": ["/etc/ssl/ckms"],
        "allowed_owners": ["postgres"],
        "hooks": {"postgresql": {"reload": ["systemctl", "reload", "postgresql"], "user": "root"}},
    }
    cfg = build_config(values, environ={})
    path = tmp_path / "agent.toml"
    write_config(path, cfg)
    again = load_config(path, environ={})
    assert again == cfg and again.hooks["postgresql"].timeout_s == 30
    assert again.allow_controller_commands is False
    env = {"CKMS_AGENT_ALLOWED_PATHS": "/a,/b", "CKMS_AGENT_HOOKS": '{"x": {"health": ["true"]}}'}
    over = load_config(path, environ=env)
    assert over.allowed_paths == (Path("/a"), Path("/b")) and set(over.hooks) == {"x"}


@pytest.mark.parametrize(
    "policy",
    [
        {"allowed_paths": ["relative"]},
        {"allowed_paths": ["/"]},
        {"allowed_paths": ["/etc/../root"]},
        {"allowed_owners": ["root; x"]},
        {"hooks": {"Bad Name": {"reload": ["true"]}}},
        {"hooks": {"empty": {}}},
        {"hooks": {"x": {"reload": []}}},
        {"hooks": {"x": {"reload": ["true"], "timeout_s": 601}}},
    ],
)
def test_a_bad_host_policy_is_refused(values: dict[str, Any], policy: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_config(values | policy, environ={})


def test_a_config_another_user_could_write_is_refused(
    values: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, build_config(values, environ={}))
    if os.geteuid() != 0:
        pytest.skip("the owner check applies to an agent running as root")
    path.chmod(0o620)
    with pytest.raises(ConfigError, match="writable by root only"):
        load_config(path, environ={})
    path.chmod(0o600)
    os.chown(path, 65534, 0)
    with pytest.raises(ConfigError, match="owned by root"):
        load_config(path, environ={})


def test_an_allowed_root_holding_the_state_dir_or_the_config_is_refused(
    values: dict[str, Any], tmp_path: Path
) -> None:
    """Keys written there would replace the agent's identity, state or policy."""
    with pytest.raises(ConfigError, match="state directory"):
        build_config(values | {"allowed_paths": [str(tmp_path)]}, environ={})
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    write_config(path, build_config(values, environ={}))
    with pytest.raises(ConfigError, match="this config file"):
        load_config(path, environ={"CKMS_AGENT_ALLOWED_PATHS": str(path.parent)})
    assert load_config(path, environ={"CKMS_AGENT_ALLOWED_PATHS": "/etc/ckms/keys"})


def test_kafka_is_mutual_tls_by_default_with_files_in_the_state_dir(
    values: dict[str, Any],
) -> None:
    cfg = build_config(values, environ={})
    security = cfg.kafka_security
    assert str(security.protocol) == "SSL"
    state = Path(values["state_dir"])
    assert (security.ca_file, security.cert_file, security.key_file) == (
        state / "ca-bundle.pem",  # the ckms trust bundle enrollment writes
        state / "kafka" / "client.pem",
        state / "kafka" / "client.key",
    )
    env = {"CKMS_AGENT_KAFKA_CA_FILE": "/etc/ckms/kafka-ca.pem"}
    overridden = build_config(values, environ=env).kafka_security
    assert overridden.ca_file == Path("/etc/ckms/kafka-ca.pem")


def test_an_incomplete_kafka_setting_is_refused_naming_what_is_missing(
    values: dict[str, Any],
) -> None:
    values["kafka_security_protocol"] = "SASL_SSL"
    with pytest.raises(ConfigError, match="credentials file"):
        build_config(values, environ={})
    values["kafka_security_protocol"] = "TLS"
    with pytest.raises(ConfigError, match="kafka_security_protocol"):
        build_config(values, environ={})


def test_several_controllers_as_a_list_a_string_or_the_environment(
    values: dict[str, Any],
) -> None:
    one = {k: v for k, v in values.items() if k not in ("controller_host", "controller_port")}
    listed = build_config({**one, "controller": ["ctl-1:2222", "ctl-2:2223"]}, environ={})
    assert [str(e) for e in listed.controllers] == ["ctl-1:2222", "ctl-2:2223"]
    assert listed.controller_address == "ctl-1:2222,ctl-2:2223"
    single = build_config({**one, "controller": "ctl-1:2222"}, environ={})
    assert [str(e) for e in single.controllers] == ["ctl-1:2222"]
    env = build_config(one, environ={"CKMS_AGENT_CONTROLLER": "a:1,b:2"})
    assert [str(e) for e in env.controllers] == ["a:1", "b:2"]
    classic = build_config(values, environ={})  # controller_host/controller_port stay valid
    assert len(classic.controllers) == 1 and classic.controller == ()
    with pytest.raises(ConfigError, match="name the controller once"):
        build_config({**values, "controller": ["ctl-1:2222"]}, environ={})
    with pytest.raises(ConfigError, match="name the controller once"):
        build_config(one, environ={})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        build_config({**one, "controller": ["ctl-1"]}, environ={})
