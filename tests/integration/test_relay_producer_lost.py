"""The outbox relay replaces an idempotent producer whose sequence state is lost for good.

aiokafka 0.14's idempotent producer does not recover from a gap in its sequence numbers (after a batch
it gave up on while the broker was down, found by tests/e2e/test_kafka_faults.py): every later send
fails with OutOfOrderSequenceNumber. The relay stops it, starts a new one (a new producer id) and
publishes the unpublished rows again, in their order, after every record of the old producer. On
Apache Kafka the gap is made for real (the producer's next sequence number pushed ahead); on any
store, fakes show the order of stop, start and the re-sent rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, OutOfOrderSequenceNumber
from sqlalchemy import MetaData, func, insert, select

from cancelflow import db, topics
from cancelflow.messaging.kafka import make_producer, producer_options
from cancelflow.messaging.relay import OutboxRelay
from cancelflow.messaging.store import MessagingTables, messaging_tables
from cancelflow.settings import CommonSettings
from cancelflow.topics import TOPICS
from cancelflow_tools.stack.apache_kafka import KafkaBroker
from cancelflow_tools.stack.broker import create_topics, free_port
from tests.conftest import DatabaseFactory
from tests.integration.test_apache_kafka import topic_values

KEYS = ("a", "b", "c", "d")


async def add_rows(engine: Any, tables: MessagingTables, topic: str, first: int, count: int) -> None:
    """Rows `first`..`first+count-1`, keyed in turn by KEYS; the value names its key and number."""
    async with db.session_factory(engine)() as session, session.begin():
        for n in range(first, first + count):
            key = KEYS[n % len(KEYS)]
            await session.execute(insert(tables.outbox).values(
                topic=topic, key=key, value=f"{key}-{n}".encode(), headers={}, event_type="E",
                created_at=datetime.now(UTC)))


async def outbox_rows(engine: Any, tables: MessagingTables) -> int:
    async with db.session_factory(engine)() as session:
        return (await session.execute(select(func.count()).select_from(tables.outbox))).scalar_one()


def first_copies(values: list[bytes]) -> dict[str, list[str]]:
    """What consumers act on: each key's records in log order, a copy of one already seen dropped
    (the inbox dedupes on event_id)."""
    seen: set[bytes] = set()
    by_key: dict[str, list[str]] = {}
    for value in values:
        if value not in seen:
            seen.add(value)
            key, _ = value.decode().split("-")
            by_key.setdefault(key, []).append(value.decode())
    return by_key


def in_order(count: int) -> dict[str, list[str]]:
    return {key: [f"{key}-{n}" for n in range(count) if KEYS[n % len(KEYS)] == key] for key in KEYS}


# --- fakes, on SQLite and PostgreSQL -----------------------------------------------------------------


class Acked:
    partition, offset = 0, 0


class FakeProducer:
    """Acknowledges its first `good` sends, then fails every later one as a producer with a sequence
    gap does. Writes what it acknowledged to `log`, and its starts and stops."""

    def __init__(self, name: str, log: list[str], *, good: int | None = None, start_fails: bool = False) -> None:
        self.name, self.log, self.good, self.start_fails = name, log, good, start_fails

    async def start(self) -> None:
        if self.start_fails:
            raise KafkaConnectionError("broker away")
        self.log.append(f"{self.name} started")

    async def stop(self) -> None:
        self.log.append(f"{self.name} stopped")

    async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any) -> asyncio.Future[Acked]:
        ack: asyncio.Future[Acked] = asyncio.get_running_loop().create_future()
        if self.good is None or self.good > 0:
            self.good = None if self.good is None else self.good - 1
            self.log.append(value.decode())
            ack.set_result(Acked())
        else:
            ack.set_exception(OutOfOrderSequenceNumber())
        return ack


async def test_a_lost_producer_is_replaced_and_the_round_sent_again_in_order(store: DatabaseFactory) -> None:
    tables = messaging_tables(metadata := MetaData())
    engine = db.make_engine(store("relay"))
    try:
        await db.create_schema(engine, metadata)
        log: list[str] = []
        made = iter([FakeProducer("second", log, start_fails=True), FakeProducer("third", log)])
        relay = OutboxRelay(db.transactions(engine), tables, FakeProducer("first", log, good=3),  # type: ignore[arg-type]
                            reads=db.reads(engine), new_producer=lambda: next(made))  # type: ignore[arg-type, return-value]
        await add_rows(engine, tables, "t", 0, 8)

        with pytest.raises(OutOfOrderSequenceNumber):
            await relay.publish_pending()  # 3 acknowledged, then the gap
        assert await outbox_rows(engine, tables) == 8  # nothing deleted: the round is sent again
        with pytest.raises(KafkaConnectionError):
            await relay.publish_pending()  # the new producer cannot start yet (the broker is away)
        assert await relay.publish_pending() == 8  # the next one, on the next round
        assert await outbox_rows(engine, tables) == 0
    finally:
        await engine.dispose()
    assert relay.producers_replaced == 1
    assert log == ["a-0", "b-1", "c-2", "first stopped", "third started", *(f"{KEYS[n % 4]}-{n}" for n in range(8))]
    assert first_copies([v.encode() for v in log if "-" in v]) == in_order(8)


async def test_without_a_way_to_make_a_producer_the_error_is_raised(store: DatabaseFactory) -> None:
    tables = messaging_tables(metadata := MetaData())
    engine = db.make_engine(store("relay"))
    try:
        await db.create_schema(engine, metadata)
        first = FakeProducer("first", [], good=0)
        relay = OutboxRelay(db.transactions(engine), tables, first, reads=db.reads(engine))  # type: ignore[arg-type]
        await add_rows(engine, tables, "t", 0, 2)
        with pytest.raises(OutOfOrderSequenceNumber):
            await relay.publish_pending()
        assert relay.producer is first
        assert await outbox_rows(engine, tables) == 2
    finally:
        await engine.dispose()


def test_the_producer_is_idempotent_on_apache_kafka_only() -> None:
    def idempotent(**settings: Any) -> bool:
        return producer_options(CommonSettings(**settings), client_id="t", idempotent=True)["enable_idempotence"]

    assert idempotent(broker="kafka")
    assert not idempotent(broker="embedded")  # the embedded broker has no producer ids
    assert not producer_options(CommonSettings(broker="kafka"), client_id="t")["enable_idempotence"]


# --- Apache Kafka: a real sequence gap ----------------------------------------------------------------


def _producer_id(producer: AIOKafkaProducer) -> int:
    return producer._txn_manager.producer_id  # type: ignore[no-any-return, union-attr]  # noqa: SLF001


@pytest.mark.kafka
async def test_on_kafka_a_sequence_gap_costs_a_new_producer_and_nothing_else(tmp_path: Path) -> None:
    topic = topics.REQUESTED
    async with KafkaBroker(port=free_port(), data_dir=tmp_path) as broker:
        await create_topics(broker.bootstrap, [t for t in TOPICS if t.name == topic])
        settings = CommonSettings(broker="kafka", kafka_bootstrap_servers=broker.bootstrap)
        new_producer: Callable[[], AIOKafkaProducer] = lambda: make_producer(  # noqa: E731
            settings, client_id="relay", idempotent=True)
        tables = messaging_tables(metadata := MetaData())
        engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
        first = new_producer()
        await first.start()
        relay = OutboxRelay(db.transactions(engine), tables, first, reads=db.reads(engine), new_producer=new_producer)
        try:
            await db.create_schema(engine, metadata)
            await add_rows(engine, tables, topic, 0, 20)
            assert await relay.publish_pending() == 20

            # What a batch given up on while the broker was down leaves: the broker expects the next
            # sequence number, the producer sends a later one, now and for good.
            for partition in first.client.cluster.partitions_for_topic(topic) or ():
                first._txn_manager.increment_sequence_number(TopicPartition(topic, partition), 3)  # type: ignore[union-attr]  # noqa: SLF001
            await add_rows(engine, tables, topic, 20, 20)
            with pytest.raises(OutOfOrderSequenceNumber):
                await relay.publish_pending()
            assert await outbox_rows(engine, tables) == 20

            assert await relay.publish_pending() == 20  # the new producer sends them
            assert relay.producers_replaced == 1
            assert _producer_id(relay.producer) != _producer_id(first)
            assert await outbox_rows(engine, tables) == 0
            assert first_copies(await topic_values(broker.bootstrap, topic)) == in_order(40)
        finally:
            await relay.producer.stop()
            await engine.dispose()
