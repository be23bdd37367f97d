"""Apache Kafka itself, the broker docker-compose.yml and deploy/k8s run, as local processes.

`cancelflow up --broker kafka` (or CANCELFLOW_BROKER=kafka) runs it instead of the embedded broker: the
jars are resolved once by Maven from `apache-kafka.pom.xml` into a cache (~/.cache/cancelflow/kafka-<version>/,
no network afterwards), every node is a `kafka.Kafka` JVM in KRaft mode (broker and controller in one
process) with a generated server.properties, and its log lives under DATA/kafka/, formatted once, so
topics and records survive a restart on the same data dir. One node by default; three
(CANCELFLOW_KAFKA_NODES=3) make the cluster users outgrow one machine with: replication factor 3,
min.insync.replicas 2.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cancelflow.logging import get_logger
from cancelflow_tools.stack.broker import BrokerError, _accepts, _admin_when_ready, free_ports, port_in_use

log = get_logger(__name__)

POM = Path(__file__).with_name("apache-kafka.pom.xml")

# What docker-compose.yml gives its `kafka` service, besides where it listens (tests/unit/test_compose.py
# holds the two together): a single node, topics only from `cancelflow topics`.
BROKER_SETTINGS: dict[str, str] = {
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "false",
}
# Three nodes: every write on two of them before it is acknowledged (acks=all), as in production.
CLUSTER_SETTINGS: dict[str, str] = {
    **BROKER_SETTINGS,
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
}
# A small heap: the machines this runs on (laptops, CI) have two cores and share them with the stack.
# The quick compiler only and one GC thread: half the broker's CPU per request in a run of minutes
# (docs/performance.md, item 40). Compose's broker has cores of its own and keeps the image's defaults.
# IPv4 sockets: on a dual stack Java binds 127.0.0.1 as ::ffff:127.0.0.1 (tests/e2e/test_exposure.py).
JVM_OPTIONS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
               "-Djava.net.preferIPv4Stack=true")
_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
"""


def kafka_version() -> str:
    """The Kafka version the project runs: the pom's `kafka.version`."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    assert found, f"no kafka.version in {POM}"
    return found.group(1)


def cache_dir() -> Path:
    """Where the resolved jars are kept: CANCELFLOW_KAFKA_HOME, else ~/.cache/cancelflow/kafka-<version>."""
    if home := os.environ.get("CANCELFLOW_KAFKA_HOME"):
        return Path(home)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cancelflow" / f"kafka-{kafka_version()}"


_NEEDS = ("Apache Kafka needs {what}: install it (Debian/Ubuntu: apt-get install {package}), "
          "or run cancelflow on docker compose (`docker compose up`), or leave out --broker kafka "
          "for the embedded broker")


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes one (`Uuid.randomUuid`): 22 base64url characters, never starting
    with "-", which `kafka-storage format -t` would read as an option (one id in 64 did)."""
    while (cluster_id := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cluster_id


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError(_NEEDS.format(what="Java 17 (`java` on the PATH)", package="openjdk-17-jre-headless"))
    return java


def jars_resolved() -> bool:
    return (cache_dir() / "resolved").exists()


def resolve_jars(cache: Path | None = None) -> Path:
    """The folder of the broker's jars, resolved with Maven on first use (then no network at all)."""
    _java()
    cache = cache or cache_dir()
    libs, done = cache / "libs", cache / "resolved"
    if done.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(_NEEDS.format(what="Maven (`mvn`) once, to fetch its jars", package="maven"))
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers and stacks may start at once: one resolves
        if done.exists():
            return libs
        staging = cache / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        argv = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}"]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(f"Maven could not resolve Apache Kafka {kafka_version()} ({' '.join(argv)}):\n"
                              + (result.stdout + result.stderr)[-3000:])
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        done.write_text(f"{kafka_version()}\n")
    return libs


@dataclass(frozen=True)
class NodeAddress:
    node_id: int
    port: int  # clients (PLAINTEXT)
    controller_port: int


def server_properties(node: NodeAddress, voters: list[NodeAddress], log_dir: Path,
                      host: str = "127.0.0.1") -> dict[str, str]:
    """server.properties of one KRaft node (broker and controller in one process), as compose's node has."""
    settings = CLUSTER_SETTINGS if len(voters) > 1 else BROKER_SETTINGS
    return {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "listeners": f"PLAINTEXT://{host}:{node.port},CONTROLLER://{host}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{node.port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "controller.quorum.voters": ",".join(f"{v.node_id}@{host}:{v.controller_port}" for v in voters),
        "log.dirs": str(log_dir),
        **settings,
    }


