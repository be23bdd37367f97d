"""aiokafka clients configured the same way everywhere (works on Apache Kafka and on Tansu)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cancelflow.settings import CommonSettings


def make_producer(settings: CommonSettings, *, client_id: str) -> AIOKafkaProducer:
    # No idempotent producer and no transactions (the embedded broker lacks them): exactly-once
    # comes from the outbox (publish after commit) and the inbox (dedupe on event_id).
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        linger_ms=2,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=30_000,
    )


def make_consumer(settings: CommonSettings, *topics: str, group_id: str, client_id: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=30_000,
        heartbeat_interval_ms=3_000,
        max_poll_records=500,
    )
