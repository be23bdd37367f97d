"""A service process: its database, the consume loop, the outbox relay and its HTTP port.

A service's bootstrap builds a `ServiceRuntime`, adds its routes (topic -> handlers), HTTP routes
and background tasks, and calls `run_service`. Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import MetaData, func, select

from cancelflow import db, migrations
from cancelflow import logging as cf_logging
from cancelflow.events import Payload, Source
from cancelflow.http_guard import allowed_hosts, guard
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.dispatch import Route
from cancelflow.messaging.facts import FactsProgress
from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.kafka import Membership, make_consumer, make_producer
from cancelflow.messaging.relay import OutboxRelay
from cancelflow.messaging.retention import InboxPruner
from cancelflow.messaging.signatures import SignatureCheck
from cancelflow.messaging.store import MessagingTables
from cancelflow.messaging.uow import OUTBOX, UnitOfWork
from cancelflow.settings import ServiceSettings
from cancelflow.sql import Db

log = get_logger(__name__)

Task = Callable[[], Coroutine[Any, Any, None]]


def json_response(value: object, status: int = 200) -> web.Response:
    """JSON for the read endpoints: dates, decimals and UUIDs as strings; SQLAlchemy row keys allowed."""
    body = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json")


def add_operations_routes(app: web.Application, name: str,
                          checks: dict[str, Callable[[], Awaitable[object]]]) -> None:
    """`/healthz` (the process answers), `/readyz` (every dependency in `checks` answers within 3 s)
    and `/metrics` (Prometheus), the same on every service."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": name, "pid": os.getpid()})

    async def readyz(_request: web.Request) -> web.Response:
        problems: dict[str, str] = {}
        for dependency, check in checks.items():
            try:
                await asyncio.wait_for(check(), 3)
            except Exception as exc:
                problems[dependency] = repr(exc)
        return web.json_response({"ready": not problems, "service": name, "problems": problems},
                                 status=503 if problems else 200)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def prepare_schema(engine: object, settings: ServiceSettings, migrations_package: str | None,
                         metadata: MetaData) -> None:
    """A service's tables: Alembic migrations to head on PostgreSQL (when the service has an
    environment, see cancelflow.migrations); create_all on SQLite, the embedded default."""
    if migrations_package is not None and not db.is_sqlite(settings.database_url()):
        await migrations.upgrade_to_head(engine, migrations_package, metadata)  # type: ignore[arg-type]
    else:
        await db.create_schema(engine, metadata)  # type: ignore[arg-type]


