"""The consume loop's own rhythm, with a scripted consumer and a real SQLite unit of work: offsets are
committed together (at most every COMMIT_EVERY_S, on an empty poll and at stop), and a batch lets the
rest of the service run between its records."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from sqlalchemy import MetaData

from cancelflow import metrics, topics
from cancelflow.db import create_schema, make_engine, transactions
from cancelflow.events import CancellationRequested, Payload, RequestedBy, SubscriptionActivated, envelope_for
from cancelflow.messaging.codec import EVENT_TYPE_HEADER, Message, encode
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.deadletter import TransientError
from cancelflow.messaging.dispatch import HandlerContext, Route
from cancelflow.messaging.store import messaging_tables
from cancelflow.messaging.uow import UnitOfWork

pytestmark = pytest.mark.timeout(30)

METADATA = MetaData()
MESSAGING = messaging_tables(METADATA)
TP0, TP1 = TopicPartition(topics.REQUESTED, 0), TopicPartition(topics.REQUESTED, 1)


def records(tp: TopicPartition, *offsets: int, event_type: str = "NotOurs", value: bytes = b"{}",
            key: bytes = b"k") -> list[ConsumerRecord]:
    return [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, key, value, None, 1, 1,
                           [(EVENT_TYPE_HEADER, event_type.encode())]) for o in offsets]


class ScriptedConsumer:
    """Hands out the scripted polls, then waits (as a consumer with nothing to read would)."""

    def __init__(self, polls: list[dict[TopicPartition, list[ConsumerRecord]]]) -> None:
        self.polls = list(polls)
        self.commits: list[dict[TopicPartition, int]] = []
        self.drained = asyncio.Event()
        self.assigned = {TP0, TP1}
        self.ends = {TP0: 10, TP1: 10}  # where each partition ends, as the broker says

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[ConsumerRecord]]:
        if self.polls:
            return self.polls.pop(0)
        self.drained.set()
        await asyncio.sleep(3600)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.ends[tp]

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp] for tp in partitions}

    async def committed(self, tp: TopicPartition) -> int | None:
        return 2  # the group had committed up to offset 2 before this loop started


class LagGauge:
    """Stands in for the lag gauge: what it says per partition, and a wake-up for whoever waits on it."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}
        self.changed = asyncio.Condition()
        self._key: tuple[str, str] = ("", "")

    def labels(self, topic: str, partition: str) -> LagGauge:
        self._key = (topic, partition)
        return self

    def set(self, value: float) -> None:
        self.values[self._key] = value
        asyncio.get_running_loop().create_task(self._wake())

    def remove(self, topic: str, partition: str) -> None:
        self.values.pop((topic, partition), None)
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def becomes(self, tp: TopicPartition, value: float | None) -> None:
        """Until the gauge of `tp` says `value` (None: no gauge), at most 5 s."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(
                lambda: self.values.get((tp.topic, str(tp.partition))) == value), 5)


@pytest.fixture
def lag(monkeypatch: pytest.MonkeyPatch) -> LagGauge:
    gauge = LagGauge()
    monkeypatch.setattr(metrics, "CONSUMER_LAG", gauge)
    monkeypatch.setattr(ConsumeLoop, "LAG_EVERY_S", 0.01)
    return gauge


@pytest.fixture
async def new_uow(store: Any):  # type: ignore[no-untyped-def]
    engine = make_engine(store("loop"))
    await create_schema(engine, METADATA)
    sessions = transactions(engine)
    try:
        yield lambda message=None: UnitOfWork(sessions, MESSAGING, producer="test", message=message)
    finally:
        await engine.dispose()


async def _run_until_drained(loop: ConsumeLoop, consumer: ScriptedConsumer) -> None:
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(consumer.drained.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_offsets_are_committed_together_on_an_empty_poll_and_at_stop(new_uow, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ConsumeLoop, "COMMIT_EVERY_S", 3600.0)  # only an empty poll or the stop commits
    consumer = ScriptedConsumer([
        {TP0: records(TP0, 0, 1)},
        {TP0: records(TP0, 2), TP1: records(TP1, 0)},
        {},
        {TP1: records(TP1, 1, 2)},
    ])
    loop = ConsumeLoop(consumer, [Route(topics.REQUESTED)], new_uow,  # type: ignore[arg-type]
                       service="test", group_id="g")
    await _run_until_drained(loop, consumer)
    # Two polls' offsets in one commit (at the empty poll), the last poll's at the stop.
    assert consumer.commits == [{TP0: 3, TP1: 1}, {TP1: 3}]


async def test_the_lag_counts_what_is_handled_not_what_is_committed(new_uow, monkeypatch, lag) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ConsumeLoop, "COMMIT_EVERY_S", 3600.0)
    consumer = ScriptedConsumer([{TP0: records(TP0, 0, 1, 2, 3)}])
    loop = ConsumeLoop(consumer, [Route(topics.REQUESTED)], new_uow,  # type: ignore[arg-type]
                       service="test", group_id="g")
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(consumer.drained.wait(), 10)  # handled, not committed: the stream stays busy
    await lag.becomes(TP0, 6)  # read up to 4 of 10, reported before any commit
    await lag.becomes(TP1, 8)  # nothing read there yet: from the group's committed offset (2)
    # A rebalance takes TP1 away: its gauge goes, instead of saying 8 for ever.
    consumer.assigned = {TP0}
    await lag.becomes(TP1, None)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert consumer.commits == [{TP0: 4}]  # only at the stop


async def test_the_lag_grows_while_a_poll_is_retried(new_uow, lag) -> None:  # type: ignore[no-untyped-def]
    """A handler that keeps meeting a transient error holds the loop in its poll; the gauge used to be set
    only after polls, so it froze and the lag alert missed the stuck partition."""
    away = asyncio.Event()

    async def database_away(message: Message[CancellationRequested], uow: HandlerContext) -> None:
        away.set()
        raise TransientError("the database is away")

    value = encode(envelope_for(CancellationRequested(
        request_id=uuid.uuid4(), account_id="a", target="subscription", subscription_id="s", mode="immediate",
        requested_by=RequestedBy(user_id="u", role="customer", channel="bss")),
        producer="test", correlation_id="c", causation_id=None))
    consumer = ScriptedConsumer([{TP0: records(TP0, 2, event_type="CancellationRequested", value=value)}])
    loop = ConsumeLoop(consumer, [Route(topics.REQUESTED).on(CancellationRequested, database_away)],
                       new_uow, service="test", group_id="g")  # type: ignore[arg-type]
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(away.wait(), 10)
    await lag.becomes(TP0, 8)  # 2 committed, the end at 10
    consumer.ends[TP0] = 25  # records keep arriving behind the stuck one
    await lag.becomes(TP0, 23)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_with_no_interval_every_poll_commits(new_uow, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ConsumeLoop, "COMMIT_EVERY_S", 0.0)
    consumer = ScriptedConsumer([{TP0: records(TP0, 0)}, {TP0: records(TP0, 1)}])
    loop = ConsumeLoop(consumer, [Route(topics.REQUESTED)], new_uow,  # type: ignore[arg-type]
                       service="test", group_id="g")
    await _run_until_drained(loop, consumer)
    assert consumer.commits == [{TP0: 1}, {TP0: 2}]


async def test_a_batch_lets_the_service_run_between_its_records(new_uow) -> None:  # type: ignore[no-untyped-def]
    """SQLite statements do not yield to the loop: unless the batch yields once its records have run
    for YIELD_EVERY_S, another task of the service (an SMTP exchange, the relay) waits for the whole
    batch."""
    seen: list[str] = []

    async def handle(msg: Message[CancellationRequested], uow: HandlerContext) -> None:
        seen.append("record")
        started = time.perf_counter()
        while time.perf_counter() - started < ConsumeLoop.YIELD_EVERY_S:  # a record's CPU-bound work
            pass

    async def other_work() -> None:
        while True:
            seen.append("other")
            await asyncio.sleep(0)

    def value(i: int) -> bytes:
        request_id = str(uuid.UUID(int=i + 1))
        request = CancellationRequested(request_id=request_id, account_id="a", target="subscription",
                                        subscription_id=f"s-{i}",
                                        requested_by=RequestedBy(user_id="u", role="customer", channel="storefront"))
        return encode(envelope_for(request, producer="test", correlation_id=request_id, causation_id=None))

    batch = [r for i in range(3) for r in records(TP0, i, event_type="CancellationRequested", value=value(i),
                                                      key=f"s-{i}".encode())]
    consumer = ScriptedConsumer([{TP0: batch}])
    loop = ConsumeLoop(consumer, [Route(topics.REQUESTED, batch=True).on(CancellationRequested, handle)],
                       new_uow, service="test", group_id="g")  # type: ignore[arg-type]
    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    await _run_until_drained(loop, consumer)
    other.cancel()
    handled = [i for i, what in enumerate(seen) if what == "record"]
    assert len(handled) == 3
    # Between two records of the one batch, the other task ran.
    assert all("other" in seen[a:b] for a, b in zip(handled, handled[1:], strict=False))


class RefusingUnitOfWork(UnitOfWork):
    """Refuses any dead-letter record that keeps the record's bytes (as a store might refuse a value)."""

    def emit(self, payload: Any, **kwargs: Any) -> Any:
        if getattr(payload, "original_base64", None) is not None:
            raise ValueError("value refused by the store")
        return super().emit(payload, **kwargs)


