"""The messaging core against the real embedded broker, on SQLite and on PostgreSQL.

A tiny service built in the test (its own tables plus the inbox and outbox) consumes
`cancellations.requested`: its handler records an effect row and emits `CancellationReceived` on the
saga topic. The tests check what CONTRACT.md sections 1 and 7 promise: one effect per event (inbox),
publish-after-commit (outbox), dead-lettering of every kind of bad record without stopping the
partition, retries then dead-lettering of a failing handler, and committed offsets across a restart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from datetime import date
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

from cancelflow import topics
from cancelflow.events import (
    CancellationReceived,
    CancellationRequested,
    Envelope,
    Failed,
    RequestedBy,
    SagaEvent,
    Source,
    SubscriptionSnapshot,
    VendorCancellationRequested,
    VendorProvisioned,
    envelope_for,
)
from cancelflow.messaging.codec import MAX_RECORD_BYTES, Message
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.dispatch import HandlerContext, Route
from cancelflow.messaging.kafka import make_producer
from cancelflow.messaging.store import messaging_tables
from cancelflow.service import ServiceRuntime
from cancelflow.settings import CommonSettings, ServiceSettings
from cancelflow.sql import Query
from cancelflow_tools.stack.broker import free_port
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(120)

METADATA = MetaData()
MESSAGING = messaging_tables(METADATA)
EFFECTS = Table(
    "effects", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("event_id", String(64), nullable=False),
)
ADD_EFFECT = Query(insert(EFFECTS))


class TinyService:
    """The handler of the in-test service; `calls` lists the request ids it was invoked with."""

    def __init__(self, mode: str = "one_by_one") -> None:
        self.calls: list[str] = []
        self.mode = mode  # "batch": a poll's records in one transaction; "rounds": with a call between

    async def handle(self, msg: Message[CancellationRequested], uow: HandlerContext) -> None:
        request = msg.payload
        request_id = str(request.request_id)
        self.calls.append(request_id)
        if request.reason == "explode":
            raise RuntimeError("the handler exploded")
        await uow.db.run(ADD_EFFECT, request_id=request_id, event_id=msg.event_id)
        if self.mode == "rounds":
            async with uow.outside():  # as if it called the vendor
                await asyncio.sleep(0)
        uow.emit(CancellationReceived(
            request_id=request.request_id, account_id=request.account_id, target=request.target,
            subscription_id=request.subscription_id, mode=request.mode, requested_by=request.requested_by,
        ), correlation_id=request_id)

    def runtime(self, broker: Any, database_url: str) -> ServiceRuntime:
        settings = ServiceSettings(service="msgtest", database_url_env=database_url, http_port=free_port(),
                                   kafka_bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=25)
        runtime = ServiceRuntime("msgtest", settings, METADATA, MESSAGING)
        runtime.add_route(Route(topics.REQUESTED, dead_letter=True, batch=self.mode == "batch",
                                rounds=self.mode == "rounds").on(CancellationRequested, self.handle))
        return runtime


def a_request(subscription_id: str, *, reason: str = "", request_id: str | None = None) -> CancellationRequested:
    return CancellationRequested(
        request_id=request_id or str(uuid.uuid4()), account_id=f"acct-{subscription_id}",
        requested_by=RequestedBy(user_id="u-1", role="customer", channel="storefront"),
        target="subscription", subscription_id=subscription_id, reason=reason,
    )


def envelope_dict(payload: CancellationRequested) -> dict[str, Any]:
    envelope = envelope_for(payload, producer="tests", correlation_id=str(payload.request_id), causation_id=None)
    return envelope.model_dump(mode="json")


async def effect_rows(runtime: ServiceRuntime, request_id: str) -> list[dict[str, Any]]:
    async with runtime.sessions() as session:
        rows = await session.execute(select(EFFECTS).where(EFFECTS.c.request_id == request_id))
        return [dict(r) for r in rows.mappings()]


async def table_count(runtime: ServiceRuntime, table: Table, *where: Any) -> int:
    async with runtime.sessions() as session:
        return (await session.execute(select(func.count()).select_from(table).where(*where))).scalar_one()


def received_for(request_id: str):  # type: ignore[no-untyped-def]
    return lambda e: e.event_type == "CancellationReceived" and e.payload["request_id"] == request_id


def inbox_duplicates() -> float:
    return REGISTRY.get_sample_value("cancelflow_inbox_duplicates_total", {"topic": topics.REQUESTED}) or 0.0


@pytest.fixture(params=["one_by_one", "batch", "rounds"])
def tiny(request: pytest.FixtureRequest) -> TinyService:
    return TinyService(request.param)


@pytest.fixture
def sub() -> str:
    return f"sub-msg-{uuid.uuid4().hex[:10]}"


async def test_event_is_handled_once_and_its_event_published(broker, store, services, publisher,
                                                             topic_reader, sub, tiny):
    running = await services.start(tiny.runtime(broker, store("msgtest")))
    saga = await topic_reader(topics.SAGA)
    request = a_request(sub)
    request_id = str(request.request_id)

    sent = await publisher.publish(request)

    emitted = await saga.wait_for(received_for(request_id))
    assert emitted.producer == "msgtest"
    assert emitted.causation_id == str(sent.event_id)
    assert emitted.correlation_id == request_id
    assert saga.record_of(emitted).key == request_id.encode()
    rows = await effect_rows(running.runtime, request_id)
    assert [r["event_id"] for r in rows] == [str(sent.event_id)]
    inbox = MESSAGING.inbox
    assert await table_count(running.runtime, inbox, inbox.c.message_id == str(sent.event_id)) == 1
    # Published rows leave the outbox (deleted once the broker acknowledged them).
    await eventually(lambda: _outbox_empty(running.runtime), message="outbox emptied")
    assert tiny.calls.count(request_id) == 1


async def _outbox_empty(runtime: ServiceRuntime) -> bool:
    return await table_count(runtime, MESSAGING.outbox) == 0


async def test_same_envelope_twice_has_one_effect(broker, store, services, publisher, topic_reader, sub, tiny):
    running = await services.start(tiny.runtime(broker, store("msgtest")))
    saga = await topic_reader(topics.SAGA)
    request = a_request(sub)
    request_id = str(request.request_id)
    value = orjson.dumps(envelope_dict(request))
    duplicates_before = inbox_duplicates()

    await publisher.send_raw(topics.REQUESTED, value, key=sub)
    await publisher.send_raw(topics.REQUESTED, value, key=sub)  # redelivery: same event_id
    marker = a_request(sub)  # same key, same partition: handled after both copies
    await publisher.publish(marker)

    await saga.wait_for(received_for(str(marker.request_id)))
    assert len(await effect_rows(running.runtime, request_id)) == 1
    assert tiny.calls.count(request_id) == 1, "the inbox must stop the copy before the handler"
    assert inbox_duplicates() - duplicates_before >= 1
    await eventually(lambda: _outbox_empty(running.runtime), message="outbox emptied")
    await saga.caught_up()
    assert len(saga.matching(received_for(request_id))) == 1


async def test_bad_records_are_dead_lettered_and_the_partition_flows(broker, store, services, topic_reader, sub, tiny):
    # From the beginning: earlier tests' records (bad ones included) come first and change nothing here.
    running = await services.start(tiny.runtime(broker, store("msgtest")), at_end=False)
    dlq = await topic_reader(topics.DLQ)
    saga = await topic_reader(topics.SAGA)
    rid = {name: str(uuid.uuid4()) for name in ("envelope", "type", "version", "field", "large")}

    not_an_envelope = {"hello": "world", "payload": {"request_id": rid["envelope"]}}
    unknown_type = {**envelope_dict(a_request(sub, request_id=rid["type"])), "event_type": "CancellationTeleported"}
    unknown_version = {**envelope_dict(a_request(sub, request_id=rid["version"])), "schema_version": 99}
    missing_field = envelope_dict(a_request(sub, request_id=rid["field"]))
    del missing_field["payload"]["account_id"]
    too_large = envelope_dict(a_request(sub, request_id=rid["large"]))
    too_large["payload"]["reason"] = "x" * (MAX_RECORD_BYTES + 1)
    no_uuid = envelope_dict(a_request(sub))  # a request id that is no UUID: no request to reject
    no_uuid["payload"]["request_id"] = "req-42"
    # (reason, bytes, request id the DLQ entry and the Failed event carry)
    poison: list[tuple[str, bytes, str | None]] = [
        ("not_json", b"\xff\xfe{ this is not JSON", None),
        ("not_an_envelope", orjson.dumps(not_an_envelope), rid["envelope"]),
        ("unknown_event_type", orjson.dumps(unknown_type), rid["type"]),
        ("unknown_schema_version", orjson.dumps(unknown_version), rid["version"]),
        ("invalid_payload", orjson.dumps(missing_field), rid["field"]),
        ("too_large", orjson.dumps(too_large), None),
        ("invalid_payload", orjson.dumps(no_uuid), None),
    ]
    valid = a_request(sub)

    producer = make_producer(CommonSettings(kafka_bootstrap_servers=broker.bootstrap), client_id="poison")
    await producer.start()
    try:
        sent = [await producer.send_and_wait(topics.REQUESTED, value, key=sub.encode()) for _, value, _ in poison]
        valid_sent = await producer.send_and_wait(topics.REQUESTED, orjson.dumps(envelope_dict(valid)),
                                                  key=sub.encode())
    finally:
        await producer.stop()
    assert len({m.partition for m in [*sent, valid_sent]}) == 1, "one key, one partition"

    # Nothing valid behind the bad records is lost or stuck.
    await saga.wait_for(received_for(str(valid.request_id)))
    assert len(await effect_rows(running.runtime, str(valid.request_id))) == 1

    for (reason, value, request_id), meta in zip(poison, sent, strict=True):
        entry = await dlq.wait_for(lambda e, m=meta: _dead_letter_of(e, running.group_id, m.partition, m.offset))
        dead = entry.payload
        assert dead["reason"] == reason, dead
        assert dead["detail"], f"{reason}: no readable detail"
        assert (dead["topic"], dead["original_key"]) == (topics.REQUESTED, sub)
        assert dead["original_size"] == len(value)
        assert dead["original_sha256"] == hashlib.sha256(value).hexdigest()
        if reason == "too_large":
            assert dead["original_base64"] is None  # the digest stands in for the bytes
        else:
            assert base64.b64decode(dead["original_base64"]) == value
        assert dead["request_id"] == request_id
        assert dlq.record_of(entry).key == sub.encode()
        if request_id is not None:
            failed = await saga.wait_for(lambda e, r=request_id: e.event_type == "Failed"
                                         and e.payload["request_id"] == r)
            assert failed.payload["source"] == "validation"
            assert failed.payload["code"] == "bad_input"
            assert reason in failed.payload["message"]
    # Each bad record was dead-lettered once by this consumer group.
    mine = dlq.matching(lambda e: e.event_type == "RecordDeadLettered"
                        and e.payload["consumer_group"] == running.group_id
                        and (e.payload["partition"], e.payload["offset"]) in {(m.partition, m.offset) for m in sent})
    assert len(mine) == len(poison)


def _dead_letter_of(envelope: Envelope, group: str, partition: int, offset: int) -> bool:
    p = envelope.payload
    return (envelope.event_type == "RecordDeadLettered" and p["consumer_group"] == group
            and p["topic"] == topics.REQUESTED and p["partition"] == partition and p["offset"] == offset)


async def test_failing_handler_is_retried_then_dead_lettered(broker, store, services, publisher,
                                                             topic_reader, sub, tiny):
    running = await services.start(tiny.runtime(broker, store("msgtest")))
    dlq = await topic_reader(topics.DLQ)
    saga = await topic_reader(topics.SAGA)
    bad, good = a_request(sub, reason="explode"), a_request(sub)
    bad_id, good_id = str(bad.request_id), str(good.request_id)

    bad_sent = await publisher.publish(bad)
    await publisher.publish(good)

    await saga.wait_for(received_for(good_id))  # the record behind the failing one flows
    assert len(await effect_rows(running.runtime, good_id)) == 1
    entry = await dlq.wait_for(lambda e: e.event_type == "RecordDeadLettered"
                               and e.payload["consumer_group"] == running.group_id
                               and e.payload["request_id"] == bad_id)
    dead = entry.payload
    assert dead["reason"] == "handler_error"
    assert "the handler exploded" in dead["detail"]
    assert orjson.loads(base64.b64decode(dead["original_base64"]))["event_id"] == str(bad_sent.event_id)
    # In a batch or in rounds, the first try is theirs; the one-by-one path then retries it.
    assert tiny.calls.count(bad_id) == ConsumeLoop.MAX_HANDLER_ATTEMPTS + (tiny.mode != "one_by_one")
    assert await effect_rows(running.runtime, bad_id) == []  # every attempt rolled back
    failed = await saga.wait_for(lambda e: e.event_type == "Failed" and e.payload["request_id"] == bad_id)
    # The requester learns it was set aside, not our exception (that stays in the DLQ for operators).
    assert "set aside for support" in failed.payload["message"]
    assert "exploded" not in failed.payload["message"]
    assert failed.payload["details"]["dead_lettered"].startswith("dlq:")
    assert len(saga.matching(received_for(bad_id))) == 0


class FailingSagaService:
    """A service named `name` whose `event_type` handler raises for one request (and ignores others)."""

    def __init__(self, name: str, event: type[SagaEvent], request_id: str, step: Source | None = None) -> None:
        self.name, self.event, self.request_id, self.step = name, event, request_id, step

    async def handle(self, msg: Message[SagaEvent], uow: HandlerContext) -> None:
        if str(msg.payload.request_id) == self.request_id:
            raise RuntimeError(f"{self.name} cannot handle {self.event.event_type}")

    def runtime(self, broker: Any, database_url: str) -> ServiceRuntime:
        settings = ServiceSettings(service=self.name, database_url_env=database_url, http_port=free_port(),
                                   kafka_bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=25)
        runtime = ServiceRuntime(self.name, settings, METADATA, MESSAGING, failure_source=self.step)
        runtime.add_route(Route(topics.SAGA).on(self.event, self.handle))
        return runtime


async def test_saga_events_a_service_cannot_handle(broker, store, services, publisher, topic_reader, sub):
    """A saga step that keeps failing fails the request at its step; an observer (the status tracker)
    does not, and a `Failed` event is never answered with another one (that fed back forever)."""
    rid = {name: str(uuid.uuid4()) for name in ("step", "observer", "failed")}
    step = FailingSagaService("provisioning", VendorCancellationRequested, rid["step"], Source.vendor)
    observer = FailingSagaService("msgtest", VendorProvisioned, rid["observer"])
    answering = FailingSagaService("notification", Failed, rid["failed"], Source.notification)
    running = {s.name: await services.start(s.runtime(broker, store(s.name))) for s in (step, observer, answering)}
    dlq = await topic_reader(topics.DLQ)
    saga = await topic_reader(topics.SAGA)

    await publisher.publish(VendorCancellationRequested(
        request_id=rid["step"], account_id="acct-1", subscription_id=sub, vendor="acme",
        vendor_subscription_id=f"v-{sub}", effective_date=date.today(), current_quantity=1, new_quantity=0,
        snapshot=SubscriptionSnapshot()))
    await publisher.publish(VendorProvisioned(request_id=rid["observer"], subscription_id=sub, vendor="acme",
                                              vendor_subscription_id=f"v-{sub}", new_quantity=0))
    await publisher.publish(Failed(request_id=rid["failed"], source=Source.vendor, code="vendor_rejected",
                                   message="no"))

    for service in (step, observer, answering):
        entry = await dlq.wait_for(lambda e, s=service: e.event_type == "RecordDeadLettered"
                                   and e.payload["consumer_group"] == running[s.name].group_id
                                   and e.payload["request_id"] == s.request_id)
        assert (entry.payload["reason"], entry.payload["topic"]) == ("handler_error", topics.SAGA)
    failed = await saga.wait_for(lambda e: e.event_type == "Failed" and e.payload["request_id"] == rid["step"])
    assert (failed.producer, failed.payload["source"], failed.payload["code"]) == (
        "provisioning", "vendor", "internal_error")
    assert failed.payload["details"]["dead_lettered"].startswith(f"dlq:{topics.SAGA}:")

    for service in (observer, answering):
        await eventually(lambda s=service: _outbox_empty(running[s.name].runtime), message="outbox emptied")
    await saga.caught_up()
    assert not saga.matching(lambda e: e.event_type == "Failed" and e.payload["request_id"] == rid["observer"])
    answers = saga.matching(lambda e: e.event_type == "Failed" and e.payload["request_id"] == rid["failed"])
    assert [e.producer for e in answers] == ["tests"]  # only the one published


async def _committed(bootstrap: str, group: str, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets (read as a consumer of the group that does not join it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        return {tp: (await consumer.committed(tp)) or 0 for tp in partitions}
    finally:
        await consumer.stop()


async def _end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topics.REQUESTED) or set()
        return await consumer.end_offsets([TopicPartition(topics.REQUESTED, p) for p in partitions])
    finally:
        await consumer.stop()


async def test_offsets_are_committed_and_a_restart_handles_nothing_twice(broker, store, services, publisher,
                                                                         topic_reader, monkeypatch, sub):
    database_url = store("msgtest")
    group = f"cancelflow-msgtest-{uuid.uuid4().hex[:8]}"
    saga = await topic_reader(topics.SAGA)
    first = TinyService()
    running = await services.start(first.runtime(broker, database_url), group_id=group, at_end=True)
    requests = [a_request(sub) for _ in range(3)]
    for request in requests:
        await publisher.publish(request)
    for request in requests:
        await saga.wait_for(received_for(str(request.request_id)))

    # Everything read so far (this test's records and any before them) is committed.
    ends = await _end_offsets(broker.bootstrap)

    async def caught_up() -> bool:
        committed = await _committed(broker.bootstrap, group, list(ends))
        return all(committed[tp] >= end for tp, end in ends.items())

    await eventually(caught_up, message="offsets committed up to the partition ends")
    committed = await _committed(broker.bootstrap, group, list(ends))
    await services.stop(running)

    seen: list[tuple[int, int]] = []
    original_process = ConsumeLoop.process

    async def recording_process(self: ConsumeLoop, record: Any) -> None:
        seen.append((record.partition, record.offset))
        await original_process(self, record)

    monkeypatch.setattr(ConsumeLoop, "process", recording_process)
    second = TinyService()
    duplicates_before = inbox_duplicates()
    restarted = await services.start(second.runtime(broker, database_url), group_id=group)
    marker = a_request(sub)
    await publisher.publish(marker)
    await saga.wait_for(received_for(str(marker.request_id)))

    assert len(await effect_rows(restarted.runtime, str(marker.request_id))) == 1
    for request in requests:
        assert len(await effect_rows(restarted.runtime, str(request.request_id))) == 1
        assert str(request.request_id) not in second.calls
    redelivered = [(p, o) for p, o in seen if o < committed.get(TopicPartition(topics.REQUESTED, p), 0)]
    assert redelivered == [], "records below the committed offsets came again"
    assert inbox_duplicates() == duplicates_before
    assert second.calls == [str(marker.request_id)]
