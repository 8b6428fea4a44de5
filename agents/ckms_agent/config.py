"""The agent's settings: one typed, validated object built from TOML, environment and defaults.

Precedence is environment > file > defaults (as SPIRE merges CLI > file > defaults): the file is
what ``ckms-agent enroll`` wrote and pinned; ``CKMS_AGENT_<FIELD>`` variables override single
fields for containers and tests (``CKMS_AGENT_KAFKA_BOOTSTRAP=...``). Everything is validated
once, here; every error names the field and where its value came from, and the rest of the agent
only ever sees an :class:`AgentConfig`.

``CKMS_AGENT_CONFIG`` (the file's path) and ``CKMS_AGENT_FAULT`` (fault injection) are not
fields and are ignored here; so are other unknown ``CKMS_AGENT_*`` variables, while an unknown
key in the file is an error (a typo in a pinned setting must not pass silently).

The file also holds the **host's policy**, which the controller cannot change: the directories
keys may be installed under (``allowed_paths``), the users and groups key files may be given
(``allowed_owners``, ``allowed_groups``), and the commands behind the hook names install specs
use (``[hooks.<name>]``). Running as root, the agent refuses a config file that someone other
than root owns or may write, since whoever writes it decides what the agent does as root.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ckms._exposition import parse_listen
from ckms._kafka_security import KafkaLink, KafkaProtocol, KafkaSecurity
from ckms.crypto import WrapSuite, signer_key_id
from ckms.errors import ConfigError
from ckms.protocol import EVENTS_TOPIC, HOOK_NAME_RE, Targets
from ckms.ssh import Endpoint, parse_endpoints
from ckms_agent.files import InstallError, write_atomic

ENV_PREFIX = "CKMS_AGENT_"
CONFIG_ENV = "CKMS_AGENT_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/ckms/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/ckms-agent")

IDENTITY_KEY_FILE = "identity.key"
WRAPPING_KEY_FILE = "wrapping.key"
DIGEST_KEY_FILE = "digest.key"
STATE_DB_FILE = "state.db"
CA_BUNDLE_FILE = "ca-bundle.pem"
KAFKA_DIR = "kafka"
KAFKA_CLIENT_CERT_FILE = "client.pem"
KAFKA_CLIENT_KEY_FILE = "client.key"

_FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

DEFAULT_ALLOWED_PATHS = (Path("/etc/ckms/keys"), Path("/var/lib/ckms/keys"))
MAX_HOOK_TIMEOUT_S = 600.0

Seconds = Annotated[float, Field(gt=0, le=86400)]

POLICY_FIELDS = (
    "allowed_paths",
    "allowed_owners",
    "allowed_groups",
    "hooks",
    "allow_controller_commands",
)
"""The settings that are the host's policy: kept across re-enrollment, never from the wire."""

KAFKA_LOCAL_FIELDS = (
    "kafka_security_protocol",
    "kafka_ca_file",
    "kafka_cert_file",
    "kafka_key_file",
    "kafka_sasl_file",
    "kafka_check_hostname",
)
"""How this host reaches Kafka (protocol, where its TLS files are): the host's own setting,
kept across re-enrollment like the policy."""


