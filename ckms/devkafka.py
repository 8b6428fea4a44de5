"""A real, local Apache Kafka 4.x for tests, the demo and benchmarks.

``LocalKafka`` runs one KRaft node (broker and controller roles in one JVM, no ZooKeeper) or a
3-node cluster on free loopback ports, with its data in a temporary directory::

    async with LocalKafka() as kafka:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)

    async with LocalKafka(nodes=3) as cluster:      # replication 3, min.insync.replicas 2
        await cluster.stop_node(1)                  # the other two keep serving
        await cluster.start_node(1)

The broker's jars are fetched from Maven Central by Maven, once, into a per-user cache
(``~/.cache/ckms`` or ``$CKMS_CACHE_DIR``), using the description in ``deploy/kafka/pom.xml``;
later runs reuse the cache and need no network. Each node writes its log to
``<data dir>/node-<i>/broker.log``; every error names that file. From a shell::

    python -m ckms.devkafka up [--nodes 3]     # prints the bootstrap string, returns
    python -m ckms.devkafka down
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import re
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

from ckms._localproc import die_with_parent, free_port, pid_alive
from ckms.errors import CKMSError, ConfigError, DependencyMissingError, KafkaUnavailableError

__all__ = ["KAFKA_VERSION", "LocalKafka", "ensure_kafka_jars", "kafka_cache_dir"]

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


@dataclass
class _Node:
    index: int
    broker_port: int
    controller_port: int
    directory: Path
    process: asyncio.subprocess.Process | subprocess.Popen[bytes] | None = None
    log_handle: object | None = field(default=None, repr=False)

    @property
    def node_id(self) -> int:
        return self.index + 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

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
    ) -> None:
        if nodes not in (1, 3):
            raise ConfigError(f"LocalKafka runs 1 node or a 3-node cluster, not {nodes}")
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
            _Node(i, free_port(), free_port(), self.data_dir / f"node-{i}")
            for i in range(self.node_count)
        ]
        try:
            for node in self._nodes:
                self._write_config(node)
            await asyncio.gather(*(self._format(node) for node in self._nodes))
            started = time.monotonic()
            for node in self._nodes:
                await self._launch(node)
            await self._wait_ready(self._nodes, expect_brokers=self.node_count)
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

    def _write_config(self, node: _Node) -> None:
        n = self.node_count
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self._nodes)
        min_isr = 2 if n >= 3 else 1
        props = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{node.broker_port},"
                f"CONTROLLER://127.0.0.1:{node.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.broker_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
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
        node.directory.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (node.directory / "server.properties").write_text(text)
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
                    bootstrap_servers=node.address, request_timeout_ms=3000, retry_backoff_ms=100
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
            }
        )
    )
    print(kafka.bootstrap)
    print(
        f"ckms: Kafka {KAFKA_VERSION} up in {kafka.startup_seconds:.1f} s "
        f"(logs: {kafka.log_path(0)})",
        file=sys.stderr,
    )
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
    sub.add_parser("fetch", help="only fetch the broker jars into the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "up":
            return asyncio.run(_up(args.nodes, args.data_dir))
        if args.command == "fetch":
            print(ensure_kafka_jars())
            return 0
        return _down()
    except CKMSError as exc:
        print(f"ckms: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