def _write_properties(path: Path, values: Mapping[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))


class KafkaNode:
    """One `kafka.Kafka` process: its config and log under `root`, its output in `log_file`."""

    def __init__(self, address: NodeAddress, voters: list[NodeAddress], root: Path, log_file: Path,
                 host: str = "127.0.0.1") -> None:
        self.address, self.root, self.log_file, self.host = address, root, log_file, host
        self.config = root / "server.properties"
        self.log_dir = root / "data"
        self.properties = server_properties(address, voters, self.log_dir, host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._archive: Path | None = None  # the class archive this run writes at its exit

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.address.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def prepare(self, libs: Path, cluster_id: str) -> None:
        """Write the config; format the log dir the first time (a formatted one keeps its records)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _write_properties(self.config, self.properties)
        (self.root / "log4j.properties").write_text(_LOG4J)
        if (self.log_dir / "meta.properties").exists():
            return
        result = subprocess.run(self._java(libs, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                                           "-c", str(self.config)), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(f"could not format the Kafka log dir {self.log_dir}:\n{result.stdout}{result.stderr}")

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return [_java(), *JVM_OPTIONS, "-cp", f"{libs}/*",
                f"-Dlog4j.configuration=file:{self.root / 'log4j.properties'}", main, *args]

    def _class_sharing(self, libs: Path) -> list[str]:
        """The JVM loads Kafka's classes from an archive (AppCDS) the first clean stop wrote: measured,
        a start takes about a quarter less CPU with it, on two busy cores."""
        archive = libs.parent / "kafka.jsa"
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}"]
        self._archive = libs.parent / f"kafka.jsa.{os.getpid()}-{self.address.node_id}.partial"
        return [f"-XX:ArchiveClassesAtExit={self._archive}"]

    def _keep_archive(self) -> None:
        if self._archive is not None and self._archive.exists() and self._archive.stat().st_size > 0:
            self._archive.replace(self._archive.parent / "kafka.jsa")
        self._archive = None

    def launch(self, libs: Path) -> None:
        if self.running:
            return
        for port in (self.address.port, self.address.controller_port):
            if port_in_use(self.host, port):
                raise BrokerError(f"cannot start Kafka node {self.address.node_id}: port {port} is already in use")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting Kafka node {self.address.node_id}\n"
                      .encode())
            out.flush()
            argv = self._java(libs, "kafka.Kafka", str(self.config))
            argv[1:1] = self._class_sharing(libs)
            self._proc = subprocess.Popen(argv, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)

    def terminate(self) -> None:
        if self.running:
            assert self._proc is not None
            os.kill(self._proc.pid, signal.SIGCONT)  # a paused JVM cannot act on SIGTERM
            self._proc.terminate()

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.running:
            assert self._proc is not None
            self._proc.kill()
            self._proc.wait()

    def wait_exit(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        code = self._proc.wait(timeout)
        self._keep_archive()
        return code

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class KafkaBroker:
    """A KRaft cluster of `nodes` Kafka processes under `data_dir/kafka`; the first listens on `port`.

    The same surface as `EmbeddedBroker` (start, stop, wait, the blocking twins, pid), plus what
    only a real cluster has: `supervise` relaunches a node that died on its own log (the stack does
    that, so a kill -9 of the broker is a fault the stack recovers from), and `node_pids`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9092, *, data_dir: Path | str = Path("./var"),
                 nodes: int = 1, log_dir: Path | None = None, startup_timeout: float = 90.0,
                 grace: float = 30.0) -> None:
        self.host, self.port, self.startup_timeout, self.grace = host, port, startup_timeout, grace
        self.root = Path(data_dir).resolve() / "kafka"
        self.logs = log_dir or Path(data_dir).resolve() / "logs"
        self.node_count = nodes
        self.libs: Path | None = None
        self.nodes: list[KafkaNode] = []
        self.restarts = 0

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes) or f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid if self.nodes else None

    def node_pids(self) -> dict[int, int | None]:
        return {n.address.node_id: n.pid for n in self.nodes}

    @property
    def running(self) -> bool:
        return any(n.running for n in self.nodes)

    def _layout(self) -> tuple[str, list[NodeAddress]]:
        """The cluster id and every node's ports, chosen on the first start and kept (DATA/kafka/cluster.json):
        a restart finds its log and its peers where they were. Node 1's client port follows `port`."""
        path = self.root / "cluster.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("nodes") and len(saved["nodes"]) != self.node_count:
            raise BrokerError(f"{self.root} holds a {len(saved['nodes'])}-node Kafka cluster, not {self.node_count}: "
                              "use another data dir")
        if not saved:
            ports = free_ports(2 * self.node_count)
            saved = {"cluster_id": new_cluster_id(),
                     "nodes": [{"node_id": i + 1, "port": ports[2 * i], "controller_port": ports[2 * i + 1]}
                               for i in range(self.node_count)]}
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=2))
        addresses = [NodeAddress(**n) for n in saved["nodes"]]
        addresses[0] = NodeAddress(1, self.port, addresses[0].controller_port)
        return saved["cluster_id"], addresses

    def prepare(self) -> None:
        """Resolve the jars, lay out and format every node: everything before the processes start."""
        if self.nodes:
            return
        self.libs = resolve_jars()
        cluster_id, addresses = self._layout()
        single = self.node_count == 1
        self.nodes = [KafkaNode(a, addresses, self.root if single else self.root / f"node-{a.node_id}",
                                self.logs / ("broker.log" if single else f"broker-{a.node_id}.log"), self.host)
                      for a in addresses]
        for node in self.nodes:
            node.prepare(self.libs, cluster_id)

    async def start(self) -> KafkaBroker:
        started = time.monotonic()
        await asyncio.to_thread(self.prepare)
        assert self.libs is not None
        for node in self.nodes:
            node.launch(self.libs)
        try:
            await self._until_answering(started + self.startup_timeout)
        except BrokerError:
            await self.stop()
            raise
        log.info("Kafka started", nodes=self.node_count, bootstrap=self.bootstrap,
                 seconds=round(time.monotonic() - started, 2))
        return self

    async def _until_answering(self, deadline: float) -> None:
        for node in self.nodes:
            while not await _accepts(node.host, node.address.port):
                if not node.running:
                    raise BrokerError(f"Kafka node {node.address.node_id} exited (log {node.log_file}):\n"
                                      + node.tail())
                if time.monotonic() > deadline:
                    raise BrokerError(f"Kafka node {node.address.node_id} did not listen within "
                                      f"{self.startup_timeout:.0f}s (log {node.log_file}):\n" + node.tail())
                await asyncio.sleep(0.1)
        admin = await _admin_when_ready(self.bootstrap, max(deadline - time.monotonic(), 1.0))
        try:
            while len((await admin.describe_cluster())["brokers"]) < self.node_count:
                if time.monotonic() > deadline:
                    raise BrokerError(f"not every Kafka node joined the cluster within {self.startup_timeout:.0f}s")
                await asyncio.sleep(0.2)
        finally:
            await admin.close()

    async def supervise(self) -> int:
        """Relaunch any node that exits (on the same log) until one keeps failing; return its exit code."""
        assert self.libs is not None
        recent: list[float] = []
        while True:
            await asyncio.sleep(0.2)
            for node in self.nodes:
                if node.running:
                    continue
                code = node.wait_exit()
                now = time.monotonic()
                recent = [t for t in recent if now - t < 60] + [now]
                if len(recent) > 5:
                    return code if code is not None else 1
                log.warning("Kafka node exited; starting it again on its log", node=node.address.node_id,
                            exit_code=code)
                self.restarts += 1
                await asyncio.sleep(0.5)  # the OS frees its ports
                node.launch(self.libs)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_blocking)

    def stop_blocking(self) -> None:
        # The others first: the last node is the one a controlled shutdown of the others talks to.
        for node in reversed(self.nodes):
            node.terminate()
            try:
                node.wait_exit(self.grace)
            except subprocess.TimeoutExpired:
                log.warning("Kafka node did not stop in time; killing it", node=node.address.node_id)
                node.kill()

    async def wait(self) -> int | None:
        return await self.supervise()

    def start_blocking(self) -> KafkaBroker:
        from cancelflow_tools.stack.broker import _run_coroutine_blocking

        return _run_coroutine_blocking(self.start())

    def kill(self, node_id: int = 1) -> None:
        """kill -9 one node (tests)."""
        self.nodes[node_id - 1].kill()

    async def __aenter__(self) -> KafkaBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> KafkaBroker:
        return self.start_blocking()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop_blocking()


if __name__ == "__main__":  # scripts/test: resolve the jars before the tests need them
    print(f"Apache Kafka {kafka_version()}: {resolve_jars()}")
