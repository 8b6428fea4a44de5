"""The controller's home directory: ``controller.toml``, the store, the SSH host key.

:func:`init_home` is what ``ckms init`` does: write the settings file, initialise the store
(root KEK split into SLIP-39 shares or wrapped under a passphrase, see
:func:`~ckms.controller.sealing.init_controller`), create the first admin operator and the SSH
host key. :func:`load_settings` is what ``ckms controller run`` does: read the TOML file, apply
``CKMS_<FIELD>`` environment overrides (``CKMS_LISTEN_PORT=2223``), validate once into a
:class:`~ckms.controller.service.ControllerSettings`. Precedence: environment > file >
defaults. A relative ``home`` in the file is relative to the file's directory; a file without
``home`` means the file's directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ckms.controller.operators import (
    Operator,
    OperatorRegistry,
    parse_ssh_public_key,
    validate_operator_name,
)
from ckms.controller.sealing import InitResult, init_controller
from ckms.controller.service import ControllerSettings
from ckms.crypto import age_encrypt_to_ssh
from ckms.errors import AlreadyExistsError, ConfigError
from ckms.ssh import fingerprint, load_or_create_host_key
from ckms.store import parse_store_url

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "HomeInit",
    "init_home",
    "load_settings",
    "write_settings",
]

CONFIG_FILE = "controller.toml"
ENV_PREFIX = "CKMS_"

_WRITTEN_FIELDS = ("home", "listen_host", "listen_port", "kafka_bootstrap")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(str(value), ensure_ascii=True)


def write_settings(path: Path, settings: ControllerSettings) -> None:
    """Write the settings file (mode 0600; refuses to overwrite)."""
    lines = [
        "# ckms controller settings, written by `ckms init`.",
        "# CKMS_<FIELD> environment variables override any of these (e.g. CKMS_LISTEN_PORT).",
    ]
    dumped = settings.model_dump()
    for name in ControllerSettings.model_fields:
        if name in _WRITTEN_FIELDS or dumped[name] != ControllerSettings.model_fields[name].default:
            lines.append(f"{name} = {_toml_value(dumped[name])}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExistsError(f"{path} already exists; this home is initialised") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> ControllerSettings:
    """Read ``path``, apply ``CKMS_<FIELD>`` overrides from ``environ``, validate once."""
    env = os.environ if environ is None else environ
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"controller config {path} does not exist (run ckms init)") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read controller config {path}: {exc}") from None
    sources = dict.fromkeys(data, str(path))
    for name in ControllerSettings.model_fields:
        variable = ENV_PREFIX + name.upper()
        if variable in env:
            data[name] = env[variable]
            sources[name] = variable
    home = Path(str(data.get("home", path.parent)))
    data["home"] = home if home.is_absolute() else (path.parent / home).resolve()
    if data.get("store") is not None:
        origin = sources.get("store", str(path))
        data["store"] = _store_location(str(data["store"]), path.parent, origin)
    if data.get("store_password_file") is not None:
        secret = Path(str(data["store_password_file"]))
        data["store_password_file"] = secret if secret.is_absolute() else path.parent / secret
    try:
        settings = ControllerSettings.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        name = ".".join(str(p) for p in error["loc"])
        origin = sources.get(name.split(".")[0], "defaults")
        raise ConfigError(f"controller setting {name} (from {origin}): {error['msg']}") from None
    return settings


def _store_location(value: str, base: Path, origin: str) -> str:
    """The ``store`` setting with a relative SQLite path made absolute (against ``base``, the
    settings file's directory); a PostgreSQL URL as given. A URL that is refused (one holding
    a password, say) is never echoed."""
    try:
        url = parse_store_url(value)
    except ConfigError as exc:
        raise ConfigError(f"controller setting store (from {origin}): {exc}") from None
    if url.engine != "sqlite":
        return url.target
    file = Path(url.target)
    return str(file if file.is_absolute() else (base / file).resolve())


@dataclass(frozen=True)
class HomeInit:
    """What ``ckms init`` made; ``init.mnemonics`` are shown once and never stored."""

    config_path: Path
    settings: ControllerSettings
    init: InitResult = field(repr=False)
    admin: Operator
    host_key_fingerprint: str
    custodians: tuple[Operator, ...] = ()
    encrypted_shares: dict[str, str] = field(default_factory=dict)
    """Custodian name -> their share as an armored age file (safe to show and store)."""


def _fresh_home(home: Path) -> tuple[Path, Path]:
    """Create the home directory (0700) unless it already holds a settings file."""
    home = home.expanduser().resolve()
    config_path = home / CONFIG_FILE
    if config_path.exists():
        raise AlreadyExistsError(f"{config_path} already exists; this home is initialised")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home, config_path


async def init_home(
    home: Path,
    *,
    admin: str,
    admin_public_key: str,
    shares: tuple[int, int] | None = None,
    passphrase: str | None = None,
    kafka_bootstrap: str = "127.0.0.1:9092",
    listen_host: str = "127.0.0.1",
    listen_port: int = 2222,
    custodians: Sequence[tuple[str, str]] = (),
    store: str | None = None,
    store_password_file: Path | None = None,
) -> HomeInit:
    """Create and initialise a controller home; refuses one that is already initialised.

    ``store`` puts the store elsewhere than the home's SQLite file (a PostgreSQL database,
    whose password is ``store_password_file``'s); it must not hold a controller yet.

    With ``custodians`` (name, ssh-ed25519 public key line), there must be one per share: each
    becomes an operator with role custodian and gets its share age-encrypted to that key
    (``encrypted_shares``), so no one sees every share.
    """
    # Refuse a bad name or key before anything is written.
    validate_operator_name(admin)
    parse_ssh_public_key(admin_public_key)
    check_custodians(custodians, shares=shares, admin_public_key=admin_public_key)
    home, config_path = await asyncio.to_thread(_fresh_home, home)
    try:
        settings = ControllerSettings(
            home=home,
            listen_host=listen_host,
            listen_port=listen_port,
            kafka_bootstrap=kafka_bootstrap,
            store=store,
            store_password_file=store_password_file,
        )
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        raise ConfigError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    store = await settings.open_store()
    try:
        result = await init_controller(
            store, shares=shares, passphrase=passphrase, actor=f"init:{admin}"
        )
        registry = OperatorRegistry(store)
        operator = await registry.add(admin, "admin", admin_public_key, actor=f"init:{admin}")
        encrypted = {
            name: age_encrypt_to_ssh(mnemonic.encode(), public)
            for (name, public), mnemonic in zip(custodians, result.mnemonics, strict=False)
        }
        added = tuple(
            [
                await registry.add(
                    name,
                    "custodian",
                    public,
                    actor=f"init:{admin}",
                    details={"share": number},
                )
                for number, (name, public) in enumerate(custodians, start=1)
            ]
        )
        if added:
            await registry.record_custodian_set(added, actor=f"init:{admin}")
    finally:
        await store.close()
    host_key = await asyncio.to_thread(load_or_create_host_key, settings.host_key_path)
    await asyncio.to_thread(write_settings, config_path, settings)
    return HomeInit(
        config_path=config_path,
        settings=settings,
        init=result,
        admin=operator,
        host_key_fingerprint=fingerprint(host_key),
        custodians=added,
        encrypted_shares=encrypted,
    )


def check_custodians(
    custodians: Sequence[tuple[str, str]],
    *,
    shares: tuple[int, int] | None,
    admin_public_key: str,
) -> None:
    """Refuse a custodian list that would not give each share to one distinct person's key."""
    if not custodians:
        return
    if shares is None:
        raise ConfigError("custodians hold shares: give --shares M/N with them")
    if len(custodians) != shares[1]:
        raise ConfigError(
            f"{len(custodians)} custodians for {shares[1]} shares: give one custodian per share"
        )
    names: set[str] = set()
    keys = {parse_ssh_public_key(admin_public_key)[1]}
    for name, public in custodians:
        validate_operator_name(name)
        line, fp = parse_ssh_public_key(public)
        if not line.startswith("ssh-ed25519 "):
            raise ConfigError(f"custodian {name}: shares are age-encrypted to ssh-ed25519 keys")
        if name in names:
            raise ConfigError(f"custodian {name} is named twice")
        if fp in keys:
            # One key, two shares (or the admin's key): one person could unseal alone.
            raise ConfigError(f"custodian {name}'s key is already someone else's in this init")
        names.add(name)
        keys.add(fp)
