"""Records the stores cannot hold (issue 24, item 2): over-long keys, over-long ids, bytes that are no
JSON under a long key, JSON nested too deep to re-encode. Published on every topic the services read,
each ahead of a valid marker on the same partition, with all six services running on one store:
every service stays up, every group gets past the marker, and the DLQ has each record under a key
that fits (CONTRACT.md section 7)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from cancelflow import topics
from cancelflow.events import (
    CancellationRequested,
    ChargeCaptured,
    Customer,
    Payload,
    RequestedBy,
    SubscriptionActivated,
    SubscriptionSnapshot,
    VendorCancellationRequested,
    envelope_for,
)
from cancelflow.messaging.codec import encode
from cancelflow.messaging.kafka import make_producer
from cancelflow.messaging.store import KEY_CHARS
from cancelflow.settings import CommonSettings
from cancelflow_tools.services import SERVICES
from tests.conftest import eventually
from tests.integration.test_messaging import _committed

# Who dead-letters each topic's bad records (its `dead_letter` route), and who reads it.
DEAD_LETTERED_BY = {
    topics.PLATFORM_SUBSCRIPTIONS: "billing",
    topics.PAYMENTS_CHARGES: "payment_gateway",
    topics.REQUESTED: "billing",
    topics.SAGA: "status_tracker",
}
LONG = "x" * 300


def _valid(topic: str, tag: str, request_id: str) -> Payload:
    today = datetime.now(UTC).date()
    if topic == topics.PLATFORM_SUBSCRIPTIONS:
        return SubscriptionActivated(
            subscription_id=f"sub-{tag}", account_id=f"acct-{tag}", customer=Customer(email="a@b.test", name="A"),
            product_name="Acme", vendor="acme", vendor_subscription_id=f"v-{tag}", billing_period="monthly",
            unit_price=Decimal("10.00"), currency="USD", quantity=1, status="active",
            current_period_start=today, current_period_end=today + timedelta(days=30), auto_renew=True)
    if topic == topics.PAYMENTS_CHARGES:
        return ChargeCaptured(
            charge_id=f"chg-{tag}", account_id=f"acct-{tag}", subscription_id=f"sub-{tag}", amount=Decimal("10.00"),
            currency="USD", captured_at=datetime.now(UTC), gateway_charge_id=f"g-{tag}",
            period_start=today, period_end=today + timedelta(days=30))
    if topic == topics.REQUESTED:
        return CancellationRequested(
            request_id=uuid.UUID(request_id), account_id=f"acct-{tag}",
            requested_by=RequestedBy(user_id="u", role="customer", channel="storefront"),
            target="subscription", subscription_id=f"sub-{tag}")
    return VendorCancellationRequested(
        request_id=uuid.UUID(request_id), account_id=f"acct-{tag}", subscription_id=f"sub-{tag}", vendor="acme",
        vendor_subscription_id=f"v-{tag}", effective_date=date.today(), current_quantity=1, new_quantity=0,
        snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="In Progress"))


def _bytes(payload: Payload, **payload_changes: Any) -> bytes:
    envelope = orjson.loads(encode(envelope_for(payload, producer="tests", correlation_id=str(uuid.uuid4()),
                                                causation_id=None)))
    envelope["payload"].update(payload_changes)
    return orjson.dumps(envelope)


def _hostile(topic: str) -> list[tuple[str, bytes, bytes, str | None]]:
    """(what, key, value, the request id a rejected status is owed to) of each record to publish."""
    tag = uuid.uuid4().hex[:8]
    rid = str(uuid.uuid4())
    long_id = {"subscription_id": LONG} if topic != topics.PAYMENTS_CHARGES else {"charge_id": LONG}
    owed = rid if topic == topics.REQUESTED else None
    deep = b"[" * 300 + b"]" * 300
    return [
        ("not JSON, 201-character key", b"k" * 201, b"not json", None),
        ("not JSON, 300-character key with a NUL", b"\x00" + b"k" * 299, b"not json", None),
        ("nested too deep to re-encode, long key", b"d" * 250, deep, None),
        ("over-long id", tag.encode(), _bytes(_valid(topic, tag, rid), **long_id), owed),
        ("valid record, 300-character key", LONG.encode(), _bytes(_valid(topic, tag + "k", rid2 := str(uuid.uuid4()))),
         rid2 if topic == topics.REQUESTED else None),
    ]


@pytest.mark.parametrize("topic", list(DEAD_LETTERED_BY))
async def test_records_the_stores_cannot_hold_are_dead_lettered_and_nothing_stops(
        broker, store, services, topic_reader, topic: str) -> None:
    running = {name: await services.start_service(name, store(name)) for name in SERVICES}
    readers = {name: r for name, r in running.items() if topic in {route.topic for route in r.runtime.routes}}
    dlq = await topic_reader(topics.DLQ)
    saga = await topic_reader(topics.SAGA)
    hostile = _hostile(topic)
    marker = _bytes(_valid(topic, uuid.uuid4().hex[:8], str(uuid.uuid4())))

    producer = make_producer(CommonSettings(kafka_bootstrap_servers=broker.bootstrap), client_id="hostile")
    await producer.start()
    try:  # all on partition 0: the marker is behind every one of them
        sent = [await producer.send_and_wait(topic, value, key=key, partition=0) for _, key, value, _ in hostile]
        marker_sent = await producer.send_and_wait(topic, marker, key=b"marker", partition=0)
    finally:
        await producer.stop()

    # Every group that reads the topic gets past the marker, and no service stopped on the way.
    partition = [TopicPartition(topic, 0)]

    async def past_marker() -> bool:
        for name, r in readers.items():
            assert not r.task.done(), f"{name} stopped: {r.task.exception() if not r.task.cancelled() else ''}"
        offsets = [(await _committed(broker.bootstrap, r.group_id, partition))[partition[0]] for r in readers.values()]
        return all(offset > marker_sent.offset for offset in offsets)

    await eventually(past_marker, timeout=60, interval=0.2, message=f"every reader of {topic} past the marker")

    owner = running[DEAD_LETTERED_BY[topic]].group_id
    for (what, key, value, owed), meta in zip(hostile, sent, strict=True):
        entry = await dlq.wait_for(lambda e, m=meta: e.event_type == "RecordDeadLettered"
                                   and e.payload["consumer_group"] == owner and e.payload["topic"] == topic
                                   and (e.payload["partition"], e.payload["offset"]) == (0, m.offset))
        dead = entry.payload
        dlq_key = dlq.record_of(entry).key.decode()
        assert dead["original_key"] == dlq_key and 0 < len(dlq_key) <= KEY_CHARS, what
        assert "\x00" not in dlq_key, what
        if len(key) > KEY_CHARS:
            assert dlq_key.endswith(hashlib.sha256(key).hexdigest()), what
        assert dead["original_size"] == len(value), what
        if owed is not None:
            failed = await saga.wait_for(lambda e, r=owed: e.event_type == "Failed" and e.payload["request_id"] == r)
            assert (failed.payload["source"], failed.payload["code"]) == ("validation", "bad_input"), what
    assert all(not r.task.done() for r in running.values())
