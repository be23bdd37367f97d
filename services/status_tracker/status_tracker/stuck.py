"""The stuck-request timer: an open request with no progress for STUCK_AFTER_SECONDS gets `RequestStuck`.

The event goes through the outbox onto the saga topic, keyed by request_id, so the tracker folds it like
any other (the request ends `manual_review`, or the event is dropped when the request moved on
meanwhile) and notification alerts support. Only requests of partitions this replica reads to their
end count: a backlog may hold the very progress that would make the alert false.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from aiokafka import AIOKafkaConsumer

from cancelflow import topics
from cancelflow.events import utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat
from status_tracker import tracking
from status_tracker.projection import ReadModel

log = get_logger(__name__)


class StuckTimer:
    def __init__(self, read_model: ReadModel, new_uow: Callable[[], UnitOfWork],
                 consumer: Callable[[], AIOKafkaConsumer | None], *, after_s: float) -> None:
        self._read_model = read_model
        self._new_uow = new_uow
        self._consumer = consumer
        self.after_s = after_s
        self.interval_s = min(30.0, max(0.5, after_s / 4))
        self._flagged: dict[str, float] = {}  # request_id -> when RequestStuck was emitted (monotonic)

    async def run(self) -> None:
        # Database or broker away: the next tick tries again.
        await repeat(self.flag_stuck, every_s=self.interval_s, at_once=False, failed="stuck-request check failed")

    async def caught_up_partitions(self) -> set[int]:
        consumer = self._consumer()
        if consumer is None:
            return set()
        current = set()
        for tp in consumer.assignment():
            if tp.topic != topics.SAGA:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater:
                current.add(tp.partition)
        return current

    async def flag_stuck(self) -> list[str]:
        current = await self.caught_up_partitions()
        if not current:
            return []
        now = utcnow()
        candidates = [e for e in await self._read_model.stuck_candidates(now - timedelta(seconds=self.after_s))
                      if e.get("partition") in current]
        reflag_after = max(60.0, self.after_s)
        flagged = []
        for stuck in tracking.overdue(candidates, now, self.after_s):
            request_id = str(stuck.request_id)
            if time.monotonic() - self._flagged.get(request_id, float("-inf")) < reflag_after:
                continue  # emitted already; not folded yet
            async with self._new_uow() as uow:
                uow.emit(stuck, correlation_id=request_id, key=request_id)
                await uow.commit()
            self._flagged[request_id] = time.monotonic()
            flagged.append(request_id)
            log.warning("request stuck", request_id=request_id, stage=stuck.stage,
                        stuck_for_seconds=stuck.stuck_for_seconds)
        return flagged
