"""The agent test harness: a small controller on a real ``RpcServer`` (port 0) serving an
in-memory desired state and real ``wrap_for_agent`` blobs, a real signing key for events, and
the session's real Kafka broker. The full controller's end-to-end tests come separately; this
is just enough of the agent RPC contract (enroll, sync, heartbeat, fetch, ack) to drive the real
``Agent``. Acks the agent sends are kept as they came (``AckReader``) and confirmed.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
from aiokafka import AIOKafkaProducer

from ckms._kafka_security import KafkaLink
from ckms.crypto import (
    KeyType,
    WrapSuite,
    generate,
    generate_signing_key,
    material_digest,
    signer_key_id,
    signing_public_key,
    wrap_for_agent,
)
from ckms.errors import NotFoundError, PermissionDeniedError
from ckms.protocol import (
    DIGEST_KEY_WRAP_NAME,
    DIGEST_KEY_WRAP_VERSION,
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    AckReply,
    AckRequest,
    DesiredKey,
    DesiredVersion,
    EnrollReply,
    EnrollRequest,
    Envelope,
    EventType,
    FetchReply,
    FetchRequest,
    HeartbeatReply,
    InstallSpec,
    SignedMessage,
    SyncReply,
    SyncRequest,
    Targets,
    encode_event,
    format_time,
    trust_keys,
    verify_message,
)
from ckms.ssh import Principal, RpcServer, fingerprint, generate_ssh_key, public_key_text
from ckms_agent.config import AgentConfig, load_config, read_config_file, write_config
from tests.support.waiting import wait_until

TOKEN = "enroll-token-0123456789"
HOST = "web-1"
LABELS = {"env": "test", "role": "web"}
DIGEST_KEY = bytes(range(32))
"""The fake controller's fleet digest key (the real one derives it from its root KEK)."""

FAST = {
    "CKMS_AGENT_HEARTBEAT_INTERVAL_S": "1",
    "CKMS_AGENT_RECONNECT_BACKOFF_MIN_S": "0.1",
    "CKMS_AGENT_RECONNECT_BACKOFF_MAX_S": "0.5",
    "CKMS_AGENT_KAFKA_FETCH_MAX_WAIT_MS": "200",
    "CKMS_AGENT_RPC_TIMEOUT_S": "5",
}
"""Environment overrides that make the agent quick enough for tests (also exercises env > file)."""

ALLOWED = ("/etc/ckms", "/keys", "/var/lib/ckms/keys")
"""The install roots the test hosts allow (their configs say so, as a host's admin would)."""


@dataclass
class FakeVersion:
    material: bytes = field(repr=False)
    state: str = "Active"
    primary: bool = False

    @property
    def digest(self) -> str:
        return material_digest(DIGEST_KEY, self.material)


@dataclass
class FakeKey:
    name: str
    key_type: str
    install: InstallSpec
    targets: Targets
    versions: dict[int, FakeVersion] = field(default_factory=dict)
    max_staleness_s: int | None = None


@dataclass
class FakeHost:
    identity: str
    wrapping: bytes
    suite: str
    labels: dict[str, str]


