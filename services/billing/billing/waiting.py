"""Settles the requests waiting for their subscription's facts (handlers.AWAITING_FACTS).

A request usually leaves the wait when its subscription's facts are handled (in that transaction). This
task covers the rest, every `interval_s` while any waits: it rejects a request as unknown once the facts
are read up to when it arrived, or once it has waited `facts_wait_s`. Durable like the scheduler: the wait
is a row in billing's database, so a restart finds it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from billing.repository import BillingRepository
from cancelflow.logging import get_logger
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat

log = get_logger(__name__)
Settle = Callable[[UnitOfWork, str], Awaitable[bool]]


class FactsWaiter:
    def __init__(self, new_uow: Callable[[], UnitOfWork], settle: Settle, *, interval_s: float = 0.5) -> None:
        self.new_uow = new_uow
        self.settle = settle
        self.interval_s = interval_s
        self._maybe_waiting = True  # until a round finds none (a restart may find some)
        self._wakeup = asyncio.Event()

    def notify(self) -> None:
        self._maybe_waiting = True
        self._wakeup.set()

    async def run(self) -> None:
        await repeat(self.settle_round, every_s=self.interval_s, wakeup=self._wakeup,
                     failed="waiting requests not settled")

    async def settle_round(self) -> int:
        """Settle what can be; the number of requests that still wait."""
        if not self._maybe_waiting:
            return 0
        async with self.new_uow() as uow:
            waiting = await BillingRepository(uow.db).awaiting_facts()
        left = 0
        for request_id in waiting:
            with structlog.contextvars.bound_contextvars(request_id=request_id, correlation_id=request_id):
                async with self.new_uow() as uow:
                    if await self.settle(uow, request_id):
                        await uow.commit(mark_processed=None)
                    else:
                        left += 1
        self._maybe_waiting = left > 0
        return left
