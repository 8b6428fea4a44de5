"""Enrollment: make this host's keys, present them once with a one-time token, pin the answer.

The agent makes its Ed25519 identity and HPKE wrapping key, connects as user ``enroll`` with
the new identity (pinning the controller's SSH host key by the fingerprint the operator gave),
and calls ``enroll``. The reply names the host id, its labels, the controller's event-signing
key, the Kafka settings and the controller's last event ``seq`` (events at or below it predate
this enrollment and are dropped); all of it is pinned in the config file (mode 0600). Keys and
config are written only after the controller accepted the token, so a refused attempt leaves
nothing behind; an existing enrollment is never overwritten without ``force``. The host's own
policy (allowed paths, owners, hooks) never comes from the controller: it is what the host's
admin passes here, and a re-enrollment keeps whatever the existing config file says.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ckms.crypto import KeyType, WrapSuite, build_csr, generate, signing_public_openssh
from ckms.errors import AlreadyExistsError, ConfigError, ProtocolError
from ckms.protocol import EnrollReply, EnrollRequest
from ckms.ssh import Endpoint, RpcClient, parse_endpoints
from ckms_agent.certs import save_client_certificate
from ckms_agent.config import (
    CA_BUNDLE_FILE,
    DIGEST_KEY_FILE,
    IDENTITY_KEY_FILE,
    KAFKA_CLIENT_CERT_FILE,
    KAFKA_CLIENT_KEY_FILE,
    KAFKA_DIR,
    KAFKA_LOCAL_FIELDS,
    POLICY_FIELDS,
    STATE_DB_FILE,
    WRAPPING_KEY_FILE,
    AgentConfig,
    read_config_file,
    write_config,
)
from ckms_agent.files import secure_remove, sweep_temp_files, write_atomic
from ckms_agent.identity import AgentKeys, create_keys, save_digest_key, unwrap_digest_key
from ckms_agent.state import AgentState

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"


def parse_controllers(text: str) -> tuple[Endpoint, ...]:
    """``HOST:PORT``, or several separated by commas (replicas); ValueError if malformed."""
    try:
        return parse_endpoints(text)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _controller_settings(controllers: Sequence[Endpoint]) -> dict[str, Any]:
    """How the config names the controller: host and port for one, a list for several."""
    if len(controllers) == 1:
        return {"controller_host": controllers[0].host, "controller_port": controllers[0].port}
    return {"controller": tuple(str(e) for e in controllers)}


async def enroll(
    *,
    controller_host: str | None = None,
    controller_port: int = 2222,
    controllers: Sequence[Endpoint] = (),
    token: str,
    host_key_fingerprint: str,
    state_dir: Path,
    config_path: Path,
    root: Path | None = None,
    force: bool = False,
    wrap_suite: WrapSuite = WrapSuite.X25519,
    connect_timeout_s: float = 10.0,
    policy: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Enroll this host with the controller and write its keys and config; return the config.

    ``controllers`` names several replicas instead of ``controller_host``/``controller_port``
    (enrollment goes to the first that answers; the config keeps them all).
    ``policy`` sets host-policy settings (:data:`~ckms_agent.config.POLICY_FIELDS`); the rest
    of the host policy comes from the existing config file, else the defaults.
    """
    if controller_host is not None:
        controllers = (Endpoint(controller_host, controller_port), *controllers)
    if not controllers:
        raise ConfigError("enrollment needs the controller's address")
    if not 16 <= len(token) <= 256:
        raise ConfigError("the enrollment token must be 16 to 256 characters")
    unknown = sorted(set(policy or {}) - set(POLICY_FIELDS))
    if unknown:
        raise ConfigError(f"not host-policy settings: {', '.join(unknown)}")
    host_policy = {**_existing_policy(config_path), **(policy or {})}
    state_dir, root = _absolute(state_dir), _absolute(root) if root is not None else None
    identity_path = state_dir / IDENTITY_KEY_FILE
    wrapping_path = state_dir / WRAPPING_KEY_FILE
    if not force:
        _refuse_existing(config_path, identity_path)
    staged = state_dir / ".enroll-staging"
    keys = create_keys(staged / IDENTITY_KEY_FILE, staged / WRAPPING_KEY_FILE, wrap_suite)
    kafka_key = generate(KeyType.ECDSA_P256)  # made here; only its CSR goes to the controller
    try:
        reply = await _call_enroll(
            keys,
            kafka_csr=build_csr(kafka_key, None).decode("ascii"),
            endpoints=controllers,
            token=token,
            fingerprint=host_key_fingerprint,
            timeout_s=connect_timeout_s,
        )
        try:
            config = AgentConfig(
                host_id=reply.host,
                labels=reply.labels,
                **_controller_settings(controllers),
                host_key_fingerprint=host_key_fingerprint,
                controller_signing_key=reply.controller_signing_key,
                controller_key_id=reply.controller_key_id,
                kafka_bootstrap=reply.kafka_bootstrap,
                events_topic=reply.events_topic,
                event_seq_floor=reply.event_seq,
                state_dir=state_dir,
                root=root,
                wrap_suite=wrap_suite,
                **host_policy,
            )
        except ValidationError as exc:
            bad = {str(e["loc"][0]) for e in exc.errors(include_input=False) if e.get("loc")}
            if bad & set(POLICY_FIELDS):
                raise ConfigError(
                    f"invalid host policy ({', '.join(sorted(bad & set(POLICY_FIELDS)))})"
                ) from None
            fields = ", ".join(
                str(e["loc"][0]) if e.get("loc") else "reply"
                for e in exc.errors(include_input=False)
            )
            raise ProtocolError(
                f"the controller's enrollment reply is unusable ({fields})"
            ) from None
        digest_key = unwrap_digest_key(keys.wrapping, reply.digest_key, host_id=reply.host)
        # Accepted: move the keys into place, then write the config (the "enrolled" marker).
        write_atomic(identity_path, keys.identity, mode=0o600, dir_mode=0o700)
        write_atomic(wrapping_path, keys.wrapping, mode=0o600, dir_mode=0o700)
        save_digest_key(state_dir / DIGEST_KEY_FILE, digest_key)
        del digest_key
        if reply.ca_bundle:
            write_atomic(
                state_dir / CA_BUNDLE_FILE, reply.ca_bundle.encode(), mode=0o644, dir_mode=0o700
            )
            if reply.kafka_certificate:
                save_client_certificate(
                    state_dir / KAFKA_DIR / KAFKA_CLIENT_CERT_FILE,
                    state_dir / KAFKA_DIR / KAFKA_CLIENT_KEY_FILE,
                    kafka_key,
                    reply.kafka_certificate,
                    reply.ca_bundle,
                )
        del kafka_key
    finally:
        _discard(staged)
    if (state_dir / STATE_DB_FILE).exists():
        # A re-enrolled host starts clean: not revoked, no positions; the replay floor in the
        # new config drops every event from before this enrollment.
        async with AgentState(state_dir / STATE_DB_FILE) as state:
            await state.set_revoked(False)
            await state.reset_positions()
    write_config(config_path, config)
    log.info("enrolled host=%s labels=%s config=%s", config.host_id, config.labels, config_path)
    return config


