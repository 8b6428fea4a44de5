"""How every ckms client reaches Kafka: mutual TLS by default, one place builds the context.

The controller, the agents and :class:`~ckms.consumer.Subscriber` all connect with a
:class:`KafkaLink` (bootstrap string + :class:`KafkaSecurity`). :meth:`KafkaSecurity.ssl_context`
is the only code that builds an :class:`ssl.SSLContext` for Kafka: it trusts only the CA bundle
given (never the system store: a public CA must not vouch for a broker), checks the broker's name,
and presents the client certificate whose subject the broker maps to a principal
(``CN=<name>,OU=ckms-agent`` → ``User:ckms-agent``, see :data:`PRINCIPAL_MAPPING_RULES`).

``SASL_SSL`` with SCRAM-SHA-512 is the alternative for clusters that already authenticate users
that way; the credentials come from a file (``username = ...`` / ``password = ...``), never from
the command line or the environment. ``PLAINTEXT`` exists only as an explicit development
setting and logs a warning whenever a client is built with it.
"""

from __future__ import annotations

import logging
import re
import ssl
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, model_validator

from ckms.errors import ConfigError

__all__ = [
    "PRINCIPAL_MAPPING_RULES",
    "KafkaLink",
    "KafkaProtocol",
    "KafkaSecurity",
    "ScramCredentials",
    "load_scram_credentials",
]

log = logging.getLogger(__name__)

SCRAM_MECHANISM: Final = "SCRAM-SHA-512"

PRINCIPAL_MAPPING_RULES: Final = ",".join(
    [
        *(
            # A CN without ',' or '\' (no escaped separator can smuggle a second OU in), then
            # exactly the role's OU: everything of a role is one principal.
            f"RULE:^CN=[^,\\\\]+,OU={role}$/{role}/"
            for role in ("ckms-agent", "ckms-controller", "ckms-subscriber", "ckms-broker")
        ),
        "DEFAULT",
    ]
)
"""Kafka's ``ssl.principal.mapping.rules`` for the ckms subject convention (as the value, before
properties-file escaping): any other subject keeps its full DN as principal, which no ACL names."""


class KafkaProtocol(StrEnum):
    """Kafka's ``security.protocol`` values ckms speaks."""

    SSL = "SSL"
    SASL_SSL = "SASL_SSL"
    PLAINTEXT = "PLAINTEXT"


@dataclass(frozen=True)
class ScramCredentials:
    """A SCRAM user and password read from a credentials file (the password never in a repr)."""

    username: str
    password: str = field(repr=False)


