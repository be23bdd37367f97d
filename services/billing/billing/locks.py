"""A lock never outlives its request, even one the status tracker never heard of.

The tracker sets a request aside after STUCK_AFTER_SECONDS without progress, and billing releases its
lock on that `RequestStuck`. A request whose every saga record was lost (kill -9 of the embedded broker
right after billing took the lock) is unknown to the tracker, so no `RequestStuck` comes: this task
releases such a lock once it has waited twice that long for the vendor's answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from billing.repository import BillingRepository
from cancelflow.events import utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat

log = get_logger(__name__)
Release = Callable[..., Awaitable[bool]]


class OverdueLocks:
    def __init__(self, new_uow: Callable[[], UnitOfWork], release: Release, *, stuck_after_s: float) -> None:
        self.new_uow = new_uow
        self.release = release
        self.after = timedelta(seconds=2 * stuck_after_s)  # the tracker's RequestStuck comes first
        self.interval_s = min(30.0, max(0.5, stuck_after_s / 2))

    async def run(self) -> None:
        await repeat(self.release_overdue, every_s=self.interval_s, at_once=False, failed="overdue locks not checked")

    async def release_overdue(self) -> int:
        async with self.new_uow() as uow:
            overdue = await BillingRepository(uow.db).overdue_locks(utcnow() - self.after)
        released = 0
        for request_id in overdue:
            with structlog.contextvars.bound_contextvars(request_id=request_id, correlation_id=request_id):
                async with self.new_uow() as uow:
                    if await self.release(uow, request_id, why="no vendor answer and no word from the tracker"):
                        await uow.commit(mark_processed=None)
                        released += 1
        return released
