"""What a key says about where it goes and how it is installed, shared by controller and agent.

These models travel in events and sync replies, so the controller and every agent validate them
the same way: version states and revocation reasons (NIST SP 800-57 §7, KMIP 2.1), targets
(label selectors and host ids, with the environment guard), and install specs (path template,
format, owner, mode, reload and health hooks).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import string
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ckms.crypto import (
    InstallFormat,
    KeyType,
    allowed_formats,
    check_dns_name,
    check_ip_address,
)
from ckms.errors import ConfigError


class KeyState(StrEnum):
    """States of a key version (NIST SP 800-57 §7, KMIP 2.1)."""

    PRE_ACTIVE = "PreActive"
    ACTIVE = "Active"
    SUSPENDED = "Suspended"
    DEACTIVATED = "Deactivated"
    COMPROMISED = "Compromised"
    DESTROYED = "Destroyed"
    DESTROYED_COMPROMISED = "DestroyedCompromised"


class RevocationReason(StrEnum):
    """KMIP revocation reason codes."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"

    @property
    def is_compromise(self) -> bool:
        """True for the reasons that move a version to Compromised rather than Deactivated."""
        return self in (RevocationReason.KEY_COMPROMISE, RevocationReason.CA_COMPROMISE)


VersionState = KeyState
"""The name events use for :class:`KeyState`."""


_SEGMENT = r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?"
KEY_NAME_RE = re.compile(rf"^{_SEGMENT}/{_SEGMENT}$")
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
_HOST_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._:-]{0,126}[A-Za-z0-9])?$")
ENV_LABEL = "env"
"""The label that names a host's environment (the hard guard of :class:`Targets`)."""

_POSIX_NAME_RE = re.compile(r"^(?:[a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$")

WIRE_CONTEXT: dict[str, bool] = {"wire": True}
"""Validation context of a signed message's ``data``: the shorthands people may type in a CLI
or a config file (a hook as a string) are refused there, so each value has one spelling on the
wire and the JSON Schemas in ``docs/schemas`` describe exactly what is accepted."""


def _on_wire(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("wire"))


# The JSON Schema twins of the checks below that pydantic cannot derive from the annotations
# (``python -m ckms.protocol.schemas`` publishes them): each sits next to the validator it
# mirrors, and tests/unit/protocol/test_schemas.py checks that both accept the same values.
_PATH_LIT = r"[^/\x00{}]"
_PATH_TOKEN = rf"(?:{_PATH_LIT}|\{{\{{|\}}\}}|\{{(?:name|team|purpose|version|host):?\}})"
_PATH_TOKEN_NODOT = _PATH_TOKEN.replace(_PATH_LIT, r"[^/\x00{}.]", 1)
_PATH_SEGMENT = (  # any segment but "." and ".."
    rf"(?:{_PATH_TOKEN_NODOT}{_PATH_TOKEN}*"
    rf"|\.{_PATH_TOKEN_NODOT}{_PATH_TOKEN}*"
    rf"|\.\.{_PATH_TOKEN}+)"
)
PATH_TEMPLATE_PATTERN = rf"^(?:/{_PATH_SEGMENT}?)*/{_PATH_SEGMENT}$"
"""An absolute path template: no ``.``/``..`` segment, no NUL, no trailing ``/``, placeholders
from :data:`PATH_PLACEHOLDERS` only (``{{``/``}}`` are literal braces)."""

_NO_NUL = r"^[^\x00]*$"
_POSIX_NAME_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": _POSIX_NAME_RE.pattern}, {"type": "null"}]
}


