"""The status tracker process: the faust app (streams.py), the read model database, the status feed and
the HTTP port (/healthz, /readyz, /metrics, the read API and the dashboard).

It answers the same lifecycle as `cancelflow.service.ServiceRuntime` (`run(stop)`, `started`,
`prepare_schema()`, `group_id`, `routes`), so `run_service`, the supervisor and the test harness
start it like any other service. The faust consumer group is `group_id`, also the faust app id (its
changelog topics are named after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from cancelflow import db, migrations, topics
from cancelflow.logging import get_logger
from cancelflow.messaging.consumer import Route
from cancelflow.service import Task, add_operations_routes, prepare_schema
from cancelflow.settings import ServiceSettings
from status_tracker import gauges, http, orm
from status_tracker.feed import StatusFeed
from status_tracker.projection import ReadModel
from status_tracker.streams import Streams

log = get_logger(__name__)


class TrackerRuntime:
    name = "status_tracker"

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.metadata = orm.metadata
        self.engine = db.make_engine(settings.database_url())
        self.sessions = db.session_factory(self.engine)
        self.read_model = ReadModel(self.engine, self.sessions)
        self.feed = StatusFeed(settings)
        self.group_id = f"cancelflow-{self.name}"
        # What the group reads (the test harness positions a fresh group at the end of it).
        self.routes = [Route(topics.SAGA)]
        self.migrations = migrations.package_for(self.name)
        self.tasks: list[Task] = [gauges.refresher(self.sessions)]  # open requests on /metrics
        self.streams: Streams | None = None
        self.started = False
        self.http = web.Application()
        # Reads come from the database, so they are served while the faust app still joins its group
        # and rebuilds the views table.
        add_operations_routes(self.http, self.name, {"database": lambda: db.ping(self.engine),
                                                "broker": lambda: self.feed.ping()})
        http.install(self.http, self.read_model, self.feed)

    # --- HTTP --------------------------------------------------------------------------------

    # --- lifecycle ---------------------------------------------------------------------------

    async def prepare_schema(self) -> None:
        await prepare_schema(self.engine, self.settings, self.migrations, self.metadata)

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, work until `stop` is set or a part dies, then shut down in order."""
        _quiet_faust(self.settings.log_level)
        runner = web.AppRunner(self.http, access_log=None, shutdown_timeout=2.0)
        workers: list[asyncio.Task[None]] = []
        self.streams = Streams(self.settings, app_id=self.group_id, read_model=self.read_model)
        faust_app = self.streams.app
        faust_ready = asyncio.Event()

        async def on_startup_finished() -> None:
            faust_ready.set()

        faust_app.on_startup_finished = on_startup_finished
        try:
            await self.prepare_schema()
            await runner.setup()
            await web.TCPSite(runner, self.settings.http_host, self.settings.http_port).start()
            await self.feed.start()
            workers.append(asyncio.create_task(self.feed.run(), name="status-feed"))
            faust_app.in_worker = True
            self.streams.datadir.mkdir(parents=True, exist_ok=True)
            await faust_app.start()
            # The views table is rebuilt from its changelog before the agent reads on.
            crashed = asyncio.create_task(faust_app.wait_until_stopped(), name="faust")
            workers.append(crashed)
            ready = asyncio.create_task(faust_ready.wait())
            await asyncio.wait([ready, crashed], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if crashed.done():
                raise RuntimeError(f"the faust app stopped while starting: {faust_app.crash_reason!r}")
            workers += [asyncio.create_task(task(), name=getattr(task, "__name__", "task")) for task in self.tasks]
            self.started = True
            log.info("service started", http_port=self.settings.http_port, topics=[topics.SAGA])
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait([stopper, *workers], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done:
                if task is crashed:
                    raise RuntimeError(f"the faust app stopped: {faust_app.crash_reason!r}")
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await faust_app.stop()
            await self.feed.stop()
            await runner.cleanup()
            await self.engine.dispose()
            log.info("service stopped")


def _quiet_faust(level: str) -> None:
    """faust and mode say a lot at INFO (every service starting and stopping): warnings only."""
    if level.upper() != "DEBUG":
        for name in ("faust", "mode", "aiokafka"):
            logging.getLogger(name).setLevel(logging.WARNING)
