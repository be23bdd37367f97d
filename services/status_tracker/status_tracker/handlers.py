"""The single writer of `cancellations.status`: each saga record in, at most one status record out.

Per record: decode (a bad one goes to `cancellations.dlq`: the tracker owns DLQ duty for the saga
topic), `tracking.track` against the request's entry in the table, then in this order:
1. the read model row (idempotent upsert: an older version never overwrites a newer one),
2. the status record, waiting for the broker's acknowledgement,
3. the table entry (its changelog makes the next version, and the event id that must not count twice).
A crash anywhere repeats only idempotent steps: the read model write, or the same status record (same
event_id) that consumers drop. The storage is injected (the faust tables in production, dicts in tests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from cancelflow import metrics, topics
from cancelflow.events import envelope_for
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import BadRecord, Message, decode, encode
from cancelflow.messaging.deadletter import (
    count_dead_lettered,
    dead_letter_record,
    handle_with_retries,
    marker_of,
)
from status_tracker import fold, tracking
from status_tracker.projection import ReadModel
from status_tracker.tracking import Entry

log = get_logger(__name__)

Publish = Callable[[str, str | None, bytes], Awaitable[None]]  # topic, key, value; returns once acknowledged
HANDLED = frozenset(fold.SAGA_EVENT_TYPES)


class Entries(Protocol):
    def get(self, request_id: str) -> Entry | None: ...
    def put(self, request_id: str, entry: Entry) -> None: ...
    def values(self) -> Iterable[Entry]: ...


class Markers(Protocol):
    def __contains__(self, marker: object) -> bool: ...
    def add(self, marker: str) -> None: ...


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class SagaProcessor:

    def __init__(self, *, entries: Entries, dead_lettered: Markers, read_model: ReadModel, publish: Publish,
                 group_id: str) -> None:
        self._entries = entries
        self._dead_lettered = dead_lettered
        self._read_model = read_model
        self._publish = publish
        self._group_id = group_id

    async def process(self, record: Record) -> None:
        try:
            message = decode(record.value, topic=record.topic, partition=record.partition,
                             offset=record.offset, key=record.key)
        except BadRecord as bad:
            with structlog.contextvars.bound_contextvars(topic=record.topic, request_id=bad.request_id):
                await self._dead_letter(record, bad.reason, bad.detail, bad.request_id)
            return
        if message.event_type not in HANDLED:
            return  # a saga event that changes nothing a support person sees
        request_id = str(message.payload.request_id)  # type: ignore[attr-defined]
        with structlog.contextvars.bound_contextvars(
            event_type=message.event_type, event_id=message.event_id, request_id=request_id,
            correlation_id=message.envelope.correlation_id,
        ):
            await self._handle(record, message, request_id)

    async def _handle(self, record: Record, message: Message, request_id: str) -> None:
        async def attempt() -> None:
            started = time.perf_counter()
            await self.apply(message, request_id)
            metrics.EVENTS_CONSUMED.labels(record.topic, message.event_type).inc()
            metrics.HANDLER_SECONDS.labels(message.event_type).observe(time.perf_counter() - started)

        async def give_up(exc: Exception) -> None:
            # The tracker only observes: its failure says nothing about the cancellation itself, so no
            # `Failed` is emitted (see ConsumeLoop._reports_step_failures).
            await self._dead_letter(record, "handler_error",
                                    f"status_tracker could not handle {message.event_type}: {exc!r}", request_id)

        await handle_with_retries(attempt, event_type=message.event_type, give_up=give_up)

    async def apply(self, message: Message, request_id: str) -> None:
        before = self._entries.get(request_id)
        stored = await self._read_model.entry(request_id)
        recovered = stored is not None and (before is None or stored["version"] > before["version"])
        if recovered:
            # A kill -9 lost the table's last changelog write after the offset was committed; the read
            # model, committed before the status record was published, has the step.
            log.warning("tracker table behind its read model: recovered", request_id=request_id,
                        table_version=before and before["version"], stored_version=stored["version"])
            before = stored
        step = tracking.track(before, message)
        if step.duplicate:
            if recovered:
                # The crash may also have come before the status record went out: publish that version's
                # record again (deterministic, so an identical copy at worst) and restore the table.
                assert before is not None
                status = tracking.status_envelope(before, causation_id=message.event_id)
                await self._publish(topics.STATUS, request_id, encode(status))
                self._entries.put(request_id, before)
            metrics.INBOX_DUPLICATES.labels(message.topic).inc()
            log.info("duplicate skipped")
            return
        if step.entry is None or step.status is None:
            return
        await self._read_model.save(tracking.document(step.entry), step.entry)
        await self._publish(topics.STATUS, request_id, encode(step.status))
        metrics.EVENTS_PRODUCED.labels(topics.STATUS, step.status.event_type).inc()
        self._entries.put(request_id, step.entry)
        if tracking.is_terminal(step.entry) and not (before and tracking.is_terminal(before)):
            error = step.entry["view"]["error"] or {}
            metrics.OUTCOMES.labels(step.entry["view"]["state"], error.get("source", "")).inc()

    async def _dead_letter(self, record: Record, reason: str, detail: str, request_id: str | None) -> None:
        marker = marker_of(record)
        if marker in self._dead_lettered:
            return
        dead = dead_letter_record(record, reason=reason, detail=detail, request_id=request_id,
                                  consumer_group=self._group_id)
        envelope = envelope_for(dead, producer=tracking.PRODUCER, correlation_id=request_id or marker,
                                causation_id=None)
        while True:
            try:
                await self._publish(topics.DLQ, dead.record_key(), encode(envelope))
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is away: the record waits, nothing behind it is lost
                log.warning("dead-lettering failed, retrying", error=repr(exc))
                await asyncio.sleep(1.0)
        self._dead_lettered.add(marker)
        count_dead_lettered(record, reason, detail)
