"""Pruning the inbox: the ids of processed events are kept for a retention period, not for ever.

The inbox makes a redelivered event a no-op (messaging/uow.py): its id is found and the event dropped.
A redelivery can only bring what a topic still holds, so an id needs keeping as long as the topics
keep their records (Kafka's default retention is 7 days), and no longer: without pruning the inbox
grows by every event a service reads (six saga events per cancellation, in each service).

Every service runs an `InboxPruner` (`CANCELFLOW_INBOX_RETENTION_DAYS`, 30 by default, 0 keeps every
id): at start and then hourly it deletes the rows processed before the retention period, in chunks of
a few thousand rows per transaction, so the consume loop never waits long for the write lock. Two
instances sharing a database may both prune; deleting a deleted row is nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from cancelflow import metrics
from cancelflow.events import utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.store import MessagingTables
from cancelflow.periodic import repeat
from cancelflow.sql import Db

log = get_logger(__name__)

INTERVAL_S = 3600.0
CHUNK = 5000


class InboxPruner:
    def __init__(self, transactions: Callable[[], Any], tables: MessagingTables, *, retention_days: float,
                 interval_s: float = INTERVAL_S, chunk: int = CHUNK) -> None:
        self._transactions = transactions
        self._tables = tables
        self.retention = timedelta(days=retention_days)
        self._interval_s = interval_s
        self._chunk = chunk
        self.passes = 0  # passes of `run`, failed ones too

    @property
    def enabled(self) -> bool:
        return self.retention > timedelta(0)

    async def prune(self, now: datetime | None = None) -> int:
        """Delete every inbox row processed before `now` minus the retention; how many were deleted."""
        before = (now or utcnow()) - self.retention
        deleted = 0
        while True:
            async with self._transactions() as tx, tx.begin():
                chunk = await Db(tx).run(self._tables.inbox_prune, before=before, size=self._chunk)
            deleted += chunk
            if chunk < self._chunk:
                break
            await asyncio.sleep(0)  # let the consume loop in between chunks
        if deleted:
            metrics.INBOX_PRUNED.inc(deleted)
            log.info("inbox pruned", rows=deleted, processed_before=before.isoformat())
        return deleted

    async def run(self) -> None:
        # The database away: the rows wait for the next pass.
        await repeat(self._pass, every_s=self._interval_s, failed="inbox not pruned")

    async def _pass(self) -> None:
        try:
            await self.prune()
        finally:
            self.passes += 1