class Targets(BaseModel):
    """Which hosts get a key: label selectors (OR of ANDs) and explicit host ids.

    A selector ``{"env": "prod", "role": "web"}`` (written ``env=prod,role=web``) matches a host
    whose labels include every pair. A host matches the targets if any selector matches it or
    its id is listed in ``hosts``. The key's environment (``env``, or the one ``env`` value all
    selectors name) is a hard guard: a host labelled with another environment, or with none,
    never gets the key, even when listed by id. Revoked hosts never match.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    selectors: tuple[dict[str, str], ...] = Field(
        default=(),
        json_schema_extra={
            "items": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": _LABEL_RE.pattern},
                "additionalProperties": {"type": "string", "pattern": _LABEL_VALUE_RE.pattern},
            }
        },
    )
    hosts: tuple[str, ...] = Field(
        default=(), json_schema_extra={"items": {"type": "string", "pattern": _HOST_ID_RE.pattern}}
    )
    env: str | None = Field(
        default=None,
        json_schema_extra={
            "anyOf": [{"type": "string", "pattern": _LABEL_VALUE_RE.pattern}, {"type": "null"}]
        },
    )

    @field_validator("selectors")
    @classmethod
    def _check_selectors(cls, value: tuple[dict[str, str], ...]) -> tuple[dict[str, str], ...]:
        for selector in value:
            if not selector:
                raise ValueError("an empty selector would match every host; name labels")
            for label, want in selector.items():
                if not _LABEL_RE.fullmatch(label):
                    raise ValueError(f"invalid label name {label!r}")
                if not _LABEL_VALUE_RE.fullmatch(want):
                    raise ValueError(f"invalid value {want!r} for label {label!r}")
        return tuple(dict(sorted(s.items())) for s in value)

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not _HOST_ID_RE.fullmatch(host):
                raise ValueError(f"invalid host id {host!r}")
        return tuple(sorted(set(value)))

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: str | None) -> str | None:
        if value is not None and not _LABEL_VALUE_RE.fullmatch(value):
            raise ValueError(f"invalid environment {value!r}")
        return value

    @model_validator(mode="after")
    def _env_consistent(self) -> Targets:
        if self.env is not None:
            for selector in self.selectors:
                if selector.get("env", self.env) != self.env:
                    raise ValueError(
                        f"selector env={selector['env']} contradicts the key's environment "
                        f"{self.env}"
                    )
        return self

    @property
    def effective_env(self) -> str | None:
        """The environment the key belongs to: ``env``, else the one env every selector names."""
        if self.env is not None:
            return self.env
        envs = {s.get("env") for s in self.selectors}
        if len(envs) == 1:
            (only,) = envs
            return only
        return None

    def selects(self, host_id: str, labels: dict[str, str]) -> bool:
        """True when a selector or the explicit host list names the host (before the env guard)."""
        if host_id in self.hosts:
            return True
        return any(
            all(labels.get(label) == value for label, value in selector.items())
            for selector in self.selectors
        )

    def env_allows(self, labels: dict[str, str]) -> bool:
        """True when the environment guard lets the key onto a host with these labels."""
        env = self.effective_env
        return env is None or labels.get(ENV_LABEL) == env

    def matches(self, host_id: str, labels: dict[str, str]) -> bool:
        """True when the key belongs on this (non-revoked) host: selected and env allows it."""
        return self.selects(host_id, labels) and self.env_allows(labels)

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...], *, env: str | None = None) -> Targets:
        """Build targets from CLI-style specs: ``env=prod,role=web`` or ``host:<id>``."""
        selectors: list[dict[str, str]] = []
        hosts: list[str] = []
        for spec in specs:
            spec = spec.strip()
            if spec.startswith("host:"):
                hosts.append(spec.removeprefix("host:"))
                continue
            selector: dict[str, str] = {}
            for part in spec.split(","):
                label, sep, value = part.partition("=")
                if not sep:
                    raise ConfigError(f"target {spec!r}: expected label=value pairs or host:<id>")
                label, value = label.strip(), value.strip()
                if label in selector and selector[label] != value:
                    raise ConfigError(f"target {spec!r}: label {label!r} given twice")
                selector[label] = value
            selectors.append(selector)
        try:
            return cls(selectors=tuple(selectors), hosts=tuple(hosts), env=env)
        except ValueError as exc:
            raise ConfigError(f"invalid targets: {exc}") from None

    def describe(self) -> list[str]:
        """Return the targets in the CLI spec form, for display."""
        out = [",".join(f"{k}={v}" for k, v in s.items()) for s in self.selectors]
        return out + [f"host:{h}" for h in self.hosts]


PATH_PLACEHOLDERS = frozenset({"name", "team", "purpose", "version", "host"})
"""Placeholders a path template may use: ``{team}/{purpose}`` are the two halves of the name,
``{name}`` is ``team/purpose`` (so it adds a directory level), ``{version}`` the version number and
``{host}`` the host id."""

MAX_HOOK_TIMEOUT_S = 600.0

HOOK_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$"
HOOK_NAME_RE = re.compile(HOOK_NAME_PATTERN)
"""A hook name: what the controller may say; the host's own config maps it to a command."""
HookName = Annotated[str, Field(pattern=HOOK_NAME_PATTERN)]


