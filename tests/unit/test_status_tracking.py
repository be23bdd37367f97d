"""status_tracker: versions, idempotency and stuck detection (tracking), the handler's one transaction
(view, status record, event id) in a real database, the stuck timer, and the read model."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, select

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
from cancelflow.messaging.uow import UnitOfWork
from cancelflow_tools.testing.messages import handle
from status_tracker import guidance, orm, tracking
from status_tracker.handlers import TrackerHandlers
from status_tracker.projection import Query, ReadModel
from status_tracker.stuck import StuckTimer

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
    # The handler hands over the status record it has just built, instead of building it again.
    status = tracking.status_envelope(entry, causation_id=None).payload  # type: ignore[arg-type]
    assert tracking.document(entry, status) == doc  # type: ignore[arg-type]
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


def test_a_stuck_request_that_completes_after_all_publishes_it_resolved_by_the_system() -> None:
    rid = uuid.uuid4()
    entry, _ = fold_all([msg(e, T0) for e in story(rid)[:2]])
    [stuck] = tracking.overdue([entry], T0 + timedelta(minutes=12), 600)  # type: ignore[list-item]
    later = [msg(stuck, T0 + timedelta(minutes=12))] + [
        msg(e, T0 + timedelta(minutes=13 + i), offset=i + 1) for i, e in enumerate(story(rid)[2:])]
    entry, records = fold_all(later, entry)
    assert [r.payload["version"] for r in records] == [3, 4, 5, 6]  # one record per change, in order
    assert [r.payload["state"] for r in records] == ["manual_review"] * 4  # the terminal state stays
    final = records[-1].payload
    assert final["resolution"]["by"] == "system" and final["resolution"]["action"] == "completed"
    assert final["refund"] == {"amount": "0.00", "currency": "USD", "status": "not_due"} and final["error"] is None
    assert any("Resolved by the system" in h["message"] for h in final["history"])
    assert entry is not None and tracking.document(entry)["error_help"] is None
    assert [e["code"] for e in entry["errors"]] == ["timeout"]  # what happened on the way is kept


def test_a_stuck_alert_overtaken_by_progress_is_dropped() -> None:
    rid = uuid.uuid4()
    entry, _ = fold_all([msg(e, T0) for e in story(rid)[:2]])
    [stuck] = tracking.overdue([entry], T0 + timedelta(minutes=10), 600)  # type: ignore[list-item]
    entry, _ = fold_all([msg(story(rid)[2], T0 + timedelta(minutes=10, seconds=1))], entry)
    assert tracking.track(entry, msg(stuck, T0 + timedelta(minutes=10, seconds=2))) == tracking.Step()


# --- the handler, in a real database ---------------------------------------------------------------


@pytest.fixture
async def tracker_db(store):  # type: ignore[no-untyped-def]
    engine = db.make_engine(store("status_tracker"))
    await db.create_schema(engine, orm.metadata)
    yield engine
    await engine.dispose()


async def outbox(engine: Any) -> list[tuple[str, str | None, Envelope]]:
    async with db.session_factory(engine)() as session:
        rows = (await session.execute(select(orm.messaging.outbox).order_by(orm.messaging.outbox.c.id))).all()
    return [(r.topic, r.key, Envelope.model_validate(orjson.loads(r.value))) for r in rows]


async def test_each_step_commits_view_status_record_and_event_id_together(tracker_db) -> None:  # type: ignore[no-untyped-def]
    rid = uuid.uuid4()
    read_model = ReadModel(tracker_db, db.session_factory(tracker_db))
    handler = TrackerHandlers(read_model).saga_event
    messages = [msg(e, T0 + timedelta(seconds=i), offset=i) for i, e in enumerate(story(rid))]
    for m in messages:
        assert await handle(tracker_db, orm, handler, m)
    assert not await handle(tracker_db, orm, handler, messages[1])  # redelivered: the inbox drops it

    sent = await outbox(tracker_db)
    assert [(t, k, e.payload["version"]) for t, k, e in sent] == [(topics.STATUS, str(rid), v) for v in (1, 2, 3, 4, 5)]
    assert all(e.producer == "status_tracker" for _, _, e in sent)
    entry = await read_model.entry(str(rid))
    assert entry is not None and entry["version"] == 5 and entry["partition"] == 0
    assert (await read_model.get(str(rid)))["state"] == "completed"  # type: ignore[index]


async def test_an_event_folded_under_another_id_is_not_folded_twice(tracker_db) -> None:  # type: ignore[no-untyped-def]
    """The entry keeps the event ids it folded: a copy that got past the inbox (say, a row pruned) is
    still dropped, with no second status record."""
    rid = uuid.uuid4()
    handler = TrackerHandlers(ReadModel(tracker_db, db.session_factory(tracker_db))).saga_event
    first = msg(story(rid)[0], T0)
    await handle(tracker_db, orm, handler, first)
    async with db.session_factory(tracker_db)() as session:
        await session.execute(delete(orm.messaging.inbox))
        await session.commit()
    assert await handle(tracker_db, orm, handler, first)
    assert [e.payload["version"] for _, _, e in await outbox(tracker_db)] == [1]


async def test_a_step_that_fails_leaves_nothing_behind(tracker_db) -> None:  # type: ignore[no-untyped-def]
    rid = uuid.uuid4()
    read_model = ReadModel(tracker_db, db.session_factory(tracker_db))
    handlers = TrackerHandlers(read_model)
    first = msg(story(rid)[0], T0)

    async def crashing(m: Message, uow: Any) -> None:
        await handlers.saga_event(m, uow)
        raise RuntimeError("killed before the commit")

    with pytest.raises(RuntimeError):
        await handle(tracker_db, orm, crashing, first)
    assert await read_model.entry(str(rid)) is None and await outbox(tracker_db) == []
    assert await handle(tracker_db, orm, handlers.saga_event, first)  # redelivered: applied once
    assert [e.payload["version"] for _, _, e in await outbox(tracker_db)] == [1]


async def test_the_stuck_timer_flags_only_quiet_requests_of_partitions_read_to_the_end(tracker_db) -> None:  # type: ignore[no-untyped-def]
    read_model = ReadModel(tracker_db, db.session_factory(tracker_db))
    handler = TrackerHandlers(read_model).saga_event
    quiet, moving, elsewhere = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    old = datetime.now(UTC) - timedelta(seconds=120)
    await handle(tracker_db, orm, handler, msg(story(quiet)[0], old))
    await handle(tracker_db, orm, handler, msg(story(moving)[0], datetime.now(UTC)))
    other = decode(encode(msg(story(elsewhere)[0], old).envelope), topic=topics.SAGA, partition=3,
                   key=str(elsewhere).encode())
    await handle(tracker_db, orm, handler, other)

    def new_uow() -> UnitOfWork:
        return UnitOfWork(db.transactions(tracker_db), orm.messaging, producer="status_tracker")

    timer = StuckTimer(read_model, new_uow, lambda: None, after_s=60)
    timer.caught_up_partitions = lambda: _partitions({0})  # type: ignore[method-assign]
    assert await timer.flag_stuck() == [str(quiet)]
    assert await timer.flag_stuck() == []  # said once; the tracker has not folded it yet
    [stuck] = [e for t, _, e in await outbox(tracker_db) if t == topics.SAGA]
    assert stuck.event_type == "RequestStuck" and stuck.payload["stage"] == "validation"
    assert stuck.correlation_id == str(quiet) and stuck.producer == "status_tracker"


async def _partitions(found: set[int]) -> set[int]:
    return found


# --- the read model ----------------------------------------------------------------------------------


async def test_read_model_keeps_the_newest_version_and_filters(store: Any) -> None:
    engine = db.make_engine(store("status"))
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
