"""A real, local Apache Kafka 4.x for tests, the demo and benchmarks.

``LocalKafka`` runs one KRaft node (broker and controller roles in one JVM, no ZooKeeper) or a
3-node cluster on free loopback ports, with its data in a temporary directory. By default every
listener is mutual TLS (``ssl.client.auth=required``) with certificates from a test CA the
launcher makes in its data dir (:class:`DevCA`), KRaft's ``StandardAuthorizer`` and the ckms
ACLs (:mod:`ckms._kafka_acls`) created at start, so a client needs a certificate of the right
role to do anything::

    async with LocalKafka() as kafka:
        link = kafka.link(SubjectRole.CONTROLLER, "controller")   # cert files issued on demand
        producer = AIOKafkaProducer(**link.client_args())

``sasl=True`` adds a ``SASL_SSL`` listener (SCRAM-SHA-512, no client certificate) with one user
per role (:meth:`LocalKafka.sasl_link`); ``tls=False`` is the plaintext development setting and
logs a warning.

    async with LocalKafka(nodes=3) as cluster:      # replication 3, min.insync.replicas 2
        await cluster.stop_node(1)                  # the other two keep serving
        await cluster.start_node(1)

The broker's jars are fetched from Maven Central by Maven, once, into a per-user cache
(``~/.cache/ckms`` or ``$CKMS_CACHE_DIR``), using the description in ``deploy/kafka/pom.xml``;
later runs reuse the cache and need no network. Each node writes its log to
``<data dir>/node-<i>/broker.log``; every error names that file. From a shell::

    python -m ckms.devkafka up [--nodes 3]     # prints the bootstrap string, returns
    python -m ckms.devkafka client agent host-1 DIR   # ca.pem, client.pem, client.key for a role
    python -m ckms.devkafka down
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType

from ckms._kafka_acls import Pattern, ckms_acls, create_acls
from ckms._kafka_security import (
    PRINCIPAL_MAPPING_RULES,
    SCRAM_MECHANISM,
    KafkaLink,
    KafkaProtocol,
    KafkaSecurity,
    load_scram_credentials,
)
from ckms._localproc import die_with_parent, free_port, pid_alive
from ckms.crypto import (
    CertificateAuthority,
    CertUsage,
    SubjectRole,
    issue_certificate,
    join_certificates,
    new_ca_key,
    new_intermediate_ca,
    new_root_ca,
    private_key_pem,
    public_key_of,
    subject_for,
)
from ckms.errors import CKMSError, ConfigError, DependencyMissingError, KafkaUnavailableError

__all__ = ["KAFKA_VERSION", "DevCA", "LocalKafka", "ensure_kafka_jars", "kafka_cache_dir"]

log = logging.getLogger(__name__)

#: The Apache Kafka release the launcher runs; keep in step with deploy/kafka/pom.xml and
#: compose.yaml's apache/kafka image.
KAFKA_VERSION = "4.1.1"

_STOP_GRACE_S = 20.0  # a clean KRaft shutdown takes 1-5 s; past this the node is killed
_POM_IN_REPO = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"

_LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


def kafka_cache_dir() -> Path:
    """Return the per-user cache directory that holds the broker jars (outside any repo)."""
    explicit = os.environ.get("CKMS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ckms"


def _java_command() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise DependencyMissingError(
            "Java 17 or newer is needed to run the local Kafka broker, and no `java` was found "
            "on PATH (or in $JAVA_HOME): install a JDK 17+ (e.g. `apt-get install openjdk-17-jdk`)"
        )
    return found


def _check_java(java: str) -> None:
    proc = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    text = proc.stderr + proc.stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if proc.returncode != 0 or not match:
        raise DependencyMissingError(
            f"`{java} -version` failed; install a JDK 17+ (e.g. `apt-get install openjdk-17-jdk`)"
        )
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < 17:
        raise DependencyMissingError(
            f"Kafka {KAFKA_VERSION} needs Java 17 or newer, but {java} is Java {major}: "
            "install a JDK 17+ or point JAVA_HOME at one"
        )


def _pom_path() -> Path:
    if _POM_IN_REPO.exists():
        return _POM_IN_REPO
    packaged = resources.files("ckms") / "_data" / "kafka-pom.xml"
    if packaged.is_file():
        return Path(str(packaged))
    raise ConfigError("the Kafka Maven description (deploy/kafka/pom.xml) is missing")


def ensure_kafka_jars(cache_dir: Path | None = None) -> Path:
    """Return the directory of the broker jars, fetching them with Maven on first use.

    The download runs once per cache directory; a marker file written after an atomic rename
    makes a half-finished download invisible to later runs.
    """
    root = (cache_dir or kafka_cache_dir()) / f"kafka-{KAFKA_VERSION}"
    libs = root / "libs"
    marker = root / "libs.complete"
    if marker.exists() and libs.is_dir():
        return libs
    _check_java(_java_command())
    mvn = shutil.which("mvn")
    if not mvn:
        raise DependencyMissingError(
            "Maven is needed once to fetch the Kafka broker jars from Maven Central, and no "
            "`mvn` was found on PATH: install Maven 3.6+ (e.g. `apt-get install maven`)"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=root))
    fetch_log = root / "maven-fetch.log"
    started = time.monotonic()
    print(
        f"ckms: fetching Apache Kafka {KAFKA_VERSION} jars with Maven (first run only)...",
        file=sys.stderr,
        flush=True,
    )
    with fetch_log.open("w") as out:
        proc = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(_pom_path()),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
                f"-Dmaven.repo.local={root.parent / 'm2'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise KafkaUnavailableError(
            f"Maven could not fetch the Kafka {KAFKA_VERSION} jars (exit {proc.returncode}); "
            f"see {fetch_log}"
        )
    if libs.exists():
        shutil.rmtree(libs)
    staging.rename(libs)
    marker.write_text(KAFKA_VERSION + "\n")
    print(
        f"ckms: Kafka jars cached in {libs} ({time.monotonic() - started:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return libs


def _new_cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding. Like Kafka's
    # Uuid.randomUuid(), never one that starts with '-': `kafka-storage format -t -xyz...` reads
    # it as an option and fails (1 start in 64 otherwise).
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


_DEV_CA_LIFETIME = dt.timedelta(days=365)
_DEV_LEAF_LIFETIME = dt.timedelta(days=30)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private file (0600) atomically: a reader never sees half a key."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


class DevCA:
    """A test CA in a directory (root + intermediate, ECDSA P-256) issuing role certificates.

    For development and tests only: its keys sit unsealed in ``directory`` (mode 0700/0600).
    ``ca.pem`` is the root to trust; leaves are written with the intermediate as their chain.
    An existing CA in ``directory`` is loaded, so a kept data dir keeps its certificates.
    """

    def __init__(self, directory: Path, *, name: str = "ckms dev") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        root_key, inter_key = self.directory / "root.key", self.directory / "intermediate.key"
        inter_pem = self.directory / "intermediate.pem"
        if root_key.exists() and inter_key.exists():
            self._root = CertificateAuthority(root_key.read_bytes(), self.ca_file.read_bytes())
            self._issuer = CertificateAuthority(inter_key.read_bytes(), inter_pem.read_bytes())
            return
        self._root = new_root_ca(f"{name} root", lifetime=_DEV_CA_LIFETIME)
        self._issuer = new_intermediate_ca(
            self._root, f"{name} intermediate", lifetime=_DEV_CA_LIFETIME
        )
        _write_private(root_key, self._root.key)
        _write_private(inter_key, self._issuer.key)
        inter_pem.write_bytes(self._issuer.certificate)
        self.ca_file.write_bytes(self._root.certificate)

    @property
    def ca_file(self) -> Path:
        """The root certificate (PEM) brokers and clients trust."""
        return self.directory / "ca.pem"

    def issue(
        self,
        role: SubjectRole,
        name: str,
        *,
        usage: CertUsage = CertUsage.CLIENT,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        directory: Path | None = None,
    ) -> tuple[Path, Path]:
        """Issue ``CN=<name>,OU=<role>``; return the (chain file, key file) written."""
        out = Path(directory) if directory is not None else self.directory / "issued"
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = f"{SubjectRole(role).value}-{name}"
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        key = new_ca_key()  # an ECDSA P-256 PKCS#8 key, as the recipe names it
        cert = issue_certificate(
            self._issuer,
            public_key_of(key),
            subject_for(role, name),
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            lifetime=_DEV_LEAF_LIFETIME,
            usage=usage,
        )
        _write_private(key_path, private_key_pem(key))
        cert_path.write_bytes(join_certificates(cert, self._issuer.certificate))
        return cert_path, key_path

    def security(self, role: SubjectRole, name: str) -> KafkaSecurity:
        """Client TLS settings for ``name`` in ``role`` (its certificate issued on first use)."""
        cert, key = self.issue(role, name)
        return KafkaSecurity(ca_file=self.ca_file, cert_file=cert, key_file=key)

    def install(self, role: SubjectRole, name: str, directory: Path) -> KafkaSecurity:
        """Write ``ca.pem``, ``client.pem`` and ``client.key`` (0600) for ``name`` in ``role``
        into ``directory``: where the controller (``<home>/kafka``) and an agent
        (``<state_dir>/kafka``) look by default."""
        issued = self.security(role, name)
        assert issued.cert_file is not None and issued.key_file is not None
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        (target / "ca.pem").write_bytes(self.ca_file.read_bytes())
        (target / "client.pem").write_bytes(issued.cert_file.read_bytes())
        _write_private(target / "client.key", issued.key_file.read_bytes())
        return KafkaSecurity(
            ca_file=target / "ca.pem",
            cert_file=target / "client.pem",
            key_file=target / "client.key",
        )


@dataclass
class _Node:
    index: int
    broker_port: int
    controller_port: int
    directory: Path
    sasl_port: int | None = None
    process: asyncio.subprocess.Process | subprocess.Popen[bytes] | None = None
    log_handle: object | None = field(default=None, repr=False)

    @property
    def node_id(self) -> int:
        return self.index + 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def sasl_address(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "broker.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        if self.process is None:
            return False
        return self.process.returncode is None


class LocalKafka:
    """One KRaft node or a 3-node cluster of real Apache Kafka, on loopback, for tests and demos.

    ``nodes=3`` gives three combined broker+controller nodes with replication factor 3 and
    ``min.insync.replicas=2``, so one node can be stopped while the others keep serving.
    ``tls=True`` (the default): mutual TLS on every listener, the ``StandardAuthorizer`` and the
    ckms ACLs for every topic under the ckms topic names (``ckms.events...``, prefixed, so tests
    can use unique topics); ``sasl=True`` adds a SCRAM-SHA-512 ``SASL_SSL`` listener.
    """

    def __init__(
        self,
        nodes: int = 1,
        *,
        data_dir: Path | None = None,
        keep_data: bool = False,
        cache_dir: Path | None = None,
        startup_timeout: float = 90.0,
        heap: str = "512m",
        detach: bool = False,
        tls: bool = True,
        sasl: bool = False,
    ) -> None:
        if nodes not in (1, 3):
            raise ConfigError(f"LocalKafka runs 1 node or a 3-node cluster, not {nodes}")
        if sasl and not tls:
            raise ConfigError("LocalKafka's SASL listener is SASL_SSL: it needs tls=True")
        self.tls = tls
        self.sasl = sasl
        self._ca: DevCA | None = None
        self._sasl_files: dict[str, Path] = {}
        self.node_count = nodes
        self.keep_data = keep_data or data_dir is not None
        self._data_dir_arg = data_dir
        self._cache_dir = cache_dir
        self.startup_timeout = startup_timeout
        self._heap = heap
        self._detach = detach
        self._nodes: list[_Node] = []
        self._libs: Path | None = None
        self.data_dir: Path | None = None
        self.cluster_id = _new_cluster_id()
        #: Seconds from launching the JVMs to a client fetching metadata, for the last start.
        self.startup_seconds: float | None = None

    # -- public surface ------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The ``host:port[,host:port]`` bootstrap string of every node (running or not)."""
        if not self._nodes:
            raise KafkaUnavailableError("LocalKafka is not started")
        return ",".join(node.address for node in self._nodes)

    @property
    def sasl_bootstrap(self) -> str:
        """The bootstrap string of the ``SASL_SSL`` listener (``sasl=True`` only)."""
        if not self.sasl:
            raise ConfigError("this LocalKafka has no SASL listener (sasl=True)")
        self._node(0)
        return ",".join(node.sasl_address for node in self._nodes)

    @property
    def ca(self) -> DevCA:
        """The test CA of this cluster (``tls=True`` only)."""
        if self._ca is None:
            raise ConfigError("this LocalKafka has no CA: it is plaintext or not started")
        return self._ca

    def security(self, role: SubjectRole, name: str) -> KafkaSecurity:
        """Client settings for ``name`` in ``role``: a certificate from the test CA (mTLS)."""
        if not self.tls:
            return KafkaSecurity.plaintext()
        return self.ca.security(role, name)

    def link(self, role: SubjectRole, name: str) -> KafkaLink:
        """A link to this cluster as ``name`` in ``role`` (certificate files issued on demand)."""
        return KafkaLink(self.bootstrap, self.security(role, name))

    def sasl_link(self, role: SubjectRole) -> KafkaLink:
        """A ``SASL_SSL`` link as the SCRAM user of ``role`` (no client certificate)."""
        path = self._sasl_files.get(SubjectRole(role).value)
        if path is None:
            raise ConfigError(f"this LocalKafka has no SASL user for {role} (sasl=True)")
        security = KafkaSecurity(
            protocol=KafkaProtocol.SASL_SSL, ca_file=self.ca.ca_file, sasl_file=path
        )
        return KafkaLink(self.sasl_bootstrap, security)

    def node_bootstrap(self, index: int) -> str:
        """The address of one node."""
        return self._node(index).address

    def log_path(self, index: int = 0) -> Path:
        """The log file of one node (JVM output and the broker's own log)."""
        return self._node(index).log_path

    def pid(self, index: int = 0) -> int | None:
        """The process id of one node's JVM, or None when it is stopped."""
        return self._node(index).pid

    async def __aenter__(self) -> LocalKafka:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Fetch the jars if needed, format and start every node, and wait until it serves."""
        if self._nodes:
            raise ConfigError("LocalKafka is already started")
        self._libs = await asyncio.to_thread(ensure_kafka_jars, self._cache_dir)
        if self._data_dir_arg is not None:
            self.data_dir = Path(self._data_dir_arg)
            self.data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="ckms-kafka-"))
        self._nodes = [
            _Node(
                i,
                free_port(),
                free_port(),
                self.data_dir / f"node-{i}",
                sasl_port=free_port() if self.sasl else None,
            )
            for i in range(self.node_count)
        ]
        try:
            if self.tls:
                self._ca = await asyncio.to_thread(DevCA, self.data_dir / "tls")
                if self.sasl:
                    self._sasl_files = self._write_sasl_users()
            else:
                log.warning(
                    "LocalKafka is PLAINTEXT (tls=False): no encryption, no authentication, "
                    "no ACLs; a development setting"
                )
            for node in self._nodes:
                self._write_config(node)
            await asyncio.gather(*(self._format(node) for node in self._nodes))
            started = time.monotonic()
            for node in self._nodes:
                await self._launch(node)
            await self._wait_ready(self._nodes, expect_brokers=self.node_count)
            if self.tls:
                await create_acls(self._admin_link(), ckms_acls(pattern=Pattern.PREFIXED))
            self.startup_seconds = time.monotonic() - started
            log.info(
                "kafka ready: nodes=%d bootstrap=%s in %.1fs",
                self.node_count,
                self.bootstrap,
                self.startup_seconds,
            )
        except BaseException:
            await self._stop_all(remove=False)
            raise

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after a bound) and remove the data unless kept.

        Safe to call twice.
        """
        await self._stop_all(remove=not self.keep_data)

    async def stop_node(self, index: int, *, kill: bool = False) -> None:
        """Stop one node; ``kill=True`` sends SIGKILL at once (a crash, for fault tests)."""
        await self._terminate(self._node(index), kill=kill)

    async def start_node(self, index: int) -> None:
        """Start one stopped node again with its data and wait until it serves."""
        node = self._node(index)
        if node.running():
            return
        started = time.monotonic()
        await self._launch(node)
        await self._wait_ready([node], expect_brokers=None)
        self.startup_seconds = time.monotonic() - started

    async def restart(self) -> None:
        """Stop and start every node, keeping their data (records survive)."""
        await asyncio.gather(*(self._terminate(node, kill=False) for node in self._nodes))
        started = time.monotonic()
        for node in self._nodes:
            await self._launch(node)
        await self._wait_ready(self._nodes, expect_brokers=self.node_count)
        self.startup_seconds = time.monotonic() - started

    # -- internals -----------------------------------------------------------------------------

    def _node(self, index: int) -> _Node:
        if not self._nodes:
            raise KafkaUnavailableError("LocalKafka is not started")
        if not 0 <= index < len(self._nodes):
            raise ConfigError(f"no Kafka node {index}: this cluster has {len(self._nodes)}")
        return self._nodes[index]

    def _admin_link(self) -> KafkaLink:
        """A link as a broker certificate: the super user that creates ACLs and probes."""
        if not self.tls:
            return KafkaLink(self.bootstrap, KafkaSecurity.plaintext())
        return self.link(SubjectRole.BROKER, "ckms-launcher")

    def _write_sasl_users(self) -> dict[str, Path]:
        """One SCRAM user per client role, named like the role, its password in a 0600 file."""
        directory = self.ca.directory / "sasl"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = {}
        for role in (SubjectRole.CONTROLLER, SubjectRole.AGENT, SubjectRole.SUBSCRIBER):
            path = directory / f"{role.value}.toml"
            if not path.exists():
                text = f'username = "{role.value}"\npassword = "{secrets.token_urlsafe(24)}"\n'
                _write_private(path, text.encode())
            files[role.value] = path
        return files

    def _security_props(self, node: _Node) -> dict[str, object]:
        """Listeners and TLS/ACL settings: every listener mTLS, or all plaintext (tls=False)."""
        listeners = {"CLIENT": node.broker_port, "CONTROLLER": node.controller_port}
        if node.sasl_port is not None:
            listeners["SASL"] = node.sasl_port
        advertised = {k: v for k, v in listeners.items() if k != "CONTROLLER"}
        props: dict[str, object] = {
            "listeners": ",".join(f"{k}://127.0.0.1:{v}" for k, v in listeners.items()),
            "advertised.listeners": ",".join(f"{k}://127.0.0.1:{v}" for k, v in advertised.items()),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "CLIENT",
        }
        if not self.tls:
            props["listener.security.protocol.map"] = "CONTROLLER:PLAINTEXT,CLIENT:PLAINTEXT"
            return props
        cert, key = self.ca.issue(
            SubjectRole.BROKER,
            f"broker-{node.node_id}",
            usage=CertUsage.BOTH,  # a server to clients, a client to the other nodes
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
        )
        keystore = node.directory / "keystore.pem"
        _write_private(keystore, key.read_bytes() + cert.read_bytes())
        protocols = ["CONTROLLER:SSL", "CLIENT:SSL"]
        if node.sasl_port is not None:
            protocols.append("SASL:SASL_SSL")
            props |= {
                "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                # Password clients present no certificate: SCRAM is their authentication.
                "listener.name.sasl.ssl.client.auth": "none",
                f"listener.name.sasl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
            }
        return props | broker_tls_properties(keystore, self.ca.ca_file) | {
            "listener.security.protocol.map": ",".join(protocols),
        }

    def _write_config(self, node: _Node) -> None:
        n = self.node_count
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self._nodes)
        min_isr = 2 if n >= 3 else 1
        node.directory.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            **self._security_props(node),
            "log.dirs": str(node.directory / "data"),
            "num.partitions": 1,
            "default.replication.factor": n,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": n,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": n,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": n,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            "log.segment.bytes": 16 * 1024 * 1024,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "controlled.shutdown.enable": "true",
        }
        (node.directory / "server.properties").write_text(_properties_text(props))
        (node.directory / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)

    def _java_argv(self, node: _Node, main: str, *args: str) -> list[str]:
        assert self._libs is not None
        return [
            _java_command(),
            f"-Xms{self._heap}",
            f"-Xmx{self._heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={node.directory}",
            "-cp",
            f"{self._libs}/*",
            main,
            *args,
        ]

    def _scram_args(self) -> list[str]:
        """``--add-scram`` for each SASL user: KRaft stores SCRAM credentials from the format.

        The passwords are on this one JVM's command line for the seconds formatting takes: a
        development broker only (ckms clients read theirs from files).
        """
        args = []
        for path in self._sasl_files.values():
            creds = load_scram_credentials(path)
            entry = f"{SCRAM_MECHANISM}=[name={creds.username},password={creds.password}]"
            args += ["--add-scram", entry]
        return args

    async def _format(self, node: _Node) -> None:
        if (node.directory / "data" / "meta.properties").exists():
            return  # formatted before; data is kept across restarts
        argv = self._java_argv(
            node,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id,
            "-c",
            str(node.directory / "server.properties"),
            *self._scram_args(),
        )
        with node.log_path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            code = await proc.wait()
        if code != 0:
            raise KafkaUnavailableError(
                f"formatting Kafka node {node.index} failed (exit {code}); see {node.log_path}"
            )

    async def _launch(self, node: _Node) -> None:
        argv = self._java_argv(node, "kafka.Kafka", str(node.directory / "server.properties"))
        out = node.log_path.open("ab")
        try:
            if self._detach:
                node.process = await asyncio.to_thread(
                    subprocess.Popen,
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            else:
                node.process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent,
                )
        finally:
            out.close()
        log.debug("kafka node %d started pid=%s log=%s", node.index, node.pid, node.log_path)

    async def _wait_ready(self, nodes: list[_Node], *, expect_brokers: int | None) -> None:
        """Wait until each node answers a metadata request (and the cluster has all brokers)."""
        from aiokafka.client import AIOKafkaClient  # heavy import, only when a broker is used

        deadline = time.monotonic() + self.startup_timeout
        for node in nodes:
            while True:
                self._raise_if_exited(node)
                if not await _port_open(node.broker_port):
                    # Probe the port first: aiokafka logs an ERROR for every refused connect.
                    if time.monotonic() > deadline:
                        raise KafkaUnavailableError(
                            f"Kafka node {node.index} did not open its port within "
                            f"{self.startup_timeout:.0f} s; see {node.log_path}"
                        )
                    await asyncio.sleep(0.1)
                    continue
                client = AIOKafkaClient(
                    **KafkaLink(node.address, self._admin_link().security).client_args(
                        request_timeout_ms=3000, retry_backoff_ms=100
                    )
                )
                try:
                    await client.bootstrap()
                    brokers = client.cluster.brokers()
                    if expect_brokers is None or len(brokers) >= expect_brokers:
                        break
                except Exception as exc:  # aiokafka raises several types while starting
                    log.debug("kafka node %d not ready yet: %s", node.index, exc)
                finally:
                    await client.close()
                if time.monotonic() > deadline:
                    raise KafkaUnavailableError(
                        f"Kafka node {node.index} did not become ready within "
                        f"{self.startup_timeout:.0f} s; see {node.log_path}"
                    )
                await asyncio.sleep(0.2)

    def _raise_if_exited(self, node: _Node) -> None:
        proc = node.process
        if proc is None:
            raise KafkaUnavailableError(f"Kafka node {node.index} is not running")
        code = proc.poll() if isinstance(proc, subprocess.Popen) else proc.returncode
        if code is not None:
            raise KafkaUnavailableError(
                f"Kafka node {node.index} exited with code {code} while starting; "
                f"see {node.log_path}"
            )

    async def _terminate(self, node: _Node, *, kill: bool) -> None:
        proc = node.process
        if proc is None:
            return
        node.process = None
        if isinstance(proc, subprocess.Popen):
            await asyncio.to_thread(_terminate_popen, proc, kill)
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except TimeoutError:
                log.warning("kafka node %d ignored SIGTERM; killing it", node.index)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _stop_all(self, *, remove: bool) -> None:
        # Stop every node at once: stopped one by one, the last controller standing has no
        # quorum left to confirm its controlled shutdown and hangs until it is killed.
        await asyncio.gather(*(self._terminate(node, kill=False) for node in self._nodes))
        if remove and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def broker_tls_properties(keystore: Path, truststore: Path) -> dict[str, object]:
    """A broker's TLS and authorization settings: mTLS required, subjects mapped to the ckms
    principals, the StandardAuthorizer, brokers as super users (the same in tests and compose)."""
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": keystore,
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": truststore,
        "ssl.client.auth": "required",
        "ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
        "ssl.principal.mapping.rules": PRINCIPAL_MAPPING_RULES,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": "User:ckms-broker",
    }


