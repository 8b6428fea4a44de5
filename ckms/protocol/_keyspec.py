"""What a key says about where it goes and how it is installed, shared by controller and agent."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ckms.crypto import InstallFormat

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_HOST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_selector(text: str) -> dict[str, str]:
    """Parse ``env=prod,role=web`` into a label map, refusing malformed or repeated labels."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.count("=") != 1:
            raise ValueError(f"bad selector term {part!r}: expected label=value")
        key, value = (s.strip() for s in part.split("="))
        if not _LABEL_RE.match(key) or not _LABEL_RE.match(value):
            raise ValueError(
                f"bad selector term {part!r}: labels and values are lowercase letters, digits, "
                "'.', '_' or '-' (at most 63)"
            )
        if key in labels:
            raise ValueError(f"label {key!r} appears twice in selector {text!r}")
        labels[key] = value
    if not labels:
        raise ValueError("empty selector: expected label=value[,label=value]")
    return labels


class Targets(BaseModel):
    """Which hosts a key goes to: any selector whose labels all match, or an explicit host id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    selectors: tuple[dict[str, str], ...] = ()
    hosts: tuple[str, ...] = ()

    @field_validator("selectors")
    @classmethod
    def _check_selectors(cls, value: tuple[dict[str, str], ...]) -> tuple[dict[str, str], ...]:
        for selector in value:
            if not selector:
                raise ValueError("a selector needs at least one label")
            for key, label_value in selector.items():
                if not _LABEL_RE.match(key) or not _LABEL_RE.match(label_value):
                    raise ValueError(f"bad label {key}={label_value}")
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not _HOST_ID_RE.match(host):
                raise ValueError(f"bad host id {host!r}")
        return value

    def matches(self, host_id: str, labels: dict[str, str]) -> bool:
        """True when the host is named explicitly or all labels of some selector match it."""
        if host_id in self.hosts:
            return True
        return any(
            all(labels.get(k) == v for k, v in selector.items()) for selector in self.selectors
        )


Mode = Annotated[int, Field(ge=0, le=0o7777)]
Timeout = Annotated[float, Field(gt=0, le=3600)]


class InstallSpec(BaseModel):
    """How an agent writes a key to disk and tells the service that uses it.

    ``path`` may use ``{name}`` (the key name with ``/`` as ``_``), ``{version}`` and ``{host}``;
    a path with ``{version}`` installs one file per version, otherwise the file holds the primary
    (or, for ``keyring-json``, every usable version). Commands are argv lists, never shell text.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1, max_length=1024)
    format: InstallFormat = InstallFormat.RAW
    owner: str | None = None
    group: str | None = None
    mode: Mode = 0o600
    dir_mode: Mode = 0o700
    reload_command: tuple[str, ...] | None = None
    reload_timeout_s: Timeout = 30.0
    health_command: tuple[str, ...] | None = None
    health_timeout_s: Timeout = 30.0

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("install path must be absolute")
        if any(part == ".." for part in value.split("/")):
            raise ValueError("install path must not contain '..'")
        if "\x00" in value:
            raise ValueError("install path must not contain NUL")
        return value

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, value: int) -> int:
        if value & 0o077 & ~0o040:
            raise ValueError(
                f"mode {value:04o} gives key material to others: at most group-read (0640)"
            )
        return value

    @field_validator("reload_command", "health_command")
    @classmethod
    def _check_command(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("a command is a non-empty argv list")
        return value

    def render_path(self, *, key_name: str, version: int, host: str) -> str:
        """The file path for one version on one host."""
        return self.path.format(name=key_name.replace("/", "_"), version=version, host=host)