async def test_a_refused_dead_letter_record_is_written_without_the_records_bytes(store: Any) -> None:
    engine = make_engine(store("refusing"))
    await create_schema(engine, METADATA)
    sessions = transactions(engine)
    consumer = ScriptedConsumer([{TP0: records(TP0, 0, value=b"not json", key=b"k" * 300)}])
    loop = ConsumeLoop(consumer, [Route(topics.REQUESTED, dead_letter=True)],  # type: ignore[arg-type]
                       lambda message=None: RefusingUnitOfWork(sessions, MESSAGING, producer="test", message=message),
                       service="test", group_id="g")
    try:
        await _run_until_drained(loop, consumer)
        async with engine.connect() as conn:
            rows = (await conn.execute(MESSAGING.outbox.select())).mappings().all()
            inbox = (await conn.execute(MESSAGING.inbox.select())).mappings().all()
    finally:
        await engine.dispose()
    [row] = rows
    dead = orjson.loads(row["value"])["payload"]
    assert dead["reason"] == "not_json" and "kept without its bytes: ValueError" in dead["detail"]
    assert dead["original_base64"] is None and dead["original_key"] is None
    assert dead["original_size"] == len(b"not json")
    assert [r["message_id"] for r in inbox] == [f"dlq:{topics.REQUESTED}:0:0"]
    assert consumer.commits == [{TP0: 1}]
