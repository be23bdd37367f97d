"""The embedded stack of CONTRACT section 9: what `cancelflow up` runs in the foreground.

The broker (unless KAFKA_BOOTSTRAP_SERVERS names one: the embedded one, or Apache Kafka with
CANCELFLOW_BROKER=kafka), the sandboxes and SMTP sink (unless their URLs are
given), and the six services, each its own process under the `Supervisor`. While it runs,
DATA/stack.json says where everything listens, so other commands can find the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cancelflow.operator_token import EMBEDDED_OPERATOR, TOKEN_FILE, embedded_operator
from cancelflow.settings import CommonSettings
from cancelflow_tools.services import SERVICES
from cancelflow_tools.stack.apache_kafka import KafkaBroker, jars_resolved
from cancelflow_tools.stack.broker import BrokerError, EmbeddedBroker, create_topics, port_in_use
from cancelflow_tools.stack.drain import drain
from cancelflow_tools.stack.supervisor import NotReadyError, ProcessSpec, Supervisor

STACK_FILE = "stack.json"
SERVICE_KEYS_FILE = "service-keys"  # made by `cancelflow up` when keys are on and none are given
LOCALHOST = "127.0.0.1"

OnReady = Callable[[dict[str, Any]], Awaitable[None] | None]


def _data_dir(settings: CommonSettings) -> Path:
    return settings.data_dir.resolve()


def child_env(settings: CommonSettings, env: Mapping[str, str], bootstrap: str | None = None) -> dict[str, str]:
    """`env` plus every common setting spelled out, so children agree with us even on overrides.
    `bootstrap`: the servers of the broker the stack started (every node of a Kafka cluster)."""
    out = dict(env)
    for name, field in CommonSettings.model_fields.items():
        alias = field.validation_alias
        if not isinstance(alias, str):
            continue
        value = getattr(settings, name)
        if value is None:
            out.pop(alias, None)
        else:
            out[alias] = _env_value(value)
    if settings.producer_keys and not settings.service_keys:
        # Keys on cover the internal topics too (CONTRACT.md section 10).
        out["CANCELFLOW_SERVICE_KEYS"] = _service_keys(_data_dir(settings))
    if settings.kafka_bootstrap_servers is None and "KAFKA_SESSION_TIMEOUT_MS" not in env:
        # On the embedded broker a short session lets a restarted service resume within seconds; on
        # Kafka, whose least is 6 s, it is how long a member that died for good holds its partitions.
        out["KAFKA_SESSION_TIMEOUT_MS"] = "6000"
    out.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap or settings.bootstrap_servers,
        CANCELFLOW_DATA_DIR=str(_data_dir(settings)),
        CANCELFLOW_ENABLE_FAULT_HOOKS="1",  # the embedded stack is for trying things out and testing
        PYTHONUNBUFFERED="1",  # log lines reach the log files as they happen
    )
    return out


def _service_keys(data: Path) -> str:
    """A key per service, made once per data dir and kept there (owner-only), so that records signed
    before a restart still check after it (on Kafka, where they outlive the stack)."""
    path = data / SERVICE_KEYS_FILE
    if path.exists():
        return path.read_text().strip()
    keys = ",".join(f"{service}:{secrets.token_hex(32)}" for service in SERVICES)
    data.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(keys)
    return keys


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, SecretStr):  # str() would hand the children a masked "**********"
        return value.get_secret_value()
    return str(value)


def service_port(service: str, env: Mapping[str, str]) -> int:
    prefix, default = SERVICES[service]
    return int(env.get(f"{prefix}_HTTP_PORT", default))


def _log(settings: CommonSettings, name: str) -> Path:
    return _data_dir(settings) / "logs" / f"{name}.log"


def stack_specs(settings: CommonSettings, env: Mapping[str, str], bootstrap: str | None = None) -> list[ProcessSpec]:
    """Every process of the stack, in start order (they stop in reverse)."""
    data, py, children_env = _data_dir(settings), sys.executable, child_env(settings, env, bootstrap)

    def spec(name: str, argv: list[str], ready_url: str, instance: dict[str, str] | None = None) -> ProcessSpec:
        return ProcessSpec(name, [py, "-m", *argv], {**children_env, **(instance or {})}, ready_url,
                           _log(settings, name))

    specs = []
    for kind, external, port in (
        ("vendor", settings.vendor_api_url, settings.vendor_sandbox_port),
        ("gateway", settings.gateway_api_url, settings.gateway_sandbox_port),
    ):
        if external is None:
            argv = [
                "cancelflow_tools.sandboxes",
                kind,
                "--host",
                LOCALHOST,
                "--port",
                str(port),
                "--state-file",
                str(data / "sandboxes" / f"{kind}.json"),
            ]
            specs.append(spec(f"{kind}-sandbox", argv, f"http://{LOCALHOST}:{port}/healthz"))
    if settings.embedded_smtp:
        argv = [
            "cancelflow_tools.smtp_sink",
            "--host",
            LOCALHOST,
            "--port",
            str(settings.smtp_port),
            "--dir",
            str(data / "mail"),
        ]
        specs.append(spec("smtp-sink", argv, f"tcp://{LOCALHOST}:{settings.smtp_port}"))
    for service in SERVICES:
        # Ready, not merely answering: `up` says the stack is up once every consumer has its partitions.
        # One instance of each service, the same one after every restart (on Kafka its static group
        # membership; CANCELFLOW_INSTANCE_ID= (empty) turns that off).
        specs.append(spec(service, [service], f"http://{LOCALHOST}:{service_port(service, env)}/readyz",
                          {"CANCELFLOW_INSTANCE_ID": env.get("CANCELFLOW_INSTANCE_ID", "1")}))
    return specs


def describe_stack(
    settings: CommonSettings, env: Mapping[str, str], specs: list[ProcessSpec], bootstrap: str | None = None
) -> dict[str, Any]:
    """What stack.json holds: our pid and where every component listens (external ones included)."""
    components: dict[str, dict[str, str | None]] = {}

    def add(name: str, address: str, log_file: Path | None) -> None:
        components[name] = {"address": address, "log_file": str(log_file) if log_file else None}

    own_broker = settings.kafka_bootstrap_servers is None
    embedded_broker = own_broker and not settings.on_kafka
    bootstrap = bootstrap or settings.bootstrap_servers
    broker_log = _log(settings, "broker" if settings.kafka_nodes == 1 or embedded_broker else "broker-1")
    add("broker", bootstrap, broker_log if own_broker else None)
    if settings.vendor_api_url:
        add("vendor-api", settings.vendor_url, None)
    if settings.gateway_api_url:
        add("gateway-api", settings.gateway_url, None)
    if not settings.embedded_smtp:
        host, port = settings.smtp_address
        add("smtp", f"smtp://{host}:{port}", None)
    for s in specs:
        address = _origin(s.ready_url).replace("tcp://", "smtp://") if s.ready_url else "-"
        add(s.name, address, s.log_file)
    return {
        "pid": os.getpid(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_dir": str(_data_dir(settings)),
        "embedded_broker": embedded_broker,
        "broker": settings.broker,
        "bootstrap_servers": bootstrap,
        "status_url": f"http://{LOCALHOST}:{service_port('status_tracker', env)}",
        "vendor_url": settings.vendor_url,
        "gateway_url": settings.gateway_url,
        "mail_dir": str(_data_dir(settings) / "mail") if settings.embedded_smtp else None,
        "components": components,
    }


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def running_stack(settings: CommonSettings) -> dict[str, Any] | None:
    """The stack.json of a live stack on this data dir: its pid is alive and the status service answers."""
    try:
        info = json.loads((_data_dir(settings) / STACK_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(f"{info['status_url']}/healthz", timeout=2) as response:
            return info if response.status == 200 else None
    except (OSError, KeyError):
        return None


async def run_stack(
    settings: CommonSettings,
    *,
    on_ready: OnReady | None = None,
    env: Mapping[str, str] | None = None,
    console: Console | None = None,
    stop: asyncio.Event | None = None,
    drain_s: float | None = None,
) -> int:
    """Run the stack until SIGINT/SIGTERM (or `stop` is set); return the exit code.

    A clean stop on the embedded broker first lets the work in flight finish (`drain`, at most `drain_s`,
    default CANCELFLOW_DRAIN_SECONDS): the broker's records live in memory only. Apache Kafka keeps them:
    no wait.
    """
    env = dict(os.environ if env is None else env)
    console = console or Console()
    stop = stop or asyncio.Event()
    data = _data_dir(settings)
    for sub in ("logs", "sandboxes", "mail"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    if running := running_stack(settings):
        console.print(f"[red]a stack already runs on {data} (pid {running['pid']})[/]")
        return 1
    token = None
    if not settings.operators:  # the embedded stack's one operator (CONTRACT.md section 11)
        operators, token = embedded_operator(data)
        settings = settings.model_copy(update={"operators": operators})

    broker: EmbeddedBroker | KafkaBroker | None = None
    if settings.kafka_bootstrap_servers is None and settings.on_kafka:
        broker = KafkaBroker(LOCALHOST, settings.broker_port, data_dir=data, nodes=settings.kafka_nodes)
        try:
            if not jars_resolved():
                console.print("resolving Apache Kafka's jars with Maven (once) ...")
            await asyncio.to_thread(broker.prepare)
        except BrokerError as exc:
            console.print(f"[red]cannot start Apache Kafka:[/] {escape(str(exc))}")
            return 1
    elif settings.kafka_bootstrap_servers is None:
        broker = EmbeddedBroker(LOCALHOST, settings.broker_port, log_file=_log(settings, "broker"))
    bootstrap = broker.bootstrap if broker is not None else None
    specs = stack_specs(settings, env, bootstrap)
    if busy := _busy_ports(settings, specs):
        console.print(f"[red]cannot start: already in use: {', '.join(busy)}[/]")
        return 1
    supervisor = Supervisor(specs, console=console)
    stack_file = data / STACK_FILE
    exit_code = 0
    if drain_s is None:
        drain_s = settings.drain_s if isinstance(broker, EmbeddedBroker) else 0.0  # Kafka keeps its records
    hurry = asyncio.Event()  # a second Ctrl-C: stop without waiting for the work in flight
    with _stop_on_signals(stop, hurry):
        try:
            if not await _until_stopped(_start(settings, broker, supervisor, console), stop):
                return 0
            info = describe_stack(settings, env, specs, bootstrap)
            _write_json(stack_file, info)
            _print_ready(console, info, isinstance(broker, EmbeddedBroker), token)
            if on_ready is not None and inspect.isawaitable(result := on_ready(info)):
                await result
            broker_exit = asyncio.create_task(broker.wait()) if broker else None
            if await _until_stopped(broker_exit, stop) and broker_exit is not None:
                console.print(f"[red]the broker exited ({broker_exit.result()}); stopping[/]")
                exit_code = 1
            elif drain_s > 0:
                await drain(_service_origins(specs), console, within_s=drain_s, hurry=hurry)
        except (BrokerError, NotReadyError, OSError) as exc:
            console.print(f"[red]cannot start the stack:[/] {escape(str(exc))}")
            exit_code = 1
        finally:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(stack_file.read_text()).get("pid") == os.getpid():
                    stack_file.unlink()
            console.print("stopping ...")
            await supervisor.stop()
            if broker is not None:
                await broker.stop()
            console.print("stopped")
    return exit_code


async def _start(
    settings: CommonSettings, broker: EmbeddedBroker | KafkaBroker | None, supervisor: Supervisor, console: Console
) -> None:
    if isinstance(broker, KafkaBroker):
        console.print(f"starting Apache Kafka ({broker.node_count} node(s)) on {broker.bootstrap} ...")
        started = time.monotonic()
        await broker.start()
        console.print(f"Apache Kafka answers after {time.monotonic() - started:.1f} s")
    elif broker is not None:
        console.print(f"starting the embedded broker on {broker.bootstrap} ...")
        await broker.start()
    replication = 3 if isinstance(broker, KafkaBroker) and broker.node_count >= 3 else 1
    created = await create_topics(broker.bootstrap if broker else settings.bootstrap_servers,
                                  embedded=isinstance(broker, EmbeddedBroker), replication_factor=replication)
    if created:
        console.print(f"created topics: {', '.join(created)}", soft_wrap=True)
    console.print(f"starting {len(supervisor.names)} processes ...")
    await supervisor.start()


async def _until_stopped(work: Awaitable[Any] | None, stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first; True when `work` finished (its errors propagate)."""
    task = asyncio.ensure_future(work) if work is not None else None
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopper, *([task] if task else [])}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (stopper, task):
        if pending is not None and pending not in done:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    if task is not None and task in done:
        task.result()
        return True
    return False