def _argv(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is not None and (not value or not value[0] or any("\x00" in a for a in value)):
        raise ValueError("a hook command is a non-empty argv list (no NUL)")
    return value


class HookCommand(BaseModel):
    """One hook the host defines: what its reload and health check run, as whom, for how long.

    Commands are argv lists, never run through a shell. ``user`` (default: the agent's own
    user) runs them with that user's uid, primary group and no supplementary groups.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reload: tuple[str, ...] | None = None
    health: tuple[str, ...] | None = None
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_HOOK_TIMEOUT_S)
    user: str | None = Field(default=None, min_length=1, max_length=32)
    log_output: bool = False
    """Keep the tail of the hook's output in this host's agent log (off: only its size).

    Off by default because a hook is free to print what it reads, key files included; when on,
    the key's own material is scrubbed from what is logged (raw, hex, base64)."""

    @field_validator("reload", "health")
    @classmethod
    def _check_argv(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _argv(value)

    @model_validator(mode="after")
    def _something(self) -> HookCommand:
        if self.reload is None and self.health is None:
            raise ValueError("a hook defines a reload command, a health check, or both")
        return self


class AgentConfig(BaseModel):
    """Everything the agent needs to run, after validation (immutable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host_id: str
    labels: dict[str, str] = Field(default_factory=dict)
    controller_host: str | None = Field(default=None, min_length=1, max_length=255)
    controller_port: int = Field(default=2222, ge=1, le=65535)
    controller: tuple[str, ...] = ()
    """Several controllers (replicas on one store), ``["ctl-1:2222", "ctl-2:2222"]`` (a single
    ``"HOST:PORT"`` string is fine too), instead of ``controller_host``/``controller_port``.
    They share one host key (``host_key_fingerprint``); the agent uses one at a time and fails
    over to the next when it cannot reach it (``ckms.ssh.RpcClient``)."""
    host_key_fingerprint: str
    controller_signing_key: str
    controller_key_id: str
    kafka_bootstrap: str = Field(min_length=1, max_length=1024)
    kafka_security_protocol: KafkaProtocol = KafkaProtocol.SSL
    """``SSL`` (mutual TLS, the default), ``SASL_SSL`` (SCRAM-SHA-512 over TLS) or
    ``PLAINTEXT`` (development only; warns at start)."""
    kafka_ca_file: Path | None = None
    """The CA bundle the brokers' certificates chain to (default: the ckms trust bundle,
    ``<state_dir>/ca-bundle.pem``, written at enrollment)."""
    kafka_cert_file: Path | None = None
    """This host's client certificate with its chain, ``CN=<host>,OU=ckms-agent``
    (default for SSL: ``<state_dir>/kafka/client.pem``)."""
    kafka_key_file: Path | None = None
    """Its private key (default for SSL: ``<state_dir>/kafka/client.key``), mode 0600."""
    kafka_sasl_file: Path | None = None
    """For SASL_SSL: a TOML file with ``username`` and ``password``."""
    kafka_check_hostname: bool = True
    events_topic: str = Field(default=EVENTS_TOPIC, min_length=1, max_length=249)
    event_seq_floor: int = Field(default=0, ge=0)
    """The controller's last event ``seq`` at enrollment (from the enroll reply): every event
    at or below it predates this enrollment and is dropped as a replay."""
    state_dir: Path = DEFAULT_STATE_DIR
    root: Path | None = None
    wrap_suite: WrapSuite = WrapSuite.X25519
    reconcile_interval_s: Seconds = 300.0
    heartbeat_interval_s: Seconds = 60.0
    reconnect_backoff_min_s: Seconds = 0.5
    reconnect_backoff_max_s: Seconds = 30.0
    default_max_staleness_s: int | None = Field(default=None, gt=0)
    """Used for keys whose policy names no max staleness; None: such keys never go stale."""
    rpc_timeout_s: Seconds = 30.0
    kafka_fetch_max_wait_ms: int = Field(default=20000, ge=10, le=60000)
    """Long poll: an idle agent costs the broker one fetch per this many ms (docs/architecture.md
    §8); an event ends the wait at once, so this bounds idle cost, not latency (10,000 agents at
    5 s were 2,000 fetches a second for the broker; at 20 s, 500)."""
    log_level: str = "INFO"
    ssh_debug: bool = False
    """Let asyncssh log at DEBUG when ``log_level`` is DEBUG (it stays at WARNING otherwise)."""
    metrics_textfile: Path | None = None
    """A ``.prom`` file in node_exporter's textfile-collector directory, rewritten atomically;
    unset, no file is written."""
    metrics_listen: str | None = None
    """``127.0.0.1:PORT`` (loopback only) to also serve ``/metrics``; unset, no port opens."""
    metrics_interval_s: Seconds = 15.0
    allowed_paths: tuple[Path, ...] = DEFAULT_ALLOWED_PATHS
    """Directories keys may be installed under (paths as the controller names them, before
    ``root``); an install spec resolving elsewhere is refused and acked ``failed``."""
    allowed_owners: tuple[str, ...] = ()
    """Users key files may be given besides root (an install spec naming another is refused)."""
    allowed_groups: tuple[str, ...] = ()
    """Groups key files may be given besides root's."""
    hooks: dict[str, HookCommand] = Field(default_factory=dict)
    """The commands behind the hook names install specs use (``[hooks.<name>]``)."""
    allow_controller_commands: bool = False
    """Run reload/health commands the controller supplies as argv (legacy; off: refused)."""

    @field_validator("allowed_paths")
    @classmethod
    def _check_allowed(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in value:
            text = str(path)
            if not path.is_absolute() or any(p in (".", "..") for p in text.split("/")):
                raise ValueError(f"{text!r} must be an absolute path without '.' or '..'")
            if path == Path("/"):
                raise ValueError("'/' cannot be an allowed path (name the key directories)")
        return value

    @field_validator("allowed_owners", "allowed_groups")
    @classmethod
    def _check_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.match(r"^(?:[a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$", name):
                raise ValueError(f"invalid user or group name {name!r}")
        return value

    @field_validator("hooks")
    @classmethod
    def _check_hook_names(cls, value: dict[str, HookCommand]) -> dict[str, HookCommand]:
        for name in value:
            if not HOOK_NAME_RE.match(name):
                raise ValueError(
                    f"invalid hook name {name!r} (lowercase letters, digits, '.', '_', '-')"
                )
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_listen(value, loopback_only=True)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("host_id")
    @classmethod
    def _check_host_id(cls, value: str) -> str:
        # The shared Targets model owns the host id and label syntax; validate through it.
        try:
            Targets(hosts=(value,))
        except ValidationError:
            raise ValueError(
                "a host id is letters, digits, '.', '_', ':' or '-' (at most 128)"
            ) from None
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        if value:
            try:
                Targets(selectors=(value,))
            except ValidationError as exc:
                first = exc.errors(include_input=False)[0].get("msg", "invalid")
                raise ValueError(first.removeprefix("Value error, ")) from None
        return value

    @field_validator("controller", mode="before")
    @classmethod
    def _check_controllers(cls, value: object) -> tuple[str, ...]:
        if value in ((), [], None, ""):
            return ()
        if not isinstance(value, str | list | tuple) or not all(
            isinstance(v, str) for v in ([value] if isinstance(value, str) else value)
        ):
            raise ValueError('expected "HOST:PORT" or a list of them')
        try:
            return tuple(str(e) for e in parse_endpoints(value))  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("host_key_fingerprint")
    @classmethod
    def _check_fingerprint(cls, value: str) -> str:
        if not _FINGERPRINT_RE.match(value):
            raise ValueError("expected an OpenSSH fingerprint like SHA256:<43 base64 characters>")
        return value

    @field_validator("controller_signing_key")
    @classmethod
    def _check_signing_key(cls, value: str) -> str:
        _decode_key(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.upper() not in _LEVELS:
            raise ValueError(f"expected one of {', '.join(_LEVELS)}")
        return value.upper()

    @field_validator("state_dir", "root", "metrics_textfile")
    @classmethod
    def _check_absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> AgentConfig:
        if signer_key_id(self.controller_public_key) != self.controller_key_id:
            raise ValueError(
                "controller_key_id does not name controller_signing_key: the pinned key and its "
                "id disagree (re-enroll, or fix the file)"
            )
        if bool(self.controller) == (self.controller_host is not None):
            raise ValueError(
                "name the controller once: controller_host (and controller_port), or controller "
                "(a list of HOST:PORT for several replicas)"
            )
        if self.reconnect_backoff_max_s < self.reconnect_backoff_min_s:
            raise ValueError("reconnect_backoff_max_s is below reconnect_backoff_min_s")
        self.check_allowed_excludes(self.state_dir, "the agent's state directory")
        try:
            self.kafka_security  # noqa: B018  (built to refuse an incomplete TLS/SASL setting)
        except ValidationError as exc:
            raise ValueError(exc.errors(include_url=False)[0]["msg"]) from None
        return self

    @property
    def kafka_security(self) -> KafkaSecurity:
        """How this host authenticates to Kafka (files default to ``<state_dir>/kafka/``)."""
        return KafkaSecurity.from_settings(
            protocol=self.kafka_security_protocol,
            directory=self.state_dir / KAFKA_DIR,
            # The ckms trust bundle enrollment writes (and every sync refreshes): brokers whose
            # certificates the ckms CA issued need nothing else.
            default_ca=self.state_dir / CA_BUNDLE_FILE,
            ca_file=self.kafka_ca_file,
            cert_file=self.kafka_cert_file,
            key_file=self.kafka_key_file,
            sasl_file=self.kafka_sasl_file,
            check_hostname=self.kafka_check_hostname,
        )

    @property
    def kafka(self) -> KafkaLink:
        """Where Kafka is and how this host talks to it (it reads events; it writes nothing)."""
        return KafkaLink(self.kafka_bootstrap, self.kafka_security)

    def on_host(self, path: Path) -> Path:
        """Where a path the controller names lands on this host (under ``root`` if set)."""
        return self.root / path.relative_to("/") if self.root is not None else path

    def check_allowed_excludes(self, path: Path, what: str) -> None:
        """Refuse an allowed root that holds ``path``: keys written there would replace it."""
        for allowed in self.allowed_paths:
            if path.is_relative_to(self.on_host(allowed)):
                raise ValueError(
                    f"allowed path {allowed} holds {what} ({path}): the controller could "
                    "replace it with key material; name a directory of its own for keys"
                )

    @property
    def controllers(self) -> tuple[Endpoint, ...]:
        """The controller endpoints, in the order given."""
        if self.controller:
            return parse_endpoints(self.controller)
        assert self.controller_host is not None
        return (Endpoint(self.controller_host, self.controller_port),)

    @property
    def controller_address(self) -> str:
        """The controllers as the config names them (for logs and ``ckms-agent status``)."""
        return ",".join(str(e) for e in self.controllers)

    @property
    def controller_public_key(self) -> bytes:
        """The pinned controller event-signing key (raw Ed25519 public key)."""
        return _decode_key(self.controller_signing_key)

    @property
    def identity_key_path(self) -> Path:
        """The agent's Ed25519 identity seed (SSH client auth and ack signing), mode 0600."""
        return self.state_dir / IDENTITY_KEY_FILE

    @property
    def wrapping_key_path(self) -> Path:
        """The agent's HPKE wrapping private key, mode 0600."""
        return self.state_dir / WRAPPING_KEY_FILE

    @property
    def digest_key_path(self) -> Path:
        """The fleet's digest key, as the controller handed it to this host, mode 0600."""
        return self.state_dir / DIGEST_KEY_FILE

    @property
    def ca_bundle_path(self) -> Path:
        """The controller CA's roots this host trusts (PEM; public), updated on every sync."""
        return self.state_dir / CA_BUNDLE_FILE

    @property
    def kafka_client_cert_path(self) -> Path:
        """The host's Kafka client certificate with its chain (``CN=<host>,OU=ckms-agent``,
        from the controller's CA), where the Kafka TLS settings look by default."""
        return self.state_dir / KAFKA_DIR / KAFKA_CLIENT_CERT_FILE

    @property
    def kafka_client_key_path(self) -> Path:
        """Its private key (PKCS#8 PEM, mode 0600), made on this host."""
        return self.state_dir / KAFKA_DIR / KAFKA_CLIENT_KEY_FILE

    @property
    def state_db_path(self) -> Path:
        """The agent's SQLite state (what it holds, offsets, pending acks; never material)."""
        return self.state_dir / STATE_DB_FILE


def _decode_key(value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("expected base64 of a raw 32-byte Ed25519 public key") from None
    if len(raw) != 32:
        raise ValueError("expected base64 of a raw 32-byte Ed25519 public key")
    return raw


_FIELDS = set(AgentConfig.model_fields)


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``CKMS_AGENT_<FIELD>`` variables that name a field, as raw values for validation."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in _FIELDS:
            continue
        if field == "labels":
            out[field] = parse_labels(value, name)
        elif field in ("allowed_paths", "allowed_owners", "allowed_groups"):
            out[field] = [part.strip() for part in value.split(",") if part.strip()]
        elif field == "hooks":
            try:
                out[field] = json.loads(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a JSON object of hooks") from None
        elif field in ("root", "default_max_staleness_s") and not value.strip():
            out[field] = None
        else:
            out[field] = value
    return out


def parse_labels(text: str, source: str = "labels") -> dict[str, str]:
    """Parse ``env=prod,role=web`` (empty text: no labels); values are checked by the model."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        label, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"{source}: expected label=value[,label=value], got {part.strip()!r}")
        labels[label.strip()] = value.strip()
    return labels


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse the TOML file (missing file: ConfigError naming it; unsafe owner or mode too)."""
    try:
        with path.open("rb") as src:
            _check_owner(path, os.fstat(src.fileno()))
            return tomllib.load(src)
    except FileNotFoundError:
        raise ConfigError(
            f"agent config {path} does not exist (run `ckms-agent enroll` first, or pass --config)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"agent config {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror}") from None


def _check_owner(path: Path, st: os.stat_result) -> None:
    """As root, refuse a config that another user owns or that group or others may write."""
    if os.geteuid() != 0:
        return
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise ConfigError(
            f"agent config {path} must be owned by root and writable by root only (owner uid "
            f"{st.st_uid}, mode {st.st_mode & 0o777:#o}): it decides what the agent does as root"
        )


def build_config(
    file_values: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    *,
    source: str = "config file",
) -> AgentConfig:
    """Merge file values and environment overrides (env wins) and validate once."""
    unknown = sorted(set(file_values) - _FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    env = env_overrides(os.environ if environ is None else environ)
    merged = {**file_values, **env}
    try:
        return AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, env_fields=set(env), source=source)) from None


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load the agent config from ``path`` (else ``$CKMS_AGENT_CONFIG``, else the default)."""
    env = os.environ if environ is None else environ
    if path is None:
        path = Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    config = build_config(read_config_file(path), env, source=str(path))
    try:
        config.check_allowed_excludes(path.absolute(), "this config file")
    except ValueError as exc:
        raise ConfigError(f"invalid agent config {path}: {exc}") from None
    return config


def _describe(exc: ValidationError, *, env_fields: set[str], source: str) -> str:
    """One line per bad field (at most three), naming where its value came from; no inputs."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        loc = [str(p) for p in err.get("loc", ())]
        field = loc[0] if loc else ""
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if not field:
            parts.append(f"{source}: {msg}")
        elif field in env_fields:
            parts.append(f"{ENV_PREFIX}{field.upper()}: {msg}")
        else:
            parts.append(f"{source}: {'.'.join(loc)}: {msg}")
    return "invalid agent config: " + "; ".join(parts)


def dump_toml(values: Mapping[str, Any]) -> str:
    """Write settings (scalars, lists, tables, one level of sub-tables) as TOML.

    The stdlib reads TOML but does not write it; the config is simple, so a small writer whose
    output ``tomllib`` reads back exactly is enough (JSON string escapes are valid TOML).
    """
    lines = ["# ckms-agent configuration, written by `ckms-agent enroll`. Pinned trust below:"]
    lines.append("# changing it by hand means trusting another controller. allowed_paths,")
    lines.append("# allowed_owners, allowed_groups and [hooks.<name>] are this host's policy.")
    tables: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.extend(_toml_table(name, value))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _toml_table(name: str, table: Mapping[str, Any]) -> list[str]:
    head = [f"\n[{name}]"]
    plain = [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in table.items() if not _nested(v)]
    out = head + plain if plain or not table else []
    for key, sub in table.items():
        if _nested(sub):
            out.append(f"\n[{name}.{_toml_str(key)}]")
            out.extend(
                f"{_toml_str(k)} = {_toml_value(v)}" for k, v in sub.items() if v is not None
            )
    return out


def _nested(value: Any) -> bool:
    return isinstance(value, Mapping)


def _toml_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _toml_str(str(value))


def write_config(path: Path, config: AgentConfig) -> None:
    """Write ``config`` as TOML, atomically and with mode 0600 (it names what this host trusts)."""
    values = config.model_dump(mode="json", exclude_defaults=False)
    data = dump_toml(values).encode()
    try:
        write_atomic(path, data, mode=0o600, dir_mode=0o755)
    except InstallError as exc:
        raise ConfigError(f"cannot write agent config: {exc}") from None