# --- facts first (issue 24, item 5) ------------------------------------------------------------------

FACTS_TP = TopicPartition(topics.PLATFORM_SUBSCRIPTIONS, 0)


def _envelope_records(tp: TopicPartition, payloads: list[Any], *, first_offset: int = 0,
                      timestamp_ms: int = 0) -> list[ConsumerRecord]:
    out = []
    for i, payload in enumerate(payloads):
        value = encode(envelope_for(payload, producer="test", correlation_id="c", causation_id=None))
        out.append(ConsumerRecord(tp.topic, tp.partition, first_offset + i, timestamp_ms + i, 0,
                                  payload.record_key().encode(), value, None, 1, len(value),
                                  [(EVENT_TYPE_HEADER, payload.event_type.encode())]))
    return out


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "one-by-one"])
async def test_a_polls_facts_are_handled_before_its_requests(new_uow, batch) -> None:  # type: ignore[no-untyped-def]
    """A backlog poll holds requests and the facts published before them: the facts go first, whatever
    order the poll lists its partitions in."""
    from tests.unit.test_handlers import activated, requested

    handled: list[str] = []

    async def handle(msg: Message[Payload], uow: HandlerContext) -> None:
        if msg.event_type == "SubscriptionActivated":
            await asyncio.sleep(0.01)  # a slower write: one by one, the requests must still wait for it
        handled.append(msg.event_type)

    poll = {TP0: _envelope_records(TP0, [requested(subscription_id=f"s-{i}") for i in range(3)]),
            FACTS_TP: _envelope_records(FACTS_TP, [activated(subscription_id=f"s-{i}") for i in range(3)])}
    consumer = ScriptedConsumer([poll])
    routes = [Route(topics.REQUESTED, batch=batch).on(CancellationRequested, handle),
              Route(topics.PLATFORM_SUBSCRIPTIONS, batch=batch, facts=True).on(SubscriptionActivated, handle)]
    loop = ConsumeLoop(consumer, routes, new_uow, service="test", group_id="g")  # type: ignore[arg-type]
    await _run_until_drained(loop, consumer)
    assert handled == ["SubscriptionActivated"] * 3 + ["CancellationRequested"] * 3


class FactsConsumer(ScriptedConsumer):
    """Holds one facts partition besides the requests' partitions."""

    def __init__(self, polls: list[dict[TopicPartition, list[ConsumerRecord]]], *, facts_end: int | None) -> None:
        super().__init__(polls)
        self.assigned |= {FACTS_TP}
        self.ends[FACTS_TP] = facts_end  # type: ignore[assignment]
        self.positions = {FACTS_TP: 0}

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[ConsumerRecord]]:
        poll = await super().getmany(timeout_ms)
        for tp, found in poll.items():
            self.positions[tp] = found[-1].offset + 1
        return poll

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


async def test_facts_progress_tells_read_up_to_a_time() -> None:
    from datetime import UTC, datetime

    from cancelflow.messaging.facts import FactsProgress
    from tests.unit.test_handlers import activated

    at = datetime(2026, 1, 1, tzinfo=UTC)
    at_ms = int(at.timestamp() * 1000)
    progress = FactsProgress({topics.PLATFORM_SUBSCRIPTIONS})
    assert not progress.read_up_to(at)  # no partition yet: nobody can say

    not_fetched = FactsConsumer([], facts_end=None)
    await progress.update(not_fetched, {})  # type: ignore[arg-type]
    assert not progress.read_up_to(at)

    facts = _envelope_records(FACTS_TP, [activated(subscription_id=f"s-{i}") for i in range(3)],
                              timestamp_ms=at_ms - 10)
    consumer = FactsConsumer([{FACTS_TP: facts[:2]}], facts_end=10)  # 10 records on the partition
    await progress.update(consumer, await consumer.getmany())  # type: ignore[arg-type]
    assert not progress.read_up_to(at)  # behind, and its facts so far are older than `at`
    assert progress.read_up_to(datetime.fromtimestamp((at_ms - 10) / 1000, UTC))  # read past that time

    consumer.ends[FACTS_TP] = 2  # read to its end: whatever the time
    await progress.update(consumer, {})  # type: ignore[arg-type]
    assert progress.read_up_to(at)
    assert FactsProgress().read_up_to(at)  # a service that reads no facts never waits for them
