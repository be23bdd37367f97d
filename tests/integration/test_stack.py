"""The embedded broker, topic creation, the process supervisor and the stack layout."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from typer.testing import CliRunner

from cancelflow.settings import CommonSettings
from cancelflow.topics import BY_NAME, MAX_MESSAGE_BYTES, SAGA, STATUS, TOPICS
from cancelflow_tools.cli import app
from cancelflow_tools.services import SERVICES
from cancelflow_tools.stack import embedded
from cancelflow_tools.stack.broker import (
    BrokerError,
    EmbeddedBroker,
    create_topics,
    free_port,
    free_ports,
    port_in_use,
    wait_for_broker,
)
from cancelflow_tools.stack.embedded import running_stack, stack_specs
from cancelflow_tools.stack.supervisor import NotReadyError, ProcessSpec, Supervisor

# A child that answers 200 to every GET on the port given as its argument.
HTTP_CHILD = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # answers /healthz, and /inflight with nothing in flight (a clean stop drains)
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(b'{"unhandled": 0, "unpublished": 0}')
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""
STUBBORN_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedBroker(port=free_port(), data_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def eventually(condition, within: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


# -- broker ---------------------------------------------------------------------------------------------


async def test_create_topics_creates_every_topic_once(broker: EmbeddedBroker) -> None:
    created = await create_topics(broker.bootstrap, embedded=True)  # as the embedded stack creates them
    again = await create_topics(broker.bootstrap, embedded=True)

    assert sorted(created) == sorted(t.name for t in TOPICS)
    assert again == []
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = {
            t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([t.name for t in TOPICS])
        }
        [configs] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.name) for t in TOPICS])
    finally:
        await admin.close()
    assert described == {t.name: t.partitions_on(embedded=True) for t in TOPICS}
    assert described[SAGA] < BY_NAME[SAGA].partitions  # the embedded broker's own count (Performance item 30)
    entries = {name: {(e[0], e[1]) for e in found} for _, _, _, name, found in configs.resources}
    assert ("cleanup.policy", "compact") in entries[STATUS]
    # Every topic's size limit is explicit (Kafka's default of ~1 MiB would refuse a dead-letter record).
    assert all(("max.message.bytes", str(MAX_MESSAGE_BYTES)) in entries[t.name] for t in TOPICS), entries


def test_topics_command_is_idempotent(broker: EmbeddedBroker) -> None:
    for _ in range(2):
        result = CliRunner().invoke(app, ["topics", "--bootstrap", broker.bootstrap])
        assert result.exit_code == 0, result.output
        assert STATUS in result.output


def test_topics_command_reads_replication_factor_and_wait(broker: EmbeddedBroker,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # What compose and the Kubernetes Job pass: the broker from the environment, an explicit factor.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap)
    monkeypatch.setenv("KAFKA_TOPIC_REPLICATION_FACTOR", "1")
    embedded = CliRunner().invoke(app, ["topics", "--wait", "5", "--embedded"])  # this broker is the embedded one
    assert embedded.exit_code == 0, embedded.output
    assert all(t.name in embedded.output for t in TOPICS)
    assert "fewer partitions" not in embedded.output
    # Taken for Kafka, the embedded broker's topics with fewer partitions than declared are named
    result = CliRunner().invoke(app, ["topics", "--wait", "5"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "fewer partitions than declared:" in said
    for t in TOPICS:
        fewer = f"{t.name} ({t.partitions_on(embedded=True)} of {t.partitions})"
        assert (fewer in said) == (t.partitions_on(embedded=True) < t.partitions), fewer
    refused = CliRunner().invoke(app, ["topics", "--replication-factor", "0"])
    assert refused.exit_code == 2


async def test_second_broker_on_a_busy_port_is_refused(broker: EmbeddedBroker, tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        await EmbeddedBroker(port=broker.port, data_dir=tmp_path).start()


async def test_paused_broker_does_not_answer_until_resumed(broker: EmbeddedBroker) -> None:
    broker.pause()
    try:
        with pytest.raises(BrokerError):
            await wait_for_broker(broker.bootstrap, timeout=1.0)
    finally:
        broker.resume()
    await wait_for_broker(broker.bootstrap, timeout=5.0)


async def test_broker_stops_and_frees_its_port(tmp_path: Path) -> None:
    async with EmbeddedBroker(port=free_port(), data_dir=tmp_path) as own:
        pid = own.pid
        assert alive(pid)
    assert not alive(pid)
    assert (tmp_path / "logs" / "broker.log").exists()


# -- supervisor -----------------------------------------------------------------------------------------


def http_spec(name: str, port: int, log_dir: Path) -> ProcessSpec:
    return ProcessSpec(
        name,
        [sys.executable, "-c", HTTP_CHILD, str(port)],
        None,
        f"http://127.0.0.1:{port}/healthz",
        log_dir / f"{name}.log",
    )


async def test_supervisor_restarts_a_killed_child_and_stops_all(tmp_path: Path) -> None:
    restarts: list[tuple[str, int]] = []
    specs = [
        http_spec("web", free_port(), tmp_path),
        ProcessSpec(
            "stubborn", [sys.executable, "-c", STUBBORN_CHILD], None, None, tmp_path / "stubborn.log"
        ),
    ]
    supervisor = Supervisor(
        specs,
        ready_timeout=10,
        grace=0.5,
        backoff_initial=0.05,
        on_restart=lambda name, n: restarts.append((name, n)),
    )
    await supervisor.start()
    try:
        first = supervisor.pid("web")
        os.kill(first, 9)
        await eventually(lambda: supervisor.pid("web") not in (None, first))
        await supervisor.wait_ready(["web"], within=10)

        assert supervisor.restart_count("web") == 1
        assert supervisor.restart_count("stubborn") == 0
        assert restarts == [("web", 1)]
        await eventually(lambda: "up" in (tmp_path / "stubborn.log").read_text())
    finally:
        pids = [supervisor.pid("web"), supervisor.pid("stubborn")]
        await supervisor.stop()

    assert all(pid is not None and not alive(pid) for pid in pids)  # stubborn ignored SIGTERM: killed
    assert supervisor.pid("web") is None and supervisor.pid("stubborn") is None
    assert "supervisor starting web" in (tmp_path / "web.log").read_text()


async def test_supervisor_keeps_restarting_a_crashing_child(tmp_path: Path) -> None:
    spec = ProcessSpec("crash", [sys.executable, "-c", "raise SystemExit(3)"], None, None, tmp_path / "c.log")
    async with Supervisor([spec], backoff_initial=0.01, backoff_cap=0.05, grace=1) as supervisor:
        await eventually(lambda: supervisor.restart_count("crash") >= 3)


async def test_supervisor_reports_a_child_that_never_gets_ready(tmp_path: Path) -> None:
    spec = ProcessSpec(
        "deaf",
        [sys.executable, "-c", "import time; time.sleep(30)"],
        None,
        f"http://127.0.0.1:{free_port()}/healthz",
        tmp_path / "deaf.log",
    )
    supervisor = Supervisor([spec], ready_timeout=0.5, grace=1)
    with pytest.raises(NotReadyError, match="deaf"):
        await supervisor.start()
    pid = supervisor.pid("deaf")
    await supervisor.stop()
    assert pid is not None and not alive(pid)


# -- the embedded stack's layout ------------------------------------------------------------------------


def test_stack_specs_start_only_what_is_not_given(tmp_path: Path) -> None:
    settings = CommonSettings(data_dir=tmp_path)
    embedded = stack_specs(settings, {"PATH": os.environ.get("PATH", "")})
    assert [s.name for s in embedded] == ["vendor-sandbox", "gateway-sandbox", "smtp-sink", *SERVICES]
    env = embedded[-1].env
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:9092"
    assert env["CANCELFLOW_DATA_DIR"] == str(tmp_path.resolve())
    assert env["CANCELFLOW_ENABLE_FAULT_HOOKS"] == "1"
    assert env["CANCELFLOW_FETCH_MAX_WAIT_MS"] == str(settings.fetch_max_wait_ms) == "200"
    assert embedded[-1].ready_url == "http://127.0.0.1:8080/readyz"
    assert embedded[0].log_file == tmp_path.resolve() / "logs" / "vendor-sandbox.log"

    external = CommonSettings(
        data_dir=tmp_path,
        kafka_bootstrap_servers="kafka:9092",
        smtp_host="mail",
        vendor_api_url="http://vendor",
        gateway_api_url="http://gw",
    )
    specs = stack_specs(external, {"BILLING_DATABASE_URL": "postgresql+asyncpg://db/billing"})
    assert [s.name for s in specs] == list(SERVICES)
    assert specs[0].env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert specs[0].env["BILLING_DATABASE_URL"] == "postgresql+asyncpg://db/billing"


def test_no_running_stack_without_a_live_supervisor(tmp_path: Path) -> None:
    settings = CommonSettings(data_dir=tmp_path)
    assert running_stack(settings) is None
    (tmp_path / "stack.json").write_text('{"pid": 999999999, "status_url": "http://127.0.0.1:1"}')
    assert running_stack(settings) is None


async def test_run_stack_starts_broker_and_processes_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    status_port = free_port()
    settings = CommonSettings(data_dir=tmp_path, broker_port=free_port())
    env = {**os.environ, "STATUS_HTTP_PORT": str(status_port)}
    # Stand-ins for the real processes: only the orchestration is under test here.
    monkeypatch.setattr(
        embedded, "stack_specs", lambda s, e, bootstrap=None: [http_spec("status_tracker", status_port, tmp_path)]
    )
    stop = asyncio.Event()
    seen: dict = {}

    async def on_ready(info: dict) -> None:
        seen.update(info, running=running_stack(settings))
        admin = AIOKafkaAdminClient(bootstrap_servers=info["bootstrap_servers"])
        await admin.start()
        seen["topics"] = set(await admin.list_topics())
        await admin.close()
        stop.set()

    exit_code = await asyncio.wait_for(
        embedded.run_stack(settings, on_ready=on_ready, env=env, stop=stop), 30
    )

    assert exit_code == 0
    assert seen["running"]["pid"] == os.getpid()
    assert seen["components"]["status_tracker"]["address"] == f"http://127.0.0.1:{status_port}"
    assert seen["topics"] >= {t.name for t in TOPICS}
    assert not (tmp_path / "stack.json").exists()
    assert not port_in_use("127.0.0.1", settings.broker_port)
    assert not port_in_use("127.0.0.1", status_port)


def test_free_ports_are_all_different_and_free() -> None:
    for _ in range(50):
        ports = free_ports(12)
        assert len(set(ports)) == 12
        assert not any(port_in_use("127.0.0.1", port) for port in ports)
