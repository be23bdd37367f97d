"""Apache Kafka as `cancelflow up --broker kafka` runs it (KafkaBroker): formatted once, its log on disk, so
topics and records outlive the process; a node killed with -9 is started again on its log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cancelflow import topics
from cancelflow.messaging.kafka import partitions_of
from cancelflow.topics import TOPICS
from cancelflow_tools.stack.apache_kafka import KafkaBroker
from cancelflow_tools.stack.broker import create_topics, describe_topics, free_port, wait_for_broker

pytestmark = pytest.mark.kafka


async def topic_values(bootstrap: str, topic: str) -> list[bytes]:
    """Every record's value on `topic`, from the beginning to the end offsets as of now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: list[bytes] = []
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [r.value for r in records]
        return found
    finally:
        await consumer.stop()


async def _send(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def test_topics_and_records_survive_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    async with KafkaBroker(port=port, data_dir=tmp_path) as broker:
        first_start = time.monotonic() - started
        assert await create_topics(broker.bootstrap) == [t.name for t in TOPICS]
        await _send(broker.bootstrap, topics.REQUESTED, b"kept")
    assert (tmp_path / "kafka" / "data" / "meta.properties").exists()  # formatted once, here
    assert "shut down completed" in (tmp_path / "logs" / "broker.log").read_text()  # a clean stop
    async with KafkaBroker(port=port, data_dir=tmp_path) as again:
        assert await create_topics(again.bootstrap) == []  # all there already
        partitions = await describe_topics(again.bootstrap, [t.name for t in TOPICS])
        assert partitions == {t.name: t.partitions for t in TOPICS}  # Kafka's counts, not the embedded ones
        assert await topic_values(again.bootstrap, topics.REQUESTED) == [b"kept"]
    print(f"Kafka answered {first_start:.1f} s after its first start (format included)")


async def test_a_killed_node_is_started_again_on_its_log(tmp_path: Path) -> None:
    async with KafkaBroker(port=free_port(), data_dir=tmp_path) as broker:
        await create_topics(broker.bootstrap, [t for t in TOPICS if t.name == topics.REQUESTED])
        await _send(broker.bootstrap, topics.REQUESTED, b"before")
        supervising = asyncio.create_task(broker.supervise())
        first_pid = broker.pid
        broker.kill()
        try:
            deadline = time.monotonic() + 60
            while broker.pid in (None, first_pid):
                assert time.monotonic() < deadline, "the killed node was not started again"
                await asyncio.sleep(0.2)
            await wait_for_broker(broker.bootstrap, timeout=60)
            await _send(broker.bootstrap, topics.REQUESTED, b"after")
            assert await topic_values(broker.bootstrap, topics.REQUESTED) == [b"before", b"after"]
            assert broker.restarts == 1
        finally:
            supervising.cancel()