def _existing_policy(config_path: Path) -> dict[str, Any]:
    """The host-policy and Kafka-access settings of an existing config file (none if no file)."""
    if not config_path.exists():
        return {}
    values = read_config_file(config_path)
    return {k: values[k] for k in (*POLICY_FIELDS, *KAFKA_LOCAL_FIELDS) if k in values}


def _absolute(path: Path) -> Path:
    return path.absolute()


def _refuse_existing(config_path: Path, identity_path: Path) -> None:
    if config_path.exists() or identity_path.exists():
        raise AlreadyExistsError(
            f"this host is already enrolled (config {config_path}, keys in "
            f"{identity_path.parent}); pass --force to enroll again with new keys"
        )


def _discard(staged: Path) -> None:
    """Remove the staging copies of the keys (overwritten first, like any key file)."""
    for leftover in (staged / IDENTITY_KEY_FILE, staged / WRAPPING_KEY_FILE):
        secure_remove(leftover)
    sweep_temp_files(staged)
    with contextlib.suppress(OSError):
        staged.rmdir()


async def _call_enroll(
    keys: AgentKeys,
    *,
    endpoints: Sequence[Endpoint],
    token: str,
    fingerprint: str,
    timeout_s: float,
    kafka_csr: str | None = None,
) -> EnrollReply:
    request = EnrollRequest(
        token=token,
        identity_key=signing_public_openssh(keys.identity_public),
        signing_key=base64.b64encode(keys.identity_public).decode(),
        wrapping_key=base64.b64encode(keys.wrapping_public).decode(),
        wrap_suite=str(keys.suite),
        agent_version=AGENT_VERSION,
        kafka_csr=kafka_csr,
    )
    client = RpcClient(
        endpoints=endpoints,
        username="enroll",
        client_key=keys.ssh_key(),
        host_key_fingerprint=fingerprint,
        connect_timeout_s=timeout_s,
    )
    async with client:
        raw = await client.call("enroll", request.model_dump(mode="json"))
    try:
        return EnrollReply.model_validate(raw)
    except ValidationError:
        raise ProtocolError("the controller sent a malformed enrollment reply") from None