class HookSpec(BaseModel):
    """A controller-supplied command (argv) for reload or health: the legacy form.

    Agents refuse it unless their own config sets ``allow_controller_commands = true``; the
    supported form is a hook *name* that the host's config maps to a command.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    argv: tuple[str, ...] = Field(
        json_schema_extra={
            "minItems": 1,
            "prefixItems": [{"type": "string", "minLength": 1, "pattern": _NO_NUL}],
            "items": {"type": "string", "pattern": _NO_NUL},
        }
    )
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_HOOK_TIMEOUT_S)

    @field_validator("argv", mode="before")
    @classmethod
    def _split(cls, value: Any, info: ValidationInfo) -> Any:
        if _on_wire(info):
            return tuple(value) if isinstance(value, list) else value
        # A string is split like a shell would split it, but never run through a shell.
        return tuple(shlex.split(value)) if isinstance(value, str) else value

    @field_validator("argv")
    @classmethod
    def _nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not value[0]:
            raise ValueError("command must not be empty")
        if any("\x00" in a for a in value):
            raise ValueError("command must not contain NUL")
        return value


def _hook_ref(value: Any) -> Any:
    """A string names a host hook; a list, tuple or mapping is a legacy controller command."""
    if isinstance(value, str):
        if not HOOK_NAME_RE.match(value):
            raise ValueError(
                f"hook {value!r} is not a hook name (lowercase letters, digits, '.', '_', '-'); "
                "the command itself lives in the agent's config under [hooks.<name>]"
            )
        return value
    if isinstance(value, list | tuple):
        return {"argv": value}
    return value


SAN_PLACEHOLDERS = frozenset({"host", "team", "purpose", "label"})
"""Placeholders a ``tls-cert`` name template may use: ``{host}`` (the host id), ``{team}`` and
``{purpose}`` (the key name's halves) and ``{label:NAME}`` (the value of the host's label NAME;
a host without it gets no certificate)."""
MAX_SAN_TEMPLATES = 32
CertUsageName = Literal["server", "client", "both"]


def _check_name_template(value: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 253 or "\x00" in value:
        raise ValueError("a name template must be 1..253 characters")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"name template {value!r} is malformed: {exc}") from None
    for _, field, spec, conv in parts:
        if field is None:
            continue
        if field not in SAN_PLACEHOLDERS or conv:
            raise ValueError(
                f"name template {value!r} uses {{{field}}}; allowed: {{host}}, {{team}}, "
                "{purpose}, {label:NAME}"
            )
        if (field == "label") != bool(spec):
            raise ValueError(f"name template {value!r}: write a label as {{label:NAME}}")
        if field == "label" and not _LABEL_RE.fullmatch(spec or ""):
            raise ValueError(f"name template {value!r}: invalid label name {spec!r}")
    return value


class TlsProfile(BaseModel):
    """What each host's certificate of a ``tls-cert`` key says: its subject common name and
    subject alternative names, as templates rendered per host (:func:`render_tls_names`), and
    whether it authenticates a TLS server, a client, or both.

    A name that renders to an IP address becomes an IP SAN. The controller issues exactly the
    rendered names and refuses a CSR that asks for any other.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    common_name: str = "{host}"
    sans: tuple[str, ...] = Field(default=("{host}",), max_length=MAX_SAN_TEMPLATES)
    usage: CertUsageName = "server"

    @field_validator("common_name")
    @classmethod
    def _check_cn(cls, value: str) -> str:
        return _check_name_template(value)

    @field_validator("sans")
    @classmethod
    def _check_sans(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_check_name_template(v) for v in value))