def load_scram_credentials(path: Path) -> ScramCredentials:
    """Read ``username`` and ``password`` from a TOML file; errors name the file, not the value."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"Kafka SASL credentials file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        # A TOML error can quote the offending line, which may be the password: say only where.
        decode = isinstance(exc, tomllib.TOMLDecodeError)
        line = re.search(r"line (\d+)", str(exc)) if decode else None
        where = f" (line {line.group(1)})" if line else ""
        raise ConfigError(f"cannot read Kafka SASL credentials file {path}{where}") from None
    username, password = data.get("username"), data.get("password")
    if set(data) - {"username", "password"}:
        raise ConfigError(f"{path}: only 'username' and 'password' belong in a credentials file")
    if not isinstance(username, str) or not username:
        raise ConfigError(f"{path}: 'username' must be a non-empty string")
    if not isinstance(password, str) or not password:
        raise ConfigError(f"{path}: 'password' must be a non-empty string")
    return ScramCredentials(username, password)


class KafkaSecurity(BaseModel):
    """How a client authenticates to the brokers and checks them (validated once, immutable).

    ``SSL`` (the default) needs ``ca_file`` (PEM bundle the broker's certificate must chain to),
    ``cert_file`` (the client's certificate, with its intermediates) and ``key_file``.
    ``SASL_SSL`` needs ``ca_file`` and ``sasl_file``; a client certificate is optional there.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: KafkaProtocol = KafkaProtocol.SSL
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    sasl_file: Path | None = None
    check_hostname: bool = True
    """Check the broker's certificate names the address dialled (its SAN); only a broker
    reached through an address its certificate cannot name (NAT, raw IPs) needs this off."""

    @model_validator(mode="after")
    def _complete(self) -> KafkaSecurity:
        if self.protocol is KafkaProtocol.PLAINTEXT:
            return self
        if self.ca_file is None:
            raise ValueError(f"Kafka {self.protocol} needs a CA bundle file (kafka_ca_file)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a Kafka client certificate needs both kafka_cert_file and key_file")
        if self.protocol is KafkaProtocol.SSL and self.cert_file is None:
            raise ValueError("Kafka SSL needs a client certificate (kafka_cert_file, key_file)")
        if self.protocol is KafkaProtocol.SASL_SSL and self.sasl_file is None:
            raise ValueError("Kafka SASL_SSL needs a credentials file (kafka_sasl_file)")
        return self

    @classmethod
    def from_settings(
        cls,
        *,
        protocol: KafkaProtocol,
        directory: Path,
        default_ca: Path | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        sasl_file: Path | None = None,
        check_hostname: bool = True,
    ) -> KafkaSecurity:
        """The controller's and the agent's settings, with unset files in ``directory``.

        Defaults: ``default_ca`` (else ``ca.pem`` in ``directory``), ``client.pem`` and
        ``client.key`` in ``directory`` (for SSL; under SASL_SSL the client certificate is used
        only when set); relative paths are relative to the directory's parent (the controller's
        home, the agent's state dir).
        """
        base = directory.parent

        def place(value: Path | None, default: str | None) -> Path | None:
            if value is None:
                return directory / default if default is not None else None
            return value if value.is_absolute() else base / value

        ssl_client = protocol is KafkaProtocol.SSL
        return cls(
            protocol=protocol,
            ca_file=place(ca_file, "ca.pem") if ca_file or default_ca is None else default_ca,
            cert_file=place(cert_file, "client.pem" if ssl_client else None),
            key_file=place(key_file, "client.key" if ssl_client else None),
            sasl_file=place(sasl_file, None),
            check_hostname=check_hostname,
        )

    @classmethod
    def plaintext(cls) -> KafkaSecurity:
        """The development setting: no encryption, no authentication (warns when used)."""
        return cls(protocol=KafkaProtocol.PLAINTEXT)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for the brokers: only ``ca_file`` is trusted, TLS 1.2 or newer.

        Built anew for every client so a renewed certificate file is picked up at the next
        connection.
        """
        if self.protocol is KafkaProtocol.PLAINTEXT or self.ca_file is None:
            raise ConfigError("a plaintext Kafka link has no TLS context")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"Kafka TLS file {path} does not exist")
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = self.check_hostname
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.ca_file))
            if self.cert_file is not None and self.key_file is not None:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (ssl.SSLError, OSError) as exc:
            # ssl's messages name the failing step, never key bytes.
            raise ConfigError(f"cannot load the Kafka TLS files: {exc}") from None
        return context

    def client_args(self) -> dict[str, Any]:
        """The aiokafka keyword arguments for this security setting."""
        if self.protocol is KafkaProtocol.PLAINTEXT:
            return {"security_protocol": "PLAINTEXT"}  # check() warned at start
        args: dict[str, Any] = {
            "security_protocol": str(self.protocol),
            "ssl_context": self.ssl_context(),
        }
        if self.protocol is KafkaProtocol.SASL_SSL:
            assert self.sasl_file is not None
            creds = load_scram_credentials(self.sasl_file)
            args |= {
                "sasl_mechanism": SCRAM_MECHANISM,
                "sasl_plain_username": creds.username,
                "sasl_plain_password": creds.password,
            }
        return args

    def check(self) -> None:
        """Load every file once now, so a bad setting fails at start, not at first connect."""
        if self.protocol is KafkaProtocol.PLAINTEXT:
            log.warning(
                "Kafka is PLAINTEXT: anyone on the network can read and write the ckms topics "
                "(a development setting; use SSL)"
            )
            return
        self.ssl_context()
        if self.sasl_file is not None:
            load_scram_credentials(self.sasl_file)


@dataclass(frozen=True)
class KafkaLink:
    """Where the brokers are and how to talk to them; what every ckms Kafka client is built from."""

    bootstrap: str
    security: KafkaSecurity

    def client_args(self, **extra: Any) -> dict[str, Any]:
        """``bootstrap_servers`` and the security arguments, plus ``extra``, for aiokafka."""
        return {"bootstrap_servers": self.bootstrap, **self.security.client_args(), **extra}

    def __str__(self) -> str:
        return f"{self.bootstrap} ({self.security.protocol})"
