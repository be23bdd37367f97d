"""The consume loop: record -> decode -> inbox check -> handler -> one transaction -> offsets.

Offsets are committed only after the batch's transactions committed. A bad record is dead-lettered
(by the topic's owning service) and never stops the partition; a handler that keeps raising is
retried, then dead-lettered too, so the records behind it flow on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Literal

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from cancelflow import metrics, topics
from cancelflow.events import Failed, Payload, RecordDeadLettered, Source, ValidationCode
from cancelflow.logging import get_logger, record_context
from cancelflow.messaging.codec import EVENT_TYPE_HEADER, BadRecord, Message, decode
from cancelflow.messaging.deadletter import (
    MAX_HANDLER_ATTEMPTS,
    bounded,
    count_dead_lettered,
    dead_letter_record,
    handle_with_retries,
    marker_of,
)
from cancelflow.messaging.dispatch import Route, dispatch
from cancelflow.messaging.facts import FactsProgress
from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.rounds import Chain, Step, run_in_rounds
from cancelflow.messaging.signatures import SignatureCheck
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat

log = get_logger(__name__)

class ConsumeLoop:
    MAX_HANDLER_ATTEMPTS = MAX_HANDLER_ATTEMPTS
    # Offsets of handled polls are committed together at most this often (and at an empty poll and at
    # shutdown): each commit is a broker request (docs/performance.md, item 15). Redelivering what a
    # crash left uncommitted is safe (the inbox drops it), so this only bounds that redelivery.
    COMMIT_EVERY_S = 0.25
    # SQLite statements run on the loop without yielding, so a batch yields once this long has passed,
    # not to hold up the rest of the service (SMTP, relay, HTTP); docs/performance.md, item 16.
    YIELD_EVERY_S = 0.005
    # How often the lag gauge is set, from the broker's end offsets: on a timer rather than after each
    # poll, so that it also grows while a poll's records are retried (the loop waits then) and it
    # forgets partitions a rebalance took away.
    LAG_EVERY_S = 5.0

    def __init__(self, consumer: AIOKafkaConsumer, routes: list[Route],
                 new_uow: Callable[[Message[Payload] | None], UnitOfWork], *, service: str, group_id: str,
                 failure_source: Source | None = None,
                 signatures: SignatureCheck | None = None, concurrency: int = 16,
                 gap_guard: GapGuard | None = None, facts: FactsProgress | None = None) -> None:
        self._consumer = consumer
        self._facts = facts
        if facts is not None:
            facts.topics |= {r.topic for r in routes if r.facts}
        self._gap_guard = gap_guard
        self._routes = {r.topic: r for r in routes}
        self._new_uow = new_uow
        self._service = service
        # The saga step this service owns: a record it cannot handle fails the request there.
        self._failure_source = failure_source
        self._group_id = group_id
        self._signatures = signatures
        self._slots = asyncio.Semaphore(concurrency)
        self._done: dict[TopicPartition, int] = {}  # the next offset to handle, per partition
        self._assigned: frozenset[TopicPartition] = frozenset()  # as of the last poll
        self._lag_now = asyncio.Event()  # the assignment changed: report the lag without waiting

    async def run(self) -> None:
        handled: dict[TopicPartition, int] = {}  # offsets handled and not committed yet
        committed_at = time.monotonic()
        lag = asyncio.create_task(self._report_lag())
        try:
            while True:
                offsets = await self._poll()
                self._done.update(offsets)
                assigned = frozenset(self._consumer.assignment())
                if assigned != self._assigned:
                    self._assigned = assigned
                    self._lag_now.set()
                handled.update(offsets)
                if handled and (not offsets or time.monotonic() - committed_at >= self.COMMIT_EVERY_S):
                    await self._commit(handled)
                    handled.clear()
                    committed_at = time.monotonic()
        finally:
            lag.cancel()
            if handled:  # stopping: commit what was handled (best effort; the inbox covers the rest)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._commit(handled), 2)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions away: the new owner gets these records again and its
            # inbox drops what we already committed in our database.
            log.warning("offset commit lost to a rebalance", error=str(exc))

    async def _poll(self) -> dict[TopicPartition, int]:
        """Fetch and handle one poll's records; the offsets to commit for them."""
        batch = await self._consumer.getmany(timeout_ms=1000)
        if self._gap_guard is not None:
            batch = await self._gap_guard.check(self._consumer, batch)
        if self._facts is not None:
            await self._facts.update(self._consumer, batch)
        offsets: dict[TopicPartition, int] = {}
        # Records of one key stay in order (a request's saga, a subscription's requests); different
        # keys go concurrently, so one slow vendor, gateway or SMTP call does not hold up the rest.
        by_key: dict[tuple[str, bytes | None], list[ConsumerRecord]] = {}
        for tp, records in batch.items():
            for record in records:
                by_key.setdefault((tp.topic, record.key), []).append(record)
            offsets[tp] = records[-1].offset + 1
        singles: list[list[ConsumerRecord]] = []
        batched: list[list[ConsumerRecord]] = []
        in_rounds: list[list[ConsumerRecord]] = []
        # Facts first (a stable sort keeps each topic's keys in their order).
        for (topic, _), records in sorted(by_key.items(), key=lambda item: not self._routes[item[0][0]].facts):
            route = self._routes[topic]
            (batched if route.batch else in_rounds if route.rounds else singles).append(records)
        if batched:
            singles += await self._in_one_transaction(batched)
        if in_rounds:
            singles += await self._in_rounds(in_rounds)
        facts: list[list[ConsumerRecord]] = []
        others: list[list[ConsumerRecord]] = []
        for records in singles:
            (facts if self._routes[records[0].topic].facts else others).append(records)
        for group in (facts, others):
            await asyncio.gather(*(self._in_order(records) for records in group))
        return offsets

    async def _in_order(self, records: list[ConsumerRecord]) -> None:
        async with self._slots:
            for record in records:
                await self.process(record)

    async def _report_lag(self) -> None:
        """Every LAG_EVERY_S, and as soon as the assignment changes: the records of each assigned
        partition not handled yet (the end offset minus what this loop handled, or the group's
        committed offset before it handled any), and no gauge for a partition that is not ours any more."""
        shown: set[TopicPartition] = set()

        async def report() -> None:
            mine = set(self._consumer.assignment())
            for tp in shown - mine:
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
                self._done.pop(tp, None)
            shown.intersection_update(mine)
            ends = await self._consumer.end_offsets(list(mine)) if mine else {}
            for tp, end in ends.items():
                done = self._done.get(tp)
                if done is None:  # asked once per assignment; the loop moves it on from there
                    done = self._done.setdefault(tp, await self._consumer.committed(tp) or 0)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - done))
                shown.add(tp)

        # The broker away: the next round reports again.
        await repeat(report, every_s=self.LAG_EVERY_S, at_once=False, wakeup=self._lag_now,
                     failed="lag not reported", level="debug")

    async def unhandled(self) -> int:
        """The records of the assigned partitions this loop has not handled yet, as the broker says now
        (what a clean stop waits for: on the embedded broker they would be lost with it)."""
        mine = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(mine) if mine else {}
        total = 0
        for tp, end in ends.items():
            done = self._done.get(tp)
            if done is None:
                done = await self._consumer.committed(tp) or 0
            total += max(0, end - done)
        return total

    async def _in_one_transaction(self, groups: list[list[ConsumerRecord]]) -> list[list[ConsumerRecord]]:
        """Handle the records of batch routes in one transaction, each key's records in order, and
        return what is left to handle one by one: for each key, from its first record that is bad or
        forged on (so a key's records never overtake each other). If any handler raises, the whole
        transaction is rolled back and every record goes the one-by-one way, which retries,
        dead-letters and reports as usual (the inbox drops what was done before)."""
        prepared = self._prepare_groups(groups)
        leftovers = [records[cut:] for records, (_, cut) in zip(groups, prepared, strict=True) if cut is not None]
        work = [step.message for steps, _ in prepared for step in steps]
        if not work:
            return leftovers
        try:
            await self.handle_batch(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("batch rolled back; its records are handled one by one", error=repr(exc))
            return groups
        for message in work:
            metrics.EVENTS_CONSUMED.labels(message.topic, message.event_type).inc()
        return leftovers

    async def handle_batch(self, work: list[Message[Payload]]) -> set[str]:
        """Handle the records in one transaction, in order, each event id once (the inbox and the batch
        itself drop the rest); a handler's exception rolls everything back. The event ids skipped."""
        skipped: set[str] = set()
        async with self._new_uow(None) as uow:
            done = await uow.processed_among([m.event_id for m in work])
            yielded = time.perf_counter()
            for message in work:
                if message.event_id in done:
                    metrics.INBOX_DUPLICATES.labels(message.topic).inc()
                    skipped.add(message.event_id)
                    continue
                done.add(message.event_id)
                await self._handle_in_batch(uow, message)
                if time.perf_counter() - yielded >= self.YIELD_EVERY_S:
                    await asyncio.sleep(0)
                    yielded = time.perf_counter()
            await uow.commit_batch()
        return skipped

    async def _in_rounds(self, groups: list[list[ConsumerRecord]]) -> list[list[ConsumerRecord]]:
        """Handle the records of rounds routes together (messaging/rounds.py) and return what is left to
        handle one by one: for each key, from its first record that is bad, forged or whose handler
        raised. If the rounds themselves fail (the database is away), every record goes the one-by-one
        way; the inbox drops what an earlier round committed."""
        prepared = self._prepare_groups(groups)
        chains = [Chain(steps) for steps, _ in prepared]
        if any(chain.steps for chain in chains):
            try:
                await self.handle_in_rounds([chain for chain in chains if chain.steps])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("rounds failed; their records are handled one by one", error=repr(exc))
                return groups
        leftovers = []
        for records, chain, (_, cut) in zip(groups, chains, prepared, strict=True):
            start = chain.failed_at if chain.failed_at is not None else cut
            if start is not None:
                leftovers.append(records[start:])
        return leftovers

    async def handle_in_rounds(self, chains: list[Chain]) -> set[str]:
        """Drive the chains in rounds (messaging/rounds.py) in one unit of work; the event ids the inbox
        already held, which are skipped. Each chain's `failed_at` and `error` tell what failed."""
        async with self._new_uow(None) as uow:
            seen = await uow.processed_among([step.message.event_id for chain in chains for step in chain.steps])
            already = set(seen)
            await run_in_rounds(uow, chains, seen, _log_context)
        return already

    def _prepare_groups(self, groups: list[list[ConsumerRecord]]) -> list[tuple[list[Step], int | None]]:
        """For each key's records: the steps (message and route; records that are not ours left out) up
        to its first bad or forged record, and that record's index (from it on, the records go the
        one-by-one way, which dead-letters it), or None."""
        prepared: list[tuple[list[Step], int | None]] = []
        for records in groups:
            steps: list[Step] = []
            cut = None
            for i, record in enumerate(records):
                found = self._prepare(record)
                if found is False:
                    cut = i
                    break
                if found is not None:
                    steps.append(Step(i, found, self._routes[record.topic]))
            prepared.append((steps, cut))
        return prepared

    def _prepare(self, record: ConsumerRecord) -> Message[Payload] | None | Literal[False]:
        """A batch record's message; None when it is not ours; False when it is bad or
        forged (the one-by-one path dead-letters it)."""
        route = self._routes[record.topic]
        if self._skippable(route, record):
            return None
        if self._signatures and self._signatures.problem(record.topic, record.value, record.headers):
            return False
        try:
            message = decode(record.value, topic=record.topic, partition=record.partition,
                             offset=record.offset, key=record.key)
        except BadRecord:
            return False
        if self._signatures and self._signatures.not_owner(record.topic, message.event_type, record.headers):
            return False
        return message if route.handles(message.event_type) else None

    async def _handle_in_batch(self, uow: UnitOfWork, message: Message[Payload]) -> None:
        with _log_context(message):
            started = time.perf_counter()
            uow.begin_step(message)
            await dispatch(self._routes[message.topic], message, uow)
            uow.end_step()
            metrics.HANDLER_SECONDS.labels(message.event_type).observe(time.perf_counter() - started)

    @staticmethod
    def _skippable(route: Route, record: ConsumerRecord) -> bool:
        """A record of a type this service does not handle, known from the header the relay sets,
        needs no decoding (unless the service dead-letters the topic's bad records)."""
        if route.dead_letter:
            return False
        for name, value in record.headers or ():
            if name == EVENT_TYPE_HEADER:
                return not route.handles(value.decode("utf-8", "replace"))
        return False

    async def process(self, record: ConsumerRecord) -> None:
        route = self._routes[record.topic]
        if self._skippable(route, record):
            return
        forged = self._signatures.problem(record.topic, record.value, record.headers) if self._signatures else None
        if forged is not None:
            await self._forged(route, record, forged)
            return
        try:
            message = decode(record.value, topic=record.topic, partition=record.partition,
                             offset=record.offset, key=record.key)
        except BadRecord as bad:
            if route.dead_letter:
                with structlog.contextvars.bound_contextvars(
                    topic=record.topic, request_id=bad.request_id, correlation_id=bad.request_id,
                ):
                    await self._dead_letter(record, bad.reason, bad.detail, bad.request_id)
            return
        if self._signatures and (foreign := self._signatures.not_owner(record.topic, message.event_type,
                                                                      record.headers)):
            await self._forged(route, record, foreign)
            return
        if not route.handles(message.event_type):
            return  # a known event for another service
        with _log_context(message):
            await self._handle(record, message)

    async def _forged(self, route: Route, record: ConsumerRecord, problem: str) -> None:
        # No effect, and no status either: an unauthenticated record may not speak for a request.
        metrics.BAD_SIGNATURES.labels(record.topic).inc()
        if route.dead_letter:
            with structlog.contextvars.bound_contextvars(topic=record.topic):
                await self._dead_letter(record, "bad_signature", problem, None)

    async def handle_once(self, message: Message[Payload]) -> bool:
        """One attempt at a record in its own transaction; False when the inbox holds its event id already."""
        started = time.perf_counter()
        async with self._new_uow(message) as uow:
            if await uow.already_processed(message.event_id):
                metrics.INBOX_DUPLICATES.labels(message.topic).inc()
                log.info("duplicate skipped")
                return False
            await dispatch(self._routes[message.topic], message, uow)
            await uow.commit()
        metrics.EVENTS_CONSUMED.labels(message.topic, message.event_type).inc()
        metrics.HANDLER_SECONDS.labels(message.event_type).observe(time.perf_counter() - started)
        return True

    async def _handle(self, record: ConsumerRecord, message: Message[Payload]) -> None:
        async def attempt() -> None:
            await self.handle_once(message)

        async def give_up(exc: Exception) -> None:
            await self._dead_letter(record, "handler_error",
                                    f"{self._service} could not handle {message.event_type}: {exc!r}",
                                    str(getattr(message.payload, "request_id", "")) or None, message=message)

        await handle_with_retries(attempt, event_type=message.event_type, give_up=give_up)

    async def _dead_letter(self, record: ConsumerRecord, reason: str, detail: str, request_id: str | None,
                           *, message: Message[Payload] | None = None) -> None:
        """Write the record's DLQ record (and the request's rejected or failed status). The database away:
        retried until it is back. The write refused otherwise: retried, then written without the record's
        bytes and key, so the dead-letter path never stops on the record it is handling."""
        detail = bounded(detail)

        async def in_full() -> None:
            await self._write_dead_letter(record, dead_letter_record(
                record, reason=reason, detail=detail, request_id=request_id, consumer_group=self._group_id,
            ), reason, detail, message)

        async def bare(exc: Exception) -> None:
            log.error("dead-letter record refused; writing it without the record's bytes", error=repr(exc))

            async def attempt() -> None:
                await self._write_dead_letter(record, dead_letter_record(
                    record, reason=reason, detail=f"{detail} (kept without its bytes: {type(exc).__name__})",
                    request_id=request_id, consumer_group=self._group_id, keep_value=False,
                ), reason, detail, message)

            async def broken(final: Exception) -> None:
                raise final  # our own fields refused: a bug, not the record

            await handle_with_retries(attempt, event_type=RecordDeadLettered.event_type, give_up=broken)

        await handle_with_retries(in_full, event_type=RecordDeadLettered.event_type, give_up=bare)
        count_dead_lettered(record, reason, detail)

    async def _write_dead_letter(self, record: ConsumerRecord, dead: RecordDeadLettered, reason: str,
                                 detail: str, message: Message[Payload] | None) -> None:
        marker = marker_of(record)
        request_id = dead.request_id
        async with self._new_uow(message) as uow:
            if await uow.already_processed(marker):
                return
            uow.emit(dead, correlation_id=request_id or marker)
            if request_id and record.topic == topics.REQUESTED:
                # Section 7: a readable request id gets a `rejected` status (via the tracker).
                # What was wrong with the record helps its sender; our own exceptions stay in the DLQ.
                said = (f"{reason}: {detail}" if message is None
                        else "The request could not be processed; it was set aside for support.")
                uow.emit(Failed(request_id=uuid.UUID(request_id), source=Source.validation,
                                code=ValidationCode.bad_input, message=said,
                                details={"dead_lettered": marker}),
                         correlation_id=request_id)
            # Only a service that owns a saga step fails the request (the tracker only observes), and a
            # `Failed` never causes another one (the tracker and notification read every `Failed`).
            elif request_id and message is not None and self._failure_source and message.event_type != Failed.event_type:
                uow.emit(Failed(request_id=uuid.UUID(request_id), source=self._failure_source,
                                code="internal_error", message=detail,
                                details={"dead_lettered": marker}),
                         correlation_id=request_id)
            await uow.commit(mark_processed=marker)



def _log_context(message: Message[Payload]) -> contextlib.AbstractContextManager[object]:
    """Every line logged while handling `message` (ours, the handler's, the adapters') names the request.
    For requests and saga events request_id is the envelope's correlation_id (CONTRACT section 1);
    upstream facts (subscriptions, charges) belong to no request."""
    request_id = getattr(message.payload, "request_id", None)
    return record_context(
        event_type=message.event_type, event_id=message.event_id,
        correlation_id=message.envelope.correlation_id,
        request_id=str(request_id) if request_id is not None else None,
    )