def _properties_text(props: dict[str, object]) -> str:
    return "".join(f"{k}={_escape_property(str(v))}\n" for k, v in props.items())


def _escape_property(value: str) -> str:
    """Escape a value for a Java properties file (its backslashes would be eaten otherwise)."""
    return value.replace("\\", "\\\\")


async def _port_open(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _terminate_popen(proc: subprocess.Popen[bytes], kill: bool) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- shell entry: python -m ckms.devkafka up|down|status ---------------------------------------


def _state_file() -> Path:
    return kafka_cache_dir() / "devkafka.json"


async def _up(nodes: int, data_dir: Path | None) -> int:
    state = _state_file()
    if state.exists():
        info = json.loads(state.read_text())
        if any(pid_alive(pid) for pid in info.get("pids", [])):
            print(info["bootstrap"])
            print(
                "ckms: Kafka is already up (stop it with `python -m ckms.devkafka down`)",
                file=sys.stderr,
            )
            return 0
    kafka = LocalKafka(nodes, data_dir=data_dir, keep_data=True, detach=True)
    await kafka.start()
    assert kafka.data_dir is not None
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(
        json.dumps(
            {
                "bootstrap": kafka.bootstrap,
                "pids": [kafka.pid(i) for i in range(nodes)],
                "data_dir": str(kafka.data_dir),
                "remove_data": data_dir is None,
                "logs": [str(kafka.log_path(i)) for i in range(nodes)],
                "ca_dir": str(kafka.ca.directory),
            }
        )
    )
    print(kafka.bootstrap)
    print(
        f"ckms: Kafka {KAFKA_VERSION} up in {kafka.startup_seconds:.1f} s "
        f"(logs: {kafka.log_path(0)}); mutual TLS: get a client certificate with "
        "`python -m ckms.devkafka client ROLE NAME DIR`",
        file=sys.stderr,
    )
    return 0


def _pki(directory: Path, broker: str, clients: list[str], mount: str | None) -> int:
    """A test CA with a broker keystore and client files, for a Kafka run elsewhere (compose)."""
    ca = DevCA(directory / "ca")
    cert, key = ca.issue(
        SubjectRole.BROKER,
        broker,
        usage=CertUsage.BOTH,
        dns_names=(broker, "localhost"),
        ip_addresses=("127.0.0.1",),
    )
    broker_dir = directory / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(broker_dir / "keystore.pem", key.read_bytes() + cert.read_bytes())
    (broker_dir / "ca.pem").write_bytes(ca.ca_file.read_bytes())
    at = Path(mount) if mount is not None else broker_dir  # where the broker will see the files
    keystore, truststore = at / "keystore.pem", at / "ca.pem"
    # The broker's TLS settings, for Kafka's image to read as file input; and the same files
    # as a client (its health check).
    (broker_dir / "server.properties").write_text(
        _properties_text(broker_tls_properties(keystore, truststore))
    )
    (broker_dir / "client.properties").write_text(
        _properties_text(
            {
                "security.protocol": "SSL",
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": keystore,
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": truststore,
            }
        )
    )
    # A super user's files to create the ACLs with (the broker role: a super user).
    ca.install(SubjectRole.BROKER, f"{broker}-admin", directory / "admin")
    for spec in clients:
        role, _, name = spec.partition(":")
        ca.install(SubjectRole(f"ckms-{role}"), name, directory / name)
    print(directory)
    return 0


async def _acls(bootstrap: str, directory: Path, prefixed: bool) -> int:
    """Create the ckms ACLs on a cluster, as the super user whose files are in ``directory``."""
    link = KafkaLink(
        bootstrap,
        KafkaSecurity(
            ca_file=directory / "ca.pem",
            cert_file=directory / "client.pem",
            key_file=directory / "client.key",
        ),
    )
    await create_acls(link, ckms_acls(pattern=Pattern.PREFIXED if prefixed else Pattern.LITERAL))
    print(f"ckms: ACLs created at {bootstrap}", file=sys.stderr)
    return 0


def _client(role: str, name: str, directory: Path) -> int:
    state = _state_file()
    if not state.exists():
        raise ConfigError("no local Kafka is up (python -m ckms.devkafka up)")
    info = json.loads(state.read_text())
    ca = DevCA(Path(info["ca_dir"]))
    security = ca.install(SubjectRole(f"ckms-{role}"), name, directory)
    print(f"ca_file = {json.dumps(str(security.ca_file))}")
    print(f"cert_file = {json.dumps(str(security.cert_file))}")
    print(f"key_file = {json.dumps(str(security.key_file))}")
    return 0


def _down() -> int:
    state = _state_file()
    if not state.exists():
        print("ckms: no local Kafka is up", file=sys.stderr)
        return 0
    info = json.loads(state.read_text())
    for pid in info.get("pids", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while any(pid_alive(p) for p in info.get("pids", [])) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in info.get("pids", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if info.get("remove_data"):
        shutil.rmtree(info["data_dir"], ignore_errors=True)
    state.unlink()
    print("ckms: local Kafka stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Shell entry: ``up`` starts a detached local Kafka and prints its bootstrap; ``down``."""
    parser = argparse.ArgumentParser(
        prog="python -m ckms.devkafka", description="A real local Apache Kafka on loopback."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local Kafka in the background; print its bootstrap")
    up.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    up.add_argument("--data-dir", type=Path, default=None, help="keep data here (default: temp)")
    sub.add_parser("down", help="stop the local Kafka started by `up`")
    client = sub.add_parser(
        "client", help="write ca.pem, client.pem, client.key for a role into DIR (from `up`)"
    )
    client.add_argument("role", choices=("controller", "agent", "subscriber"))
    client.add_argument("name", help="the certificate's CN (a host id for an agent)")
    client.add_argument("directory", type=Path)
    pki = sub.add_parser(
        "pki", help="make a test CA, a broker keystore and client files in DIR (no broker)"
    )
    pki.add_argument("directory", type=Path)
    pki.add_argument("--broker", required=True, help="the broker's host name (its SAN)")
    pki.add_argument(
        "--broker-mount", default=None, help="where the broker sees DIR/broker (its properties)"
    )
    pki.add_argument(
        "--client", action="append", default=[], help="ROLE:NAME, e.g. agent:web-1 (repeat)"
    )
    acls = sub.add_parser("acls", help="create the ckms ACLs on a cluster as a super user")
    acls.add_argument("--bootstrap", required=True)
    acls.add_argument("--tls-dir", type=Path, required=True, help="ca.pem, client.pem, .key")
    acls.add_argument("--prefixed", action="store_true", help="for every topic under the names")
    sub.add_parser("fetch", help="only fetch the broker jars into the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "up":
            return asyncio.run(_up(args.nodes, args.data_dir))
        if args.command == "fetch":
            print(ensure_kafka_jars())
            return 0
        if args.command == "client":
            return _client(args.role, args.name, args.directory)
        if args.command == "pki":
            return _pki(args.directory, args.broker, args.client, args.broker_mount)
        if args.command == "acls":
            return asyncio.run(_acls(args.bootstrap, args.tls_dir, args.prefixed))
        return _down()
    except CKMSError as exc:
        print(f"ckms: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
