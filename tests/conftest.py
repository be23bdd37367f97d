"""Fixtures shared by the whole suite.

- `broker` (session): the real embedded broker (Tansu) with every topic created; `.bootstrap`.
- `pg_server` (session): a PostgreSQL server from pgserver (fails the test when it cannot start: a
  suite with every PostgreSQL test skipped must not pass);
  `pg_database_url(pg_server, name)` creates a fresh database and returns its asyncpg URL.
- `store` (parametrized `sqlite` / `pg`, the latter marked `pg`): `store("billing")` gives the URL of
  a new, empty database for one service; `store.kind` says which.
- `services`: runs `ServiceRuntime`s in-process as asyncio tasks against `broker`
  (`await services.start_service("billing", store("billing"))`, or `await services.start(runtime)` for
  a runtime built by the test), and stops whatever is still running when the test ends.
- `topic_reader`: `reader = await topic_reader(topics.SAGA)` reads a topic from its beginning, without
  a consumer group; `await reader.wait_for(predicate)` returns the first envelope matching, and
  `await reader.caught_up()` returns once everything published so far has been read.
- `publisher`: an `UpstreamPublisher` on `broker`, to publish as upstream apps do.
- `eventually(condition)`: polls a (sync or async) condition until it holds, for state read over
  HTTP or from a database; never a bare sleep.
- `local_apps`: `url = await local_apps.start(app)` serves an aiohttp app (a sandbox) on loopback until
  the test ends (`stop_all()` stops them sooner, to restart them); `http`: a client session;
  `vendor_url`, `gateway_url`: the sandboxes served so.

Tests share one broker and its fixed topic names, so every test uses fresh uuid-based ids and only
asserts on records about them. Each runtime started by `services` joins a consumer group of its own
that starts at the end of its topics (committed there before it joins): it handles what the test
publishes after starting it, however long the session's history. `at_end=False` makes it read the
history too: records left by earlier tests are then handled under their own ids, and a test must
not count on them being absent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import make_engine
from cancelflow.events import Envelope
from cancelflow.messaging.gaps import GapGuard
from cancelflow.service import ServiceRuntime
from cancelflow.settings import CommonSettings
from cancelflow_tools.sandboxes.gateway import build_gateway_app
from cancelflow_tools.sandboxes.vendor import build_vendor_app
from cancelflow_tools.services import SERVICES
from cancelflow_tools.stack.broker import EmbeddedBroker, create_topics, free_port
from cancelflow_tools.upstream import UpstreamPublisher

# Tansu finishes a group join after about half the session timeout and forgets a member that left
# only when its session expires: with the services' 30 s a runtime would need ~15 s to start
# consuming (and ~55 s to resume under the same group). Test runtimes use a short session.
TEST_SESSION_TIMEOUT_MS = "2000"


def _run_blocking(coro: Awaitable[Any]) -> Any:
    """Run a coroutine to completion from a sync (session) fixture, on a loop of its own."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --- broker ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    running = EmbeddedBroker(port=free_port(), data_dir=tmp_path_factory.mktemp("broker"))
    running.start_blocking()
    try:
        _run_blocking(create_topics(running.bootstrap, embedded=True))
        yield running
    finally:
        running.stop_blocking()