def render_tls_names(
    profile: TlsProfile, *, key_name: str, host_id: str, labels: dict[str, str]
) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The (common name, DNS names, IP addresses) ``host_id`` may have certified for a key.

    ConfigError naming the template when a host lacks a label a template needs, or a rendered
    name is not a valid host name or address (a host id with ``_`` or ``:`` cannot be a DNS
    name): that host gets no certificate rather than a guessed name.
    """
    team, _, purpose = key_name.partition("/")

    def render(template: str) -> str:
        out = []
        for literal, field, spec, _ in string.Formatter().parse(template):
            out.append(literal)
            if field is None:
                continue
            if field == "label":
                if not spec or spec not in labels:
                    raise ConfigError(
                        f"host {host_id} has no label {spec!r} that name template "
                        f"{template!r} needs"
                    )
                out.append(labels[spec])
            else:
                out.append({"host": host_id, "team": team, "purpose": purpose}[field])
        return "".join(out)

    dns: list[str] = []
    ips: list[str] = []
    for template in profile.sans:
        name = render(template)
        try:
            ips.append(check_ip_address(name))
            continue
        except ConfigError:
            pass
        try:
            dns.append(check_dns_name(name))
        except ConfigError as exc:
            raise ConfigError(f"host {host_id} may not claim {name!r}: {exc}") from None
    return render(profile.common_name), tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips))


def tls_names_digest(
    profile: TlsProfile, *, key_name: str, host_id: str, labels: dict[str, str]
) -> str | None:
    """A digest of the names :func:`render_tls_names` gives ``host_id`` (None: it gets none).

    Sync sends it with a ``tls-cert`` key; the agent keeps the one its certificate was issued
    under and re-issues when it differs (a relabel changed a ``{label:NAME}``), since the
    install spec alone looks the same. Names are not secret: a plain SHA-256."""
    try:
        names = render_tls_names(profile, key_name=key_name, host_id=host_id, labels=labels)
    except ConfigError:
        return None
    text = json.dumps(names, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class InstallSpec(BaseModel):
    """Where and how an agent writes a key version to disk.

    ``path`` is an absolute template over :data:`PATH_PLACEHOLDERS`. ``keyring-json`` puts
    every usable version into one file, so its path must not contain ``{version}``; other
    formats write one file per version when the path contains ``{version}``, else only the
    primary. The file mode may not grant anything to "other" (a key file is never
    world-readable) and is not group-writable unless ``group_write_reason`` says why; the
    directory is never group- or world-writable (the agent refuses such directories, since
    whoever can write them can redirect its file operations).

    ``reload`` and ``health`` name hooks that the host's own agent config defines
    (``[hooks.<name>]``); the controller never decides what runs on a host. The legacy form,
    a command (:class:`HookSpec`), is refused by agents unless their config allows it.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "allOf": [
                {
                    "if": {
                        "properties": {"format": {"const": "keyring-json"}},
                        "required": ["format"],
                    },
                    "then": {"properties": {"path": {"not": {"pattern": r"\{version\}"}}}},
                },
                {
                    "if": {
                        "properties": {"group_write_reason": {"type": "string"}},
                        "required": ["group_write_reason"],
                    },
                    "else": {
                        "properties": {
                            "mode": {"not": {"enum": [m for m in range(0o1000) if m & 0o020]}}
                        }
                    },
                },
            ]
        },
    )

    path: str = Field(json_schema_extra={"pattern": PATH_TEMPLATE_PATTERN})
    format: InstallFormat = InstallFormat.RAW
    owner: str | None = Field(default=None, json_schema_extra=_POSIX_NAME_SCHEMA)
    group: str | None = Field(default=None, json_schema_extra=_POSIX_NAME_SCHEMA)
    # Owner-readable (0o400), nothing for "other": 0o400..0o770 in steps of 8 (group write
    # only with group_write_reason: see the model's schema above).
    mode: int = Field(
        default=0o600,
        ge=0,
        le=0o777,
        json_schema_extra={"minimum": 0o400, "maximum": 0o770, "multipleOf": 8},
    )
    # Neither group- nor world-writable (0o022).
    dir_mode: int = Field(
        default=0o700,
        ge=0,
        le=0o777,
        json_schema_extra={"not": {"enum": [m for m in range(0o1000) if m & 0o022]}},
    )
    reload: HookName | HookSpec | None = None
    health: HookName | HookSpec | None = None
    group_write_reason: str | None = Field(default=None, min_length=1, max_length=200)
    tls: TlsProfile | None = None
    """For ``tls-pem`` (``tls-cert`` keys) only: the certificate's names and usage; ``path``
    then names the directory the agent writes ``key.pem``, ``cert.pem``, ``chain.pem``,
    ``fullchain.pem``, ``combined.pem`` and ``ca.pem`` into."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or "\x00" in value or value.endswith("/"):
            raise ValueError("path must be an absolute file path")
        if any(part in ("..", ".") for part in value.split("/")):
            raise ValueError("path must not contain '.' or '..' segments")
        try:
            fields = [f for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
            specs = [
                (spec, conv)
                for _, f, spec, conv in string.Formatter().parse(value)
                if f is not None
            ]
        except ValueError as exc:
            raise ValueError(f"path template is malformed: {exc}") from None
        unknown = set(fields) - PATH_PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"path template uses unknown placeholders {sorted(unknown)}; "
                f"allowed: {sorted(PATH_PLACEHOLDERS)}"
            )
        if any(spec or conv for spec, conv in specs):
            raise ValueError("path placeholders take no format spec or conversion")
        return value

    @field_validator("reload", "health", mode="before")
    @classmethod
    def _hook_shorthand(cls, value: Any, info: ValidationInfo) -> Any:
        # On the wire a string is a hook name and an object a (legacy) command; elsewhere an
        # argv list is accepted as the command too.
        if _on_wire(info) and not isinstance(value, str):
            return value
        return _hook_ref(value)

    @field_validator("owner", "group")
    @classmethod
    def _check_posix_name(cls, value: str | None) -> str | None:
        if value is not None and not _POSIX_NAME_RE.fullmatch(value):
            raise ValueError(f"invalid user or group name {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> InstallSpec:
        if self.mode & 0o007:
            raise ValueError(f"mode {self.mode:#o} grants access to other users")
        if self.mode & 0o400 == 0:
            raise ValueError(f"mode {self.mode:#o} does not let the owner read the key")
        if self.mode & 0o020 and self.group_write_reason is None:
            raise ValueError(
                f"mode {self.mode:#o} lets the group write the key: set group_write_reason to "
                "say why, or drop the group write bit"
            )
        if self.dir_mode & 0o022:
            raise ValueError(
                f"dir_mode {self.dir_mode:#o} is group- or world-writable: whoever can write the "
                "key directory can swap the key for a link, so agents refuse it"
            )
        if self.format is InstallFormat.KEYRING_JSON and "{version}" in self.path:
            raise ValueError("a keyring-json file holds every version: drop {version} from path")
        if self.tls is not None and self.format is not InstallFormat.TLS_PEM:
            raise ValueError("tls names and usage apply to the tls-pem format only")
        if self.tls is None and self.format is InstallFormat.TLS_PEM:
            object.__setattr__(self, "tls", TlsProfile())
        return self

    def render_path(self, key_name: str, version: int, host_id: str) -> str:
        """Return the file path for one version on one host."""
        team, _, purpose = key_name.partition("/")
        return self.path.format(
            name=key_name, team=team, purpose=purpose, version=version, host=host_id
        )


def default_install(key_type: KeyType | str) -> InstallSpec:
    """Return the install spec a key gets when create names none (one file per version).

    A wire rule: the CLI builds partial install options on top of it, so it must be the
    controller's own default, not a guess of it.
    """
    if InstallFormat.TLS_PEM in allowed_formats(key_type):
        return InstallSpec(
            path="/var/lib/ckms/tls/{team}/{purpose}",
            format=InstallFormat.TLS_PEM,
            tls=TlsProfile(),
        )
    fmt = InstallFormat.PEM if InstallFormat.PEM in allowed_formats(key_type) else InstallFormat.RAW
    ext = "pem" if fmt is InstallFormat.PEM else "key"
    return InstallSpec(
        path=f"/var/lib/ckms/keys/{{team}}/{{purpose}}/v{{version}}.{ext}", format=fmt
    )