class FakeController:
    """The controller side of the agent RPC contract, in memory."""

    def __init__(self, kafka: KafkaLink, events_topic: str) -> None:
        self.kafka = kafka
        self.bootstrap = kafka.bootstrap
        self.events_topic = events_topic
        self.received_acks: list[tuple[bytes, list[tuple[str, bytes]]]] = []
        """Every ack the agent sent, as it came (value, signature headers), in arrival order."""
        self.refuse_acks = False
        """While set, ``ack`` requests fail (the agent must keep its acks queued)."""
        self.host_key = generate_ssh_key()
        self.signing_key = generate_signing_key()
        self.hosts: dict[str, FakeHost] = {}
        self.keys: dict[str, FakeKey] = {}
        self.corrupt: set[tuple[str, int]] = set()
        self.calls: list[tuple[str, str]] = []
        self.heartbeats: list[SyncRequest] = []
        self.seq = 0
        self.rpc: RpcServer | None = None
        self.port = 0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.host_key)

    async def start(self) -> None:
        rpc = RpcServer(host_key=self.host_key, authenticate=self._authenticate)
        rpc.route("enroll", self._enroll, roles={"enroll"})
        rpc.route("sync", self._sync, roles={"agent"})
        rpc.route("heartbeat", self._heartbeat, roles={"agent"})
        rpc.route("fetch", self._fetch, roles={"agent"})
        rpc.route("ack", self._ack, roles={"agent"})
        await rpc.start("127.0.0.1", self.port)
        self.rpc = rpc
        self.port = rpc.port or 0

    async def stop(self) -> None:
        if self.rpc is not None:
            await self.rpc.close()
            self.rpc = None

    async def _authenticate(self, username: str, key: asyncssh.SSHKey) -> Principal | None:
        text = public_key_text(key)
        if username == "enroll":
            return Principal("enroll", "enroll", fingerprint(key), text)
        host = self.hosts.get(username)
        if host is not None and host.identity == text:
            return Principal(username, "agent", fingerprint(key), text)
        return None

    async def _enroll(self, principal: Principal, params: dict[str, Any]) -> EnrollReply:
        request = EnrollRequest.model_validate(params)
        if request.token.get_secret_value() != TOKEN:
            raise PermissionDeniedError("enrollment token is not valid")
        if request.identity_key.split()[:2] != principal.public_key.split()[:2]:
            raise PermissionDeniedError("identity key is not the key of this connection")
        self.hosts[HOST] = FakeHost(
            identity=principal.public_key,
            wrapping=base64.b64decode(request.wrapping_key),
            suite=request.wrap_suite,
            labels=LABELS,
        )
        public = signing_public_key(self.signing_key)
        return EnrollReply(
            host=HOST,
            labels=LABELS,
            controller_signing_key=base64.b64encode(public).decode(),
            controller_key_id=signer_key_id(public),
            kafka_bootstrap=self.bootstrap,
            events_topic=self.events_topic,
            digest_key=base64.b64encode(
                wrap_for_agent(
                    base64.b64decode(request.wrapping_key),
                    DIGEST_KEY,
                    key_name=DIGEST_KEY_WRAP_NAME,
                    version=DIGEST_KEY_WRAP_VERSION,
                    agent_id=HOST,
                    suite=WrapSuite(request.wrap_suite),
                )
            ).decode(),
        )

    async def _ack(self, principal: Principal, params: dict[str, Any]) -> AckReply:
        """Keep the acks as sent and confirm them all (the real controller verifies them;
        tests here verify what the agent signed)."""
        request = AckRequest.model_validate(params)
        self.calls.append(("ack", principal.name))
        if self.refuse_acks:
            raise PermissionDeniedError("acks refused for this test")
        seqs = []
        for signed in request.acks:
            value = base64.b64decode(signed.value)
            headers = [
                (SIGNATURE_HEADER, base64.b64decode(signed.sig)),
                (KEY_ID_HEADER, signed.kid.encode()),
            ]
            self.received_acks.append((value, headers))
            seqs.append(json.loads(value)["seq"])
        return AckReply(applied=tuple(seqs))

    def desired_for(self, host: str) -> tuple[DesiredKey, ...]:
        labels = self.hosts[host].labels
        out = []
        for key in sorted(self.keys.values(), key=lambda k: k.name):
            if not key.targets.matches(host, labels) or not key.versions:
                continue
            versions = tuple(
                DesiredVersion(version=n, state=v.state, primary=v.primary, digest=v.digest)
                for n, v in sorted(key.versions.items())
            )
            out.append(
                DesiredKey(
                    key=key.name,
                    key_type=key.key_type,
                    install=key.install,
                    versions=versions,
                    max_staleness_s=key.max_staleness_s,
                )
            )
        return tuple(out)

    async def _sync(self, principal: Principal, params: dict[str, Any]) -> SyncReply:
        SyncRequest.model_validate(params)
        self.calls.append((principal.name, "sync"))
        return SyncReply(
            host=principal.name,
            keys=self.desired_for(principal.name),
            controller_time=format_time(datetime.now(UTC)),
        )

    async def _heartbeat(self, principal: Principal, params: dict[str, Any]) -> HeartbeatReply:
        self.heartbeats.append(SyncRequest.model_validate(params))
        self.calls.append((principal.name, "heartbeat"))
        return HeartbeatReply(controller_time=format_time(datetime.now(UTC)))

    async def _fetch(self, principal: Principal, params: dict[str, Any]) -> FetchReply:
        request = FetchRequest.model_validate(params)
        self.calls.append((principal.name, "fetch"))
        key = self.keys.get(request.key)
        host = self.hosts[principal.name]
        if key is None or request.version not in key.versions:
            raise NotFoundError(f"{request.key} v{request.version} does not exist")
        version = key.versions[request.version]
        material = version.material
        if (request.key, request.version) in self.corrupt:
            material = generate(KeyType(key.key_type))  # not what the digest names
        blob = wrap_for_agent(
            host.wrapping,
            material,
            key_name=request.key,
            version=request.version,
            agent_id=principal.name,
        )
        return FetchReply(
            key=request.key,
            version=request.version,
            digest=version.digest,
            suite=host.suite,
            wrapped=base64.b64encode(blob).decode(),
        )

    # -- test-side operations ---------------------------------------------------------------

    def add_key(
        self,
        name: str,
        *,
        install: InstallSpec,
        key_type: str = "aes-256",
        targets: Targets | None = None,
        max_staleness_s: int | None = None,
    ) -> FakeKey:
        key = FakeKey(
            name=name,
            key_type=key_type,
            install=install,
            targets=targets or Targets(selectors=({"role": "web"},)),
            max_staleness_s=max_staleness_s,
        )
        key.versions[1] = FakeVersion(generate(KeyType(key_type)), primary=True)
        self.keys[name] = key
        return key

    def rotate(self, name: str) -> int:
        key = self.keys[name]
        for v in key.versions.values():
            v.primary = False
        version = max(key.versions) + 1
        key.versions[version] = FakeVersion(generate(KeyType(key.key_type)), primary=True)
        return version

    def primary(self, name: str) -> int | None:
        return next((n for n, v in self.keys[name].versions.items() if v.primary), None)

    def event(self, etype: EventType, data: dict[str, Any], signer: bytes | None = None):
        self.seq += 1
        return encode_event(
            etype,
            data,
            seq=self.seq,
            signing_key=signer or self.signing_key,
            at=datetime.now(UTC),
        )

    def rotated_event(self, name: str, version: int) -> SignedMessage:
        key = self.keys[name]
        v = key.versions[version]
        return self.event(
            EventType.KEY_ROTATED,
            {
                "key": name,
                "key_id": "kid-" + name.replace("/", "-"),
                "type": key.key_type,
                "version": version,
                "state": v.state,
                "digest": v.digest,
                "primary": self.primary(name),
                "targets": key.targets.model_dump(mode="json"),
                "install": key.install.model_dump(mode="json"),
            },
        )

    def revoked_event(
        self, name: str, version: int, *, signer: bytes | None = None
    ) -> SignedMessage:
        return self.event(
            EventType.KEY_REVOKED,
            {
                "key": name,
                "key_id": "kid-" + name.replace("/", "-"),
                "version": version,
                "from": "Active",
                "to": "Compromised",
                "reason": "keyCompromise",
                "compromise": True,
                "primary": self.primary(name),
            },
            signer=signer,
        )

    async def publish(self, *messages: SignedMessage) -> None:
        producer = AIOKafkaProducer(**self.kafka.client_args(acks="all", enable_idempotence=True))
        await producer.start()
        try:
            for msg in messages:
                await producer.send_and_wait(
                    self.events_topic, msg.value, key=msg.key, headers=list(msg.headers)
                )
        finally:
            await producer.stop()


