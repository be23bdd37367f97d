"""Runs end-of-term cancellations when their period ends. A scheduled one is a row, and starting it (lock,
vendor request in the outbox, new state) is one transaction: a restart runs what is still scheduled, once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy import bindparam, select

from billing import orm
from billing.cancellation import State
from billing.clock import Clock
from cancelflow.logging import get_logger
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat
from cancelflow.sql import Query

log = get_logger(__name__)
Start = Callable[[UnitOfWork, str], Awaitable[bool]]

_cancellations = orm.cancellations
DUE = Query(select(_cancellations.c.request_id).where(
    (_cancellations.c.state == State.SCHEDULED.value) & (_cancellations.c.run_on <= bindparam("today"))
).order_by(_cancellations.c.run_on, _cancellations.c.created_at).limit(200))


class EndOfTermScheduler:
    def __init__(self, new_uow: Callable[[], UnitOfWork], start: Start, clock: Clock, *,
                 interval_s: float = 30.0) -> None:
        self.new_uow = new_uow
        self.start = start
        self.clock = clock
        self.interval_s = interval_s
        self._wakeup = asyncio.Event()

    def notify(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        await repeat(self.run_due, every_s=self.interval_s, wakeup=self._wakeup, failed="scheduler round failed")

    async def run_due(self) -> int:
        async with self.new_uow() as uow:
            due = [row["request_id"] for row in await uow.db.all(DUE, today=self.clock.today())]
        started = 0
        for request_id in due:
            with structlog.contextvars.bound_contextvars(request_id=request_id, correlation_id=request_id):
                async with self.new_uow() as uow:
                    if await self.start(uow, request_id):
                        await uow.commit(mark_processed=None)
                        started += 1
        if started:
            log.info("end-of-term cancellations started", count=started)
        return started
