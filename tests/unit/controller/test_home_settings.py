"""``controller.toml`` and ``CKMS_<FIELD>`` overrides: env > file > defaults, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckms.controller.home import load_settings, write_settings
from ckms.controller.service import ControllerSettings
from ckms.errors import AlreadyExistsError, ConfigError


def test_written_settings_load_back_and_the_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    written = ControllerSettings(home=tmp_path, listen_port=2299, kafka_bootstrap="k:9092")
    write_settings(path, written)
    assert path.stat().st_mode & 0o077 == 0
    assert load_settings(path, {}) == written
    with pytest.raises(AlreadyExistsError):
        write_settings(path, written)

    env = {"CKMS_LISTEN_PORT": "2300", "CKMS_EVENTS_TOPIC": "t.events", "CKMS_USER": "alice"}
    loaded = load_settings(path, env)
    assert (loaded.listen_port, loaded.events_topic, loaded.kafka_bootstrap) == (
        2300,
        "t.events",
        "k:9092",
    )


def test_a_relative_or_missing_home_is_the_files_directory(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "controller.toml"
    path.parent.mkdir()
    path.write_text('home = "data"\n')
    assert load_settings(path, {}).home == (tmp_path / "etc" / "data").resolve()
    path.write_text("listen_port = 1\n")
    assert load_settings(path, {}).home == tmp_path / "etc"


def test_bad_settings_name_the_field_and_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text("listen_port = 70000\n")
    with pytest.raises(ConfigError, match=r"listen_port \(from .*controller.toml\)"):
        load_settings(path, {})
    path.write_text("")
    with pytest.raises(ConfigError, match=r"fleet_partitions \(from CKMS_FLEET_PARTITIONS\)"):
        load_settings(path, {"CKMS_FLEET_PARTITIONS": "many"})
    path.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        load_settings(path, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})


@pytest.mark.parametrize(
    ("file_text", "environ"),
    [
        ('store = "postgresql://ckms:hunter2-secret@db.internal:5432/ckms"\n', {}),
        ("", {"CKMS_STORE": "postgresql://ckms:hunter2-secret@db.internal/ckms"}),
        ("", {"CKMS_STORE": "postgresql://ckms@db.internal/ckms?password=hunter2-secret"}),
    ],
)
def test_a_store_url_holding_a_password_is_refused_without_echoing_it(
    tmp_path: Path, file_text: str, environ: dict[str, str]
) -> None:
    # A password in the URL ends up in shell history, process lists, logs and `ckms status`.
    path = tmp_path / "controller.toml"
    path.write_text(file_text)
    with pytest.raises(ConfigError, match=r"setting store .*holds a password") as caught:
        load_settings(path, environ)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "engine", "target"),
    [
        ("postgresql://ckms@db.internal:5432/ckms", "postgresql", None),
        ("sqlite:///srv/ckms/other.db", "sqlite", "/srv/ckms/other.db"),
        ("sqlite:data/c.db", "sqlite", "HOME/data/c.db"),
        ("shared.db", "sqlite", "HOME/shared.db"),
    ],
)
def test_the_store_setting_names_the_engine_and_location(
    tmp_path: Path, value: str, engine: str, target: str | None
) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(f'store = "{value}"\n')
    url = load_settings(path, {}).store_url
    assert url.engine == engine
    assert url.target == (value if target is None else target.replace("HOME", str(tmp_path)))


def test_the_store_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "pg.password"
    secret.write_text("hunter2-secret\n")
    settings = ControllerSettings(
        home=tmp_path, store="postgresql://ckms@db/ckms", store_password_file=secret
    )
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by others") as caught:
        settings.store_password()
    assert "hunter2" not in str(caught.value)
    secret.chmod(0o600)
    assert settings.store_password() == "hunter2-secret"
    assert "hunter2" not in repr(settings)
    with pytest.raises(ConfigError, match="not a file"):
        settings.db_path  # noqa: B018  (a PostgreSQL store has no file to back up)


def test_kafka_is_mutual_tls_by_default_with_files_in_the_home(tmp_path: Path) -> None:
    settings = ControllerSettings(home=tmp_path)
    security = settings.kafka_security
    assert str(security.protocol) == "SSL"
    assert security.ca_file == tmp_path / "kafka" / "ca.pem"
    assert security.cert_file == tmp_path / "kafka" / "client.pem"
    assert security.key_file == tmp_path / "kafka" / "client.key"
    relative = ControllerSettings(home=tmp_path, kafka_ca_file=Path("tls/ca.pem"))
    assert relative.kafka_security.ca_file == tmp_path / "tls" / "ca.pem"
    # SASL_SSL: SCRAM credentials from a file; a client certificate only if one is named.
    sasl = ControllerSettings(
        home=tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_file=tmp_path / "s.toml"
    )
    assert sasl.kafka_security.cert_file is None
    with pytest.raises(ValueError, match="credentials file"):
        ControllerSettings(home=tmp_path, kafka_security_protocol="SASL_SSL")