class AckReader:
    """Every ack the agent sent the fake controller, verified with the agent's identity key."""

    def __init__(self, controller: FakeController) -> None:
        self.controller = controller
        self.acks: list[Envelope] = []

    @property
    def raw(self) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
        """The acks exactly as they arrived (value, signature headers)."""
        return self.controller.received_acks

    async def poll(self, trust: bytes) -> list[Envelope]:
        self.acks = [
            verify_message(value, headers, trust_keys([trust]), types={EventType.ACK})
            for value, headers in self.raw
        ]
        return self.acks

    async def wait_for(
        self, trust: bytes, match: Callable[[Envelope], bool], timeout_s: float = 30.0
    ) -> Envelope:
        async def found() -> Envelope | None:
            await self.poll(trust)
            return next((a for a in self.acks if match(a)), None)

        return await wait_until(found, timeout_s, "an ack")


@dataclass
class World:
    """Everything one agent test needs: controller, topics, paths, and the enrolled config."""

    controller: FakeController
    ack_reader: AckReader
    tmp: Path
    config_path: Path
    root: Path

    def config(self, **env: str) -> AgentConfig:
        return load_config(self.config_path, environ={**FAST, **env})

    def host_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def set_policy(self, **values: Any) -> None:
        """Change the host's own policy in its config file, as the host's admin would."""
        current = read_config_file(self.config_path)
        write_config(self.config_path, AgentConfig.model_validate({**current, **values}))

    def agent_public(self) -> bytes:
        seed = (self.tmp / "state" / "identity.key").read_bytes()
        return signing_public_key(seed)

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CKMS_AGENT_")}
        return {**base, **FAST, "CKMS_AGENT_CONFIG": str(self.config_path), **extra}
