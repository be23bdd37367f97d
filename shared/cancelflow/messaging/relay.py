"""The outbox relay: publishes committed outbox rows in insertion order, then deletes them.

A row is deleted only after the broker acknowledged it, so a crash between the two republishes it;
consumers drop the copy by its event_id (at-least-once delivery, exactly-once effect).

Instances of a service share a database and so an outbox. Their relays take turns: a round (read,
publish, delete) runs under a lock on the database (`db.relay_round_lock`: a file lock next to a
SQLite file, an advisory lock on PostgreSQL), so each row is published once and in order, whichever
instance wrote it. A relay that finds the lock taken tries again shortly: the holder may have read
the outbox before this instance's newest rows were committed.

On Apache Kafka the producer is idempotent. If it loses its sequence state for good (a batch it gave up
on while the broker was down leaves a gap: every later send fails with OutOfOrderSequenceNumber), the
relay stops it, starts a new producer (a new producer id) and publishes the round's rows again: they
were not deleted, so nothing is lost, and they go out in their order, after every record of the old
producer (docs/performance.md, item 35).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from cancelflow import metrics
from cancelflow.db import RoundLock, no_lock
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import EVENT_TYPE_HEADER
from cancelflow.messaging.signatures import SIGNATURE_HEADER, signature_headers
from cancelflow.messaging.store import MessagingTables
from cancelflow.periodic import repeat
from cancelflow.sql import Db

log = get_logger(__name__)

BUSY = -1  # publish_pending: another relay is in a round
# What an idempotent producer does not come back from by itself (aiokafka 0.14; the Java client bumps
# its epoch): the relay replaces it.
PRODUCER_STATE_LOST = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, InvalidProducerIdMapping,
                       ProducerFenced)


class OutboxRelay:
    def __init__(self, sessions: Callable[[], Any], tables: MessagingTables,
                 producer: AIOKafkaProducer, *, batch_size: int = 500, idle_poll_s: float = 0.5,
                 round_lock: RoundLock = no_lock, busy_retry_s: float = 0.02,
                 reads: Callable[[], Any] | None = None, signer: tuple[str, str] | None = None,
                 new_producer: Callable[[], AIOKafkaProducer] | None = None, stop_timeout_s: float = 10.0) -> None:
        self._sessions = sessions
        # (service, key): every record is signed as this service's (CONTRACT.md section 10); None: unsigned.
        self._signer = signer
        # The look at the outbox needs no transaction (`db.reads`: on SQLite it then does not wait for
        # the write lock, which the consume loop holds for a poll's batch).
        self._reads = reads or sessions
        self._round_lock = round_lock
        self._busy_retry_s = busy_retry_s
        self._tables = tables
        self._producer = producer
        # A fresh producer when this one's state is lost (PRODUCER_STATE_LOST); None: the error is raised.
        self._new_producer = new_producer
        self._producer_started = True  # the first one is started by its owner
        self._stop_timeout_s = stop_timeout_s
        self.producers_replaced = 0
        self._batch_size = batch_size
        self._idle_poll_s = idle_poll_s
        self._wakeup = asyncio.Event()

    @property
    def producer(self) -> AIOKafkaProducer:
        """The producer in use (a replacement after a lost producer state)."""
        return self._producer

    def notify(self) -> None:
        """Called after a commit that added outbox rows, so publishing does not wait for the poll."""
        self._wakeup.set()

    async def run(self) -> None:
        await repeat(self.publish_pending, every_s=self._idle_poll_s, wakeup=self._wakeup,
                     failed="outbox relay could not publish", then=self._pause_after)

    def _pause_after(self, published: int | None) -> float | None:
        if published is None:  # broker or database away: keep the rows, try again shortly
            return 1.0
        if published == BUSY:
            return self._busy_retry_s
        return 0 if published >= self._batch_size else None  # a full batch: more may wait

    async def publish_pending(self) -> int:
        """One round: the rows published, or BUSY when another relay of this outbox is in a round."""
        async with self._round_lock() as ours:
            if not ours:
                return BUSY
            return await self._round()

    def _headers(self, row: dict[str, Any]) -> list[tuple[str, bytes]]:
        headers = [*((k, v.encode()) for k, v in (row["headers"] or {}).items()),
                   (EVENT_TYPE_HEADER, row["event_type"].encode())]
        # A row signed already (an operator's request, written as an upstream app) keeps its signature.
        if self._signer is not None and not any(name == SIGNATURE_HEADER for name, _ in headers):
            headers += signature_headers(bytes(row["value"]), *self._signer)
        return headers

    async def _round(self) -> int:
        async with self._reads() as session:
            rows = await Db(session).all(self._tables.outbox_head, size=self._batch_size)
        if not rows:
            metrics.OUTBOX_BACKLOG.set(0)
            return 0
        if not self._producer_started:
            await self._start_replacement()
        try:
            await self._publish(rows)
        except PRODUCER_STATE_LOST as exc:
            if self._new_producer is None:
                raise
            await self._replace_producer(exc)
            raise
        for row in rows:
            metrics.EVENTS_PRODUCED.labels(row["topic"], row["event_type"]).inc()
        async with self._sessions() as session, session.begin():
            db = Db(session)
            # by id, not by range: on PostgreSQL a lower id may commit after a higher one
            await db.run_many(self._tables.outbox_remove, [{"row_id": row["id"]} for row in rows])
            backlog = await db.scalar(self._tables.outbox_backlog)
        metrics.OUTBOX_BACKLOG.set(backlog)
        return len(rows)

    async def _publish(self, rows: list[dict[str, Any]]) -> None:
        # send() keeps per-partition order; awaiting every future before deleting keeps the
        # at-least-once guarantee.
        futures = [
            await self._producer.send(
                row["topic"],
                value=row["value"],
                key=row["key"].encode() if row["key"] is not None else None,
                headers=self._headers(row),
            )
            for row in rows
        ]
        await asyncio.gather(*futures)

    async def _replace_producer(self, error: Exception) -> None:
        """Stop the producer whose state is lost, then make a new one (started by the next round). The
        old one is stopped first, so none of its records can land after the new one's."""
        assert self._new_producer is not None
        old = self._producer
        log.warning("outbox relay replaces its producer", error=repr(error))
        try:
            await asyncio.wait_for(old.stop(), self._stop_timeout_s)
        except Exception:  # noqa: BLE001 (a broker away: stop() waits for batches it retries for good)
            await _abort(old)
        self._producer = self._new_producer()
        self._producer_started = False
        self.producers_replaced += 1
        metrics.PRODUCERS_REPLACED.inc()

    async def _start_replacement(self) -> None:
        try:
            await self._producer.start()
        except Exception:
            await _abort(self._producer)
            assert self._new_producer is not None
            self._producer = self._new_producer()  # a producer whose start failed cannot start again
            raise
        self._producer_started = True


async def _abort(producer: AIOKafkaProducer) -> None:
    """Stop a producer without waiting for its batches: its sender task and its connections go."""
    with contextlib.suppress(Exception):
        await producer._sender.close()  # noqa: SLF001 (aiokafka has no abort)
    with contextlib.suppress(Exception):
        await producer.client.close()