class ServiceRuntime:
    def __init__(self, name: str, settings: ServiceSettings, metadata: MetaData, tables: MessagingTables, *,
                 failure_source: Source | None = None) -> None:
        self.name = name
        self.failure_source = failure_source  # the saga step it owns (None: it only observes)
        self.settings = settings
        self.metadata = metadata
        self.tables = tables
        self.engine = db.make_engine(settings.database_url())
        self.sessions = db.session_factory(self.engine)  # HTTP views, maintenance
        self.transactions = db.transactions(self.engine)  # units of work and the relay (cancelflow.db)
        def new_producer() -> AIOKafkaProducer:  # idempotent on Apache Kafka
            return make_producer(settings, client_id=f"cancelflow-{name}", idempotent=True)

        self.producer = new_producer()  # the first; the relay replaces it if its state is lost
        signing_key = settings.service_signing_key(name)
        self.relay = OutboxRelay(self.transactions, tables, self.producer, reads=db.reads(self.engine),
                                 round_lock=db.relay_round_lock(settings.database_url(), self.engine),
                                 signer=(name, signing_key) if signing_key else None, new_producer=new_producer)
        self.routes: list[Route] = []
        # Browsers: no foreign Origin on a change, no foreign Host at all (cancelflow/http_guard.py).
        self.http = web.Application(middlewares=[guard(allowed_hosts(settings.http_host, settings.allowed_hosts))])
        self.tasks: list[Task] = []
        self.inbox_pruner = InboxPruner(self.transactions, tables, retention_days=settings.inbox_retention_days)
        if self.inbox_pruner.enabled:
            self.tasks.append(self.inbox_pruner.run)
        self.on_start: list[Task] = []
        self.on_stop: list[Task] = []
        # Who to wake after a commit, by what the transaction wrote (`UnitOfWork.wrote`): the relay
        # for outbox rows. A commit that wrote nothing they wait for wakes no one (measured: most of a
        # service's commits, each followed by an empty relay round).
        self.wakeups: dict[str, list[Callable[[], None]]] = {OUTBOX: [self.relay.notify]}
        self.group_id = f"cancelflow-{name}"
        # "<service>.migrations" when the service has an Alembic environment (used on PostgreSQL).
        self.migrations = migrations.package_for(name)
        self.started = False
        self.loop: ConsumeLoop | None = None  # while running
        # More of what `/inflight` reports (the status tracker adds its open and finished requests).
        self.inflight_reports: list[Callable[[], Awaitable[dict[str, int]]]] = []
        self.consumer: AIOKafkaConsumer | None = None  # while running, the group member reading `routes`
        self.membership = Membership()
        self.facts = FactsProgress()  # how far the routes marked `facts` are read (filled while consuming)
        self._write_lock = asyncio.Lock() if db.is_sqlite(settings.database_url()) else None
        add_operations_routes(self.http, name, {
            "database": lambda: db.ping(self.engine),
            "broker": lambda: self.relay.producer.client.fetch_all_metadata(),
            "consumer": self._consuming,
        })
        self.http.router.add_get("/inflight", self._inflight)

    def new_uow(self, message: Message[Payload] | None = None) -> UnitOfWork:
        return UnitOfWork(self.transactions, self.tables, producer=self.name, message=message,
                          on_commit=self._committed, write_lock=self._write_lock)

    async def _consuming(self) -> None:
        """Ready means consuming: the consumer has joined its group and holds its assignment (until
        then the service answers but handles nothing, however healthy its database and broker)."""
        if self.routes and not self.membership.joined:
            raise RuntimeError("the consumer has not joined its group yet" if self.started
                               else "not started yet")

    async def _inflight(self, _request: web.Request) -> web.Response:
        """The work this service has in flight: records of its partitions not handled yet, and events
        committed but not published yet (`cancelflow up` drains them before a clean stop)."""
        try:
            found = {"unhandled": await asyncio.wait_for(self.loop.unhandled(), 3) if self.loop else 0,
                     "unpublished": await self._unpublished()}
            for report in self.inflight_reports:
                found.update(await report())
        except Exception as exc:  # the broker or the database away: nobody can say
            return web.json_response({"error": repr(exc)}, status=503)
        return web.json_response(found)

    async def _unpublished(self) -> int:
        async with self.sessions() as session:
            return int((await session.execute(select(func.count()).select_from(self.tables.outbox))).scalar_one())

    def wake_on(self, written: str, callback: Callable[[], None]) -> None:
        """Call `callback` after each commit of a unit of work that `wrote(written)`."""
        self.wakeups.setdefault(written, []).append(callback)

    def _committed(self, written: frozenset[str]) -> None:
        for what in written:
            for callback in self.wakeups.get(what, ()):
                callback()

    def add_route(self, route: Route) -> None:
        self.routes.append(route)

    # --- HTTP --------------------------------------------------------------------------------

    def add_view(self, path: str, read: Callable[..., Awaitable[object | None]], *, missing: str = "not found") -> None:
        """A read-only GET: `read(db, **the path's parameters)` in one session, as JSON; a 404 saying
        `missing` when it finds nothing (None)."""

        async def view(request: web.Request) -> web.Response:
            async with self.sessions() as session:
                body = await read(Db(session), **request.match_info)
            return json_response({"error": missing}, 404) if body is None else json_response(body)

        self.http.router.add_get(path, view)

    # --- lifecycle ---------------------------------------------------------------------------

    async def prepare_schema(self) -> None:
        await prepare_schema(self.engine, self.settings, self.migrations, self.metadata)
        if db.is_sqlite(self.settings.database_url()):
            await db.sqlite_outbox_ids_never_reused(self.engine, self.tables.outbox)

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, work until `stop` is set or a worker dies, then shut down in order.

        Startup itself is cancellable: a SIGTERM while the broker is still being reached stops
        the process at once (the caller cancels this coroutine).
        """
        consumer = None
        runner = web.AppRunner(self.http, access_log=None)
        workers: list[asyncio.Task[None]] = []
        try:
            await self.prepare_schema()
            await runner.setup()
            # Loopback by default; containers set CANCELFLOW_HTTP_HOST=0.0.0.0.
            await web.TCPSite(runner, self.settings.http_host, self.settings.http_port).start()
            await self.producer.start()
            for hook in self.on_start:
                await hook()
            workers.append(asyncio.create_task(self.relay.run(), name="relay"))
            topics = [r.topic for r in self.routes]
            if topics:
                gap_guard = GapGuard(grace_s=self.settings.offset_gap_grace_ms / 1000)
                consumer = make_consumer(self.settings, *topics, group_id=self.group_id,
                                         client_id=f"cancelflow-{self.name}", gap_guard=gap_guard,
                                         membership=self.membership)
                await consumer.start()
                self.consumer = consumer
                self.loop = loop = ConsumeLoop(consumer, self.routes, self.new_uow, service=self.name,
                                   group_id=self.group_id, failure_source=self.failure_source,
                                   signatures=SignatureCheck.from_text(self.settings.producer_keys,
                                                                       self.settings.service_keys),
                                   concurrency=self.settings.handler_concurrency, gap_guard=gap_guard,
                                   facts=self.facts)
                workers.append(asyncio.create_task(loop.run(), name="consume"))
            workers += [asyncio.create_task(task(), name=getattr(task, "__name__", "task"))
                        for task in self.tasks]
            self.started = True
            log.info("service started", http_port=self.settings.http_port, topics=topics)
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait([stopper, *workers], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await self._shutdown(consumer, runner)

    async def _shutdown(self, consumer: object, runner: web.AppRunner) -> None:
        for hook in self.on_stop:
            with contextlib.suppress(Exception):
                await hook()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.relay.publish_pending(), 5)
        with contextlib.suppress(Exception):
            await self.relay.producer.stop()
        await runner.cleanup()
        await self.engine.dispose()
        log.info("service stopped")


def run_service(name: str, build: Callable[[], ServiceRuntime]) -> None:
    """The `python -m <service>` entry: logging, signals, run until SIGTERM/SIGINT."""

    async def main() -> None:
        runtime = build()
        cf_logging.configure(name, level=runtime.settings.log_level, json=runtime.settings.log_json)
        stop = asyncio.Event()
        running = asyncio.create_task(runtime.run(stop))

        def on_signal() -> None:
            stop.set()
            # Still starting (e.g. waiting for the broker): nothing to drain, stop right away.
            if not runtime.started:
                running.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await running

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # the supervisor restarts us; say why we died
        get_logger(name).error("service crashed", error=repr(exc), exc_info=exc)
        sys.exit(1)
