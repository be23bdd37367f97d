"""aiokafka clients configured the same way everywhere (works on Apache Kafka and on Tansu)."""

from __future__ import annotations

from typing import Any

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


def make_consumer(settings: CommonSettings, *topics: str, group_id: str, client_id: str,
                  **overrides: Any) -> AIOKafkaConsumer:
    """A group consumer; `overrides` replace single AIOKafkaConsumer options.

    Tests pass a short `session_timeout_ms`: Tansu completes a group join only after about half the
    session timeout, and a member that left is only forgotten when its session expires, so with 30 s
    a service needs ~15 s to start consuming and ~55 s to resume after a restart.
    """
    config: dict[str, Any] = dict(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(300, settings.session_timeout_ms // 10),
        max_poll_records=500,
    )
    config.update(overrides)
    return AIOKafkaConsumer(*topics, **config)
