"""status_tracker: versions, idempotency and stuck detection (tracking), the processor's order of writes
and dead-lettering (handlers, with fakes for the faust tables and the broker), and the read model."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from cancelflow import db, topics
from cancelflow.events import (
    CancellationReceived,
    EmailSent,
    Envelope,
    Failed,
    RefundIssued,
    RequestStuck,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
    envelope_for,
)
from cancelflow.messaging.codec import Message, decode, encode
from status_tracker import guidance, orm, tracking
from status_tracker.handlers import Record, SagaProcessor
from status_tracker.projection import Query, ReadModel

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CUSTOMER = {"user_id": "u-1", "role": "customer", "channel": "storefront"}


def msg(payload: Any, at: datetime, *, offset: int = 0) -> Message:
    envelope = envelope_for(payload, producer="test", correlation_id=str(payload.request_id), causation_id=None)
    envelope = envelope.model_copy(update={"occurred_at": at})
    return decode(encode(envelope), topic=topics.SAGA, offset=offset, key=str(payload.request_id).encode())


def story(rid: uuid.UUID) -> list[Any]:
    return [
        CancellationReceived(request_id=rid, account_id="acc-1", target="subscription", subscription_id="sub-1",
                             mode="immediate", requested_by=CUSTOMER),
        VendorCancellationRequested(request_id=rid, account_id="acc-1", subscription_id="sub-1", vendor="acme",
                                    vendor_subscription_id="V-1", effective_date=T0.date(), current_quantity=1,
                                    new_quantity=0, snapshot={"provisioning_status": "In Progress"}),
        VendorProvisioned(request_id=rid, subscription_id="sub-1", vendor="acme", vendor_subscription_id="V-1",
                          new_quantity=0),
        RefundIssued(request_id=rid, amount=Decimal("0.00"), currency="USD", status="not_due"),
        EmailSent(request_id=rid, kind="completed", audience="customer", subject="Done", message_id="<m1>"),
    ]


def fold_all(messages: list[Message], entry: tracking.Entry | None = None) -> tuple[tracking.Entry | None, list]:
    records = []
    for m in messages:
        step = tracking.track(entry, m)
        if step.entry is not None:
            entry = step.entry
            records.append(step.status)
    return entry, records


# --- tracking: versions and idempotency ------------------------------------------------------------


def test_each_change_is_one_record_with_the_next_version() -> None:
    rid = uuid.uuid4()
    messages = [msg(e, T0 + timedelta(seconds=i)) for i, e in enumerate(story(rid))]
    entry, records = fold_all(messages)
    assert [r.payload["version"] for r in records] == [1, 2, 3, 4, 5]
    assert [r.payload["state"] for r in records] == ["received", "in_progress", "in_progress", "completed",
                                                      "completed"]
    assert all(r.event_type == "CancellationStatusChanged" and r.correlation_id == str(rid) for r in records)
    assert [r.causation_id for r in records] == [m.event_id for m in messages]
    assert entry is not None and entry["emails"] == [
        {"at": (T0 + timedelta(seconds=4)).isoformat(), "kind": "completed", "audience": "customer",
         "subject": "Done"}]
    assert entry["created_at"] == T0.isoformat() and entry["updated_at"] == (T0 + timedelta(seconds=4)).isoformat()


def test_a_redelivered_event_makes_no_second_record() -> None:
    rid = uuid.uuid4()
    messages = [msg(e, T0 + timedelta(seconds=i)) for i, e in enumerate(story(rid))]
    entry, _ = fold_all(messages)
    for m in messages:  # every one of them again, e.g. a byte-for-byte copy at a later offset
        again = decode(encode(m.envelope), topic=topics.SAGA, offset=m.offset + 100)
        assert tracking.track(entry, again).duplicate
    assert entry is not None and entry["version"] == 5


def test_a_record_repeated_after_a_crash_is_the_same_event() -> None:
    """Published, then the process died before the table was written: the retry publishes the same
    record, which consumers drop by event_id."""
    rid = uuid.uuid4()
    first = msg(story(rid)[0], T0)
    one, two = tracking.track(None, first), tracking.track(None, first)
    assert one.status == two.status and one.status is not None
    assert one.status.event_id == two.status.event_id


def test_steps_of_a_request_never_received_make_no_record() -> None:
    rid = uuid.uuid4()
    assert tracking.track(None, msg(story(rid)[2], T0)) == tracking.Step()


def test_events_after_a_terminal_state_only_add_history() -> None:
    rid = uuid.uuid4()
    entry, _ = fold_all([msg(e, T0 + timedelta(seconds=i)) for i, e in enumerate(story(rid)[:4])])
    failed = VendorCancellationFailed(request_id=rid, subscription_id="sub-1", vendor="acme",
                                      vendor_subscription_id="V-1", code="vendor_rejected", message="late",
                                      retryable=False)
    step = tracking.track(entry, msg(failed, T0 + timedelta(minutes=1)))
    assert step.entry is not None and step.status is not None
    assert step.status.payload["state"] == "completed" and step.status.payload["version"] == 5
    assert step.entry["errors"][-1]["source"] == "vendor"


def test_the_document_explains_the_error() -> None:
    rid = uuid.uuid4()
    entry, _ = fold_all([msg(e, T0) for e in story(rid)[:2]])
    failed = VendorCancellationFailed(request_id=rid, subscription_id="sub-1", vendor="acme",
                                      vendor_subscription_id="V-1", code="vendor_rejected", message="locked",
                                      retryable=False)
    entry, _ = fold_all([msg(failed, T0 + timedelta(seconds=5))], entry)
    doc = tracking.document(entry)  # type: ignore[arg-type]
    assert doc["errors"][0]["help"]["label"] == "Vendor error" and doc["errors"][0]["help"]["action"] == "retry"
    assert doc["created_at"] == T0.isoformat() and doc["version"] == 3
    assert guidance.for_error("platform", "platform_commit_failed")["action"] == "contact_support"
    assert guidance.for_error("vendor", "timeout")["label"] == "No progress"


# --- stuck requests --------------------------------------------------------------------------------


def test_overdue_finds_open_requests_without_progress() -> None:
    rids = [uuid.uuid4() for _ in range(4)]
    in_progress, _ = fold_all([msg(e, T0) for e in story(rids[0])[:2]])
    fresh, _ = fold_all([msg(e, T0 + timedelta(minutes=9)) for e in story(rids[1])[:2]])
    done, _ = fold_all([msg(e, T0) for e in story(rids[2])[:4]])
    received, _ = fold_all([msg(story(rids[3])[0], T0)])
    found = tracking.overdue([in_progress, fresh, done, received], T0 + timedelta(minutes=10), 600)  # type: ignore[list-item]
    assert {str(s.request_id): (s.stage, s.stuck_for_seconds) for s in found} == {
        str(rids[0]): ("vendor", 600.0), str(rids[3]): ("validation", 600.0)}
    assert all(s.since == T0 for s in found)


def test_a_stuck_request_ends_in_manual_review_with_a_timeout_error() -> None:
    rid = uuid.uuid4()
    entry, _ = fold_all([msg(e, T0) for e in story(rid)[:2]])
    [stuck] = tracking.overdue([entry], T0 + timedelta(minutes=12), 600)  # type: ignore[list-item]
    step = tracking.track(entry, msg(stuck, T0 + timedelta(minutes=12)))
    assert step.status is not None and step.entry is not None
    status = step.status.payload
    assert status["state"] == "manual_review" and status["version"] == 3
    assert status["error"]["source"] == "vendor" and status["error"]["code"] == "timeout"
    assert "No progress at the vendor step for 12 min" in status["history"][-1]["message"]
    assert step.entry["errors"][-1]["code"] == "timeout"
    # Said again (a second timer tick, a replica): nothing more.
    again = RequestStuck(request_id=rid, stage="vendor", since=T0, stuck_for_seconds=900)
    assert tracking.track(step.entry, msg(again, T0 + timedelta(minutes=15))).status is None


def test_a_stuck_alert_overtaken_by_progress_is_dropped() -> None:
    rid = uuid.uuid4()
    entry, _ = fold_all([msg(e, T0) for e in story(rid)[:2]])
    [stuck] = tracking.overdue([entry], T0 + timedelta(minutes=10), 600)  # type: ignore[list-item]
    entry, _ = fold_all([msg(story(rid)[2], T0 + timedelta(minutes=10, seconds=1))], entry)
    assert tracking.track(entry, msg(stuck, T0 + timedelta(minutes=10, seconds=2))) == tracking.Step()


# --- the processor, with fakes -----------------------------------------------------------------------


class DictEntries(dict):  # type: ignore[type-arg]
    def put(self, request_id: str, entry: tracking.Entry) -> None:
        self[request_id] = entry


class FakeReadModel:
    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []
        self.entries: dict[str, dict[str, Any]] = {}

    async def save(self, document: dict[str, Any], entry: dict[str, Any] | None = None) -> None:
        self.saved.append(document)
        if entry is not None:
            self.entries[document["request_id"]] = entry

    async def entry(self, request_id: str) -> dict[str, Any] | None:
        return self.entries.get(request_id)


class Broker:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, Envelope]] = []
        self.fail_next = 0

    async def publish(self, topic: str, key: str | None, value: bytes) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("broker hiccup")
        self.sent.append((topic, key, Envelope.model_validate(orjson.loads(value))))


def processor(entries: DictEntries, read_model: FakeReadModel, broker: Broker,
              markers: set[str] | None = None) -> SagaProcessor:
    return SagaProcessor(entries=entries, dead_lettered=markers if markers is not None else set(),
                         read_model=read_model, publish=broker.publish, group_id="tracker-test")  # type: ignore[arg-type]


def record(m: Message, offset: int) -> Record:
    return Record(topics.SAGA, 0, offset, m.key.encode() if m.key else None, encode(m.envelope))


async def test_processor_writes_read_model_then_status_then_table() -> None:
    rid = uuid.uuid4()
    entries, read_model, broker = DictEntries(), FakeReadModel(), Broker()
    p = processor(entries, read_model, broker)
    messages = [msg(e, T0 + timedelta(seconds=i)) for i, e in enumerate(story(rid))]
    for offset, m in enumerate(messages):
        await p.process(record(m, offset))
    await p.process(record(messages[1], 99))  # redelivered
    assert [(t, k, e.payload["version"]) for t, k, e in broker.sent] == [
        (topics.STATUS, str(rid), v) for v in (1, 2, 3, 4, 5)]
    assert [d["version"] for d in read_model.saved] == [1, 2, 3, 4, 5]
    assert entries[str(rid)]["version"] == 5


async def test_processor_retries_a_failed_publish_with_the_same_record() -> None:
    rid = uuid.uuid4()
    entries, read_model, broker = DictEntries(), FakeReadModel(), Broker()
    broker.fail_next = 1
    await processor(entries, read_model, broker).process(record(msg(story(rid)[0], T0), 0))
    assert [e.payload["version"] for _, _, e in broker.sent] == [1]
    # The retry finds the step already in the read model and only publishes it again.
    assert [d["version"] for d in read_model.saved] == [1]


async def test_processor_dead_letters_a_bad_record_once() -> None:
    entries, read_model, broker, markers = DictEntries(), FakeReadModel(), Broker(), set()  # type: ignore[var-annotated]
    bad = Record(topics.SAGA, 2, 7, b"k-1", b"{not json")
    p = processor(entries, read_model, broker, markers)
    await p.process(bad)
    await p.process(bad)  # replayed after a restart
    [(topic, key, dead)] = broker.sent
    assert (topic, key, dead.event_type) == (topics.DLQ, "k-1", "RecordDeadLettered")
    assert dead.payload["reason"] == "not_json" and dead.payload["consumer_group"] == "tracker-test"
    assert (dead.payload["topic"], dead.payload["partition"], dead.payload["offset"]) == (topics.SAGA, 2, 7)
    assert markers == {f"dlq:{topics.SAGA}:2:7"} and entries == {}


# --- the read model ----------------------------------------------------------------------------------


async def test_read_model_keeps_the_newest_version_and_filters(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'status.db'}")
    try:
        await db.create_schema(engine, orm.metadata)
        model = ReadModel(engine, db.session_factory(engine))
        rids = [uuid.uuid4() for _ in range(3)]
        done, _ = fold_all([msg(e, T0) for e in story(rids[0])[:4]])
        failed, _ = fold_all([msg(e, T0 + timedelta(seconds=1)) for e in story(rids[1])[:2]])
        failed, _ = fold_all([msg(Failed(request_id=rids[1], source="vendor", code="vendor_rejected",
                                         message="no"), T0 + timedelta(seconds=2))], failed)
        received, _ = fold_all([msg(story(rids[2])[0], T0 + timedelta(seconds=2))])
        for entry in (done, failed, received):
            await model.save(tracking.document(entry))  # type: ignore[arg-type]
        older = {**tracking.document(done), "version": 1, "state": "received"}  # type: ignore[arg-type]
        await model.save(older)  # late and out of order: ignored

        assert (await model.get(str(rids[0])))["state"] == "completed"  # type: ignore[index]
        assert await model.get(str(uuid.uuid4())) is None
        items, total = await model.search(Query())
        assert total == 3 and [i["request_id"] for i in items] == [str(r) for r in reversed(rids)]
        items, total = await model.search(Query(states=["failed", "manual_review"]))
        assert (total, [i["request_id"] for i in items]) == (1, [str(rids[1])])
        assert (await model.search(Query(error_sources=["vendor"])))[1] == 1
        assert (await model.search(Query(states=["completed"], account_id="acc-2")))[1] == 0
        items, total = await model.search(Query(limit=1, offset=1))
        assert total == 3 and [i["request_id"] for i in items] == [str(rids[1])]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("source,code,action", [
    ("vendor", "vendor_rejected", "retry"), ("platform", "platform_commit_failed", "contact_support"),
    ("payment", "refund_failed", "contact_support"), ("validation", "not_active", "fix_request"),
    ("validation", "provisioning_in_progress", "wait"), ("payment", "timeout", "contact_support"),
])
def test_guidance_for_every_source(source: str, code: str, action: str) -> None:
    assert guidance.for_error(source, code)["action"] == action


async def test_a_table_write_lost_to_a_kill_is_recovered_from_the_read_model() -> None:
    """kill -9 after the offset commit but before the table's changelog write: the restarted tracker's
    table lacks the step; the read model (committed first) has it, so nothing is skipped or lost."""
    rid = uuid.uuid4()
    entries, read_model, broker = DictEntries(), FakeReadModel(), Broker()
    work = processor(entries, read_model, broker)
    first, second, third = (msg(e, T0 + timedelta(seconds=i)) for i, e in enumerate(story(rid)[:3]))
    await work.process(record(first, 0))
    await work.process(record(second, 1))
    entries.pop(str(rid))  # the table lost both writes (a tracker rebuilt from a short changelog)

    await work.process(record(third, 2))

    entry = entries[str(rid)]
    assert entry["version"] == 3
    assert entry["view"]["state"] == "in_progress" and entry["view"]["stage"] == "platform"
    assert [e.payload["version"] for topic, _, e in broker.sent if topic == topics.STATUS] == [1, 2, 3]


async def test_a_redelivered_step_after_a_lost_publish_is_published_again() -> None:
    rid = uuid.uuid4()
    entries, read_model, broker = DictEntries(), FakeReadModel(), Broker()
    work = processor(entries, read_model, broker)
    first = msg(story(rid)[0], T0)
    await work.process(record(first, 0))
    entries.pop(str(rid))
    broker.sent.clear()  # as if the status record never left before the kill

    await work.process(record(first, 0))  # the same record, redelivered

    assert [e.payload["version"] for _, _, e in broker.sent] == [1]
    assert entries[str(rid)]["version"] == 1