def _service_origins(specs: list[ProcessSpec]) -> list[str]:
    return [_origin(s.ready_url) for s in specs if s.name in SERVICES and s.ready_url]


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event, hurry: asyncio.Event) -> Iterator[None]:
    """The first signal stops the stack (cleanly: draining first), the next ones hurry it."""
    loop = asyncio.get_running_loop()
    installed = []

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _busy_ports(settings: CommonSettings, specs: list[ProcessSpec]) -> list[str]:
    """Ports we are about to listen on that something already answers on (a stale stack, another app)."""
    wanted = [("broker", settings.broker_port)] if settings.kafka_bootstrap_servers is None else []
    wanted += [(s.name, urlsplit(s.ready_url).port) for s in specs if s.ready_url]
    return [f"{name} port {port}" for name, port in wanted if port and port_in_use(LOCALHOST, port)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _print_ready(console: Console, info: dict[str, Any], embedded_broker: bool, token: str | None) -> None:
    table = Table(title="cancelflow is up")
    table.add_column("component", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("log file", overflow="fold")
    data = Path(info["data_dir"])
    for name, component in info["components"].items():
        log_file = Path(component["log_file"]) if component["log_file"] else None
        shown = str(log_file.relative_to(data)) if log_file and log_file.is_relative_to(data) else log_file
        table.add_row(name, component["address"], str(shown or "(external)"))
    console.print(table)
    console.print(f"data dir (log files are relative to it): {data}", soft_wrap=True)
    console.print(f"status API and dashboard: {info['status_url']}", soft_wrap=True)
    if token is not None:
        # After '#': the browser never sends it, so no server or proxy logs it.
        console.print(f"dashboard, signed in as operator {EMBEDDED_OPERATOR}: {info['status_url']}/#token={token}",
                      soft_wrap=True)
        console.print(f"[dim]the CLI uses this operator's token ({TOKEN_FILE} in the data dir); "
                      "elsewhere set CANCELFLOW_TOKEN[/]")
    if embedded_broker:
        console.print(
            "[dim]note: the embedded broker keeps topics in memory: they start empty on every `up`; "
            "the service databases in the data dir persist, so a second `up` resumes from them. Ctrl-C first "
            "lets the work in flight finish (CANCELFLOW_DRAIN_SECONDS), a second Ctrl-C stops at once.[/]"
        )
    elif info.get("broker") == "kafka":
        console.print("[dim]Apache Kafka keeps its topics and records in the data dir's kafka/: a second "
                      "`up` on it resumes from them and from the service databases.[/]")
    console.print("Ctrl-C stops the stack.")