# --- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
            import pgserver

            server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
        server.psql("SELECT 1;")
    except Exception as exc:  # no binary, no permissions, no shared memory, ...
        pytest.fail(f"PostgreSQL (pgserver) could not start: {exc!r}", pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()


def pg_database_url(pg_server: Any, name: str) -> str:
    """Create a new database (a unique name derived from `name`) and return its asyncpg URL."""
    database = "".join(c if c.isalnum() else "_" for c in name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    pg_server.psql(f'CREATE DATABASE "{database}";')
    socket_dir = parse_qs(urlsplit(pg_server.get_uri()).query)["host"][0]
    return f"postgresql+asyncpg://postgres@/{database}?host={socket_dir}"


@dataclass
class DatabaseFactory:
    """`factory(name)` -> the URL of a new, empty database for one service on this store."""

    kind: str
    make: Callable[[str], str]

    def __call__(self, name: str) -> str:
        return self.make(name)


@pytest.fixture(params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseFactory:
    if request.param == "pg":
        server = request.getfixturevalue("pg_server")
        return DatabaseFactory("pg", functools.partial(pg_database_url, server))

    def sqlite_url(name: str) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / f'{name}-{uuid.uuid4().hex[:8]}.db'}"

    return DatabaseFactory("sqlite", sqlite_url)


@contextlib.asynccontextmanager
async def sqlite_left_by_an_older_release(path: Path, *statements: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a new SQLite file that `statements` first set up as an earlier release left it."""
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
        yield engine
    finally:
        await engine.dispose()


# --- polling ---------------------------------------------------------------------------------------


async def eventually(condition: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05,
                     message: str = "condition") -> Any:
    """Poll `condition` (sync or async) until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout:g}s (last value: {value!r})")
        await asyncio.sleep(interval)


# --- services in-process ---------------------------------------------------------------------------


@dataclass
class RunningService:
    runtime: ServiceRuntime
    task: asyncio.Task[None]
    stop_event: asyncio.Event

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.settings.http_port}"

    @property
    def group_id(self) -> str:
        return self.runtime.group_id


class ServiceRunner:
    """Starts runtimes as tasks of the test's event loop, each stopped cleanly (stop event)."""

    def __init__(self, broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
        self.broker = broker
        self.monkeypatch = monkeypatch
        self.running: list[RunningService] = []
        # What every service reads, whatever the test: the test broker, short fetch waits and group
        # sessions, no ./var.
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap)
        monkeypatch.setenv("CANCELFLOW_FETCH_MAX_WAIT_MS", "25")
        monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", TEST_SESSION_TIMEOUT_MS)
        monkeypatch.setenv("CANCELFLOW_DATA_DIR", str(data_dir))
        monkeypatch.setenv("CANCELFLOW_ENABLE_FAULT_HOOKS", "1")

    def configure(self, service: str, database_url: str, **env: str) -> int:
        """Set the environment `build()` reads for `service`; return the HTTP port it will listen on.

        `env` adds or replaces variables: VENDOR_API_URL, GATEWAY_API_URL, SMTP_HOST, SMTP_PORT, ...
        """
        prefix, _ = SERVICES[service]
        port = free_port()
        self.monkeypatch.setenv(f"{prefix}_DATABASE_URL", database_url)
        self.monkeypatch.setenv(f"{prefix}_HTTP_PORT", str(port))
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        return port

    async def start_service(self, service: str, database_url: str, *, group_id: str | None = None,
                            at_end: bool | None = None, **env: str) -> RunningService:
        """Build `<service>.bootstrap.build()` with the test's settings and start it."""
        self.configure(service, database_url, **env)
        build = importlib.import_module(f"{service}.bootstrap").build
        return await self.start(build(), group_id=group_id, at_end=at_end)

    async def start(self, runtime: ServiceRuntime, *, group_id: str | None = None, at_end: bool | None = None,
                    timeout: float = 60.0) -> RunningService:
        """Run `runtime` until `stop()`; returns once it consumes (its group joined).

        Without `group_id` the runtime gets a consumer group of its own. `at_end` (the default for a
        group of its own) first commits the group's offsets at the end of the runtime's topics, so it
        handles only what is published after this returns; `at_end=False` reads the topics' history
        (other tests' records included); a given `group_id` resumes from its committed offsets.
        """
        runtime.group_id = group_id or f"{runtime.group_id}-{uuid.uuid4().hex[:8]}"
        if at_end if at_end is not None else group_id is None:
            await _commit_at_end(self.broker.bootstrap, runtime.group_id, [r.topic for r in runtime.routes])
        stop_event = asyncio.Event()
        task = asyncio.create_task(runtime.run(stop_event), name=f"service-{runtime.name}")
        running = RunningService(runtime, task, stop_event)
        self.running.append(running)
        deadline = time.monotonic() + timeout
        while not runtime.started:
            if task.done():
                task.result()  # raises what stopped it
                raise AssertionError(f"{runtime.name} stopped while starting")
            if time.monotonic() > deadline:
                raise AssertionError(f"{runtime.name} did not start within {timeout:g}s")
            await asyncio.sleep(0.02)
        return running

    async def stop(self, running: RunningService, timeout: float = 30.0) -> None:
        """Set the stop event and wait for a clean shutdown; re-raise what the runtime died of."""
        running.stop_event.set()
        if running in self.running:
            self.running.remove(running)
        await asyncio.wait_for(running.task, timeout)

    async def stop_all(self) -> None:
        errors = []
        for running in list(self.running):
            try:
                await self.stop(running)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


async def _commit_at_end(bootstrap: str, group_id: str, topic_names: list[str]) -> None:
    """Commit `group_id`'s offsets at the current end of every partition of the topics (the group
    must have no members: the commit is made from outside it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(t, p) for t in topic_names for p in consumer.partitions_for_topic(t) or ()]
        if tps:
            consumer.assign(tps)
            await consumer.commit(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


@pytest.fixture
async def services(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch,
                   tmp_path: Path) -> AsyncIterator[ServiceRunner]:
    runner = ServiceRunner(broker, monkeypatch, tmp_path / "var")
    try:
        yield runner
    finally:
        await runner.stop_all()


# --- reading topics --------------------------------------------------------------------------------


@dataclass
class TopicReader:
    """Every envelope on a topic, from its first record on (no consumer group, all partitions).

    Records that are not envelopes are kept in `undecodable`. Waiting is event-driven: `wait_for`
    wakes up whenever new records arrive.
    """

    topic: str
    bootstrap: str
    envelopes: list[Envelope] = field(default_factory=list)
    records: dict[str, ConsumerRecord] = field(default_factory=dict)  # by event_id
    undecodable: list[ConsumerRecord] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> TopicReader:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            fetch_max_wait_ms=25, max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self._consumer.start()
        await self._consumer.topics()  # fetches the metadata partitions_for_topic reads
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        assert partitions, f"topic {self.topic} has no partitions"
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read(), name=f"reader-{self.topic}")
        return self

    async def _read(self) -> None:
        assert self._consumer is not None
        gaps = GapGuard()  # the embedded broker's fetches can skip a record being written
        while True:
            batch = await gaps.check(self._consumer, await self._consumer.getmany(timeout_ms=200))
            if not batch:
                continue
            for records in batch.values():
                for record in records:
                    self._keep(record)
            async with self._arrived:
                self._arrived.notify_all()

    def _keep(self, record: ConsumerRecord) -> None:
        try:
            envelope = Envelope.model_validate(orjson.loads(record.value or b""))
        except (orjson.JSONDecodeError, ValidationError):
            self.undecodable.append(record)
            return
        self.envelopes.append(envelope)
        self.records[str(envelope.event_id)] = record

    def matching(self, predicate: Callable[[Envelope], bool]) -> list[Envelope]:
        return [e for e in self.envelopes if predicate(e)]

    def record_of(self, envelope: Envelope) -> ConsumerRecord:
        """The Kafka record an envelope came in (partition, offset, key, value)."""
        return self.records[str(envelope.event_id)]

    async def wait_for(self, predicate: Callable[[Envelope], bool], *, timeout: float = 20.0) -> Envelope:
        """The first envelope matching `predicate` (already read or still to come)."""
        return (await self.wait_for_count(predicate, 1, timeout=timeout))[0]

    async def wait_for_count(self, predicate: Callable[[Envelope], bool], count: int, *,
                             timeout: float = 20.0) -> list[Envelope]:
        """Wait until at least `count` envelopes match; return all that match."""

        async def enough() -> list[Envelope]:
            async with self._arrived:
                while len(found := self.matching(predicate)) < count:
                    if self._task is not None and self._task.done():
                        self._task.result()
                    await self._arrived.wait()
                return found

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            recent = [f"{e.event_type}({e.correlation_id})" for e in self.envelopes[-15:]]
            raise AssertionError(
                f"{self.topic}: {len(self.matching(predicate))} of {count} matching envelopes within "
                f"{timeout:g}s; {len(self.envelopes)} read, the last: {recent}"
            ) from None

    async def caught_up(self, *, timeout: float = 20.0) -> None:
        """Wait until every record on the topic right now has been read: after it, what the reader
        has not seen was not there (for "nothing else was published" checks)."""
        assert self._consumer is not None
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)

        async def reached() -> bool:
            assert self._consumer is not None
            positions = [await self._consumer.position(tp) for tp in ends]
            return all(position >= end for position, end in zip(positions, ends.values(), strict=True))

        await eventually(reached, timeout=timeout, message=f"{self.topic} read to its end")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


@pytest.fixture
async def topic_reader(broker: EmbeddedBroker) -> AsyncIterator[Callable[[str], Awaitable[TopicReader]]]:
    readers: list[TopicReader] = []

    async def open_reader(topic: str) -> TopicReader:
        reader = TopicReader(topic, broker.bootstrap)
        readers.append(reader)
        return await reader.start()

    try:
        yield open_reader
    finally:
        for reader in readers:
            await reader.stop()


@pytest.fixture
async def publisher(broker: EmbeddedBroker) -> AsyncIterator[UpstreamPublisher]:
    settings = CommonSettings(kafka_bootstrap_servers=broker.bootstrap)
    async with UpstreamPublisher(settings, producer_name="tests") as pub:
        yield pub


# --- local HTTP apps -------------------------------------------------------------------------------


class LocalApps:
    """aiohttp apps (the sandboxes, say) on loopback ports, stopped, and restartable, by the test."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []

    async def start(self, app: web.Application) -> str:
        """Serve `app` on a free port; its base URL."""
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop_all(self) -> None:
        while self.runners:
            await self.runners.pop().cleanup()


@pytest.fixture
async def local_apps() -> AsyncIterator[LocalApps]:
    apps = LocalApps()
    yield apps
    await apps.stop_all()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def vendor_url(local_apps: LocalApps) -> str:
    """The vendor sandbox on loopback (a call a timeout rule holds is answered after 5 s)."""
    return await local_apps.start(build_vendor_app(hang_seconds=5))


@pytest.fixture
async def gateway_url(local_apps: LocalApps) -> str:
    """The payment gateway sandbox on loopback (a call a timeout rule holds is answered after 5 s)."""
    return await local_apps.start(build_gateway_app(hang_seconds=5))
