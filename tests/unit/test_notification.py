"""Notification with a fake mailer and a real unit of work (SQLite and PostgreSQL): which emails each
outcome owes, the intent-first delivery (claim, send, mark), recovery after a kill between send and
mark, SMTP outages, customers whose contact arrives late, opt-out and stuck requests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import create_schema, make_engine, transactions
from cancelflow.events import (
    CancellationReceived,
    Failed,
    Payload,
    PlatformCommitted,
    RefundIssued,
    RequestStuck,
    Source,
    SubscriptionActivated,
    SubscriptionSnapshot,
    VendorCancellationRequested,
)
from cancelflow.messaging.uow import UnitOfWork
from cancelflow_tools.testing.messages import handle, message
from notification import orm
from notification import sender as sender_module
from notification.adapters.mailer import FakeMailer, MailDeliveryError
from notification.handlers import EMAILS_DUE, NotificationHandlers
from notification.render import message_id_for
from notification.sender import EmailSender
from status_tracker.fold import apply, empty_view

SUPPORT = "support@example.test"
TODAY = date(2026, 11, 21)


class Killed(BaseException):
    """Stands in for the crash point's os._exit: nothing after it runs."""


class World:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.handlers = NotificationHandlers(sender_address="billing@example.test", support_email=SUPPORT)
        self.mailer = FakeMailer()
        self.sender = self.new_sender()
        self.written: list[frozenset[str]] = []  # what each handled record's commit wrote (wake-ups)
        h = self.handlers
        self.routes = {
            "SubscriptionActivated": h.subscription_activated, "CancellationReceived": h.cancellation_received,
            "VendorCancellationRequested": h.vendor_requested, "PlatformCommitted": h.platform_committed,
            "RefundIssued": h.refund_issued, "Failed": h.failed, "RequestStuck": h.request_stuck,
        }

    def new_uow(self) -> UnitOfWork:
        return UnitOfWork(transactions(self.engine), orm.messaging, producer="notification")

    def new_sender(self, **kwargs: Any) -> EmailSender:
        """A sender as a (re)started process has it: same database, same mailer."""
        return EmailSender(self.mailer, self.new_uow, **{"max_backoff_s": 1.0, **kwargs})

    async def send(self, payload: Payload) -> bool:
        return await handle(self.engine, orm, self.routes[payload.event_type], message(payload),
                            on_commit=self.written.append)

    def woke_sender(self) -> bool:
        """Whether a record handled since the last call made an email due (the sender's wake-up)."""
        woke = any(EMAILS_DUE in written for written in self.written)
        self.written.clear()
        return woke

    async def emails(self, request_id: str | None = None) -> dict[str, dict[str, Any]]:
        query = select(orm.emails).order_by(orm.emails.c.id)
        if request_id:
            query = query.where(orm.emails.c.request_id == request_id)
        async with self.engine.connect() as conn:
            return {r["kind"]: dict(r) for r in (await conn.execute(query)).mappings().all()}

    async def emails_by_message_id(self) -> dict[str, dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(orm.emails))).mappings().all()
        return {r["message_id"]: dict(r) for r in rows}

    async def outbox(self) -> list[dict[str, Any]]:
        table = orm.messaging.outbox
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(table).order_by(table.c.id))).mappings().all()
        return [orjson.loads(r["value"]) for r in rows]

    async def emitted(self, event_type: str) -> list[dict[str, Any]]:
        return [e["payload"] for e in await self.outbox() if e["event_type"] == event_type]

    async def deliver_all(self) -> None:
        await self.sender.deliver_due()

    def sent_to(self, request_id: str) -> list[EmailMessage]:
        return [m for m in self.mailer.sent if m["X-Cancelflow-Request-Id"] == request_id]

    # --- a request's saga, as notification sees it ------------------------------------------------

    async def known(self, account: str = "acc-1", subscription: str = "sub-1", email: str = "jane@example.com",
                    *, contact: bool = True, opt_out: bool = False) -> str:
        if contact:
            await self.send(activated(account, subscription, email))
        request_id = uuid.uuid4()
        await self.send(CancellationReceived(
            request_id=request_id, account_id=account, target="subscription", subscription_id=subscription,
            mode="immediate", requested_by={"user_id": "u-1", "role": "customer", "channel": "storefront"},
            opt_out_of_emails=opt_out))
        await self.send(VendorCancellationRequested(
            request_id=request_id, account_id=account, subscription_id=subscription, vendor="acme",
            vendor_subscription_id=f"V-{subscription}", effective_date=TODAY, current_quantity=1, new_quantity=0,
            snapshot=SubscriptionSnapshot(provisioning_status="In Progress", access_end_date=TODAY)))
        return str(request_id)

    async def completed(self, request_id: str, subscription: str = "sub-1") -> None:
        rid = uuid.UUID(request_id)
        await self.send(PlatformCommitted(
            request_id=rid, account_id="acc-1", subscription_id=subscription, mode="immediate", full=True,
            trial=False, effective_date=TODAY, access_end_date=TODAY, period_start=date(2026, 11, 1),
            period_end=date(2026, 12, 1), quantity_before=1, quantity_after=0, currency="USD", refund_due=True,
            history=f"Status is set to canceled with effective date {TODAY}", snapshot=SubscriptionSnapshot()))
        await self.send(RefundIssued(request_id=rid, subscription_id=subscription, amount=Decimal("10.00"),
                                     currency="USD", status="succeeded"))

    async def platform_failed(self, request_id: str) -> None:
        await self.send(Failed(request_id=uuid.UUID(request_id), source=Source.platform, code="commit_failed",
                               message="database said no", history="The subscription cancellation process has "
                               "encountered an error on our Platform. Please contact your administrator",
                               details={"vendor": "acme", "vendor_subscription_id": "V-sub-1",
                                        "platform_error": "IntegrityError('subscriptions.quantity')"}))


def activated(account: str = "acc-1", subscription: str = "sub-1",
              email: str = "jane@example.com") -> SubscriptionActivated:
    return SubscriptionActivated.model_validate(dict(
        subscription_id=subscription, account_id=account, customer={"email": email, "name": "Jane"},
        product_name="Acme CRM", vendor="acme", vendor_subscription_id=f"V-{subscription}",
        billing_period="monthly", unit_price="10.00", currency="USD", quantity=1, status="active",
        current_period_start=date(2026, 11, 1), current_period_end=date(2026, 12, 1), auto_renew=True))


def stuck(request_id: str, stage: str = "vendor", seconds: float = 2700) -> RequestStuck:
    return RequestStuck(request_id=uuid.UUID(request_id), stage=stage, since=datetime(2026, 11, 21, 10, 0, tzinfo=UTC),
                        stuck_for_seconds=seconds)


def mid(msg: EmailMessage) -> str:
    """The Message-ID, unfolded (a long one is folded onto its own header line on the wire)."""
    return str(msg["Message-ID"]).strip()


def text(msg: EmailMessage) -> str:
    return " ".join(msg.get_body(("plain",)).get_content().split())  # type: ignore[union-attr]


@pytest.fixture
async def world(store: Any) -> AsyncIterator[World]:
    engine = make_engine(store("notification"))
    await create_schema(engine, orm.metadata)
    yield World(engine)
    await engine.dispose()


# --- one email per outcome ----------------------------------------------------------------------------


async def test_completed_is_sent_once_and_recorded_once(world: World) -> None:
    rid = await world.known()
    await world.completed(rid)
    assert (await world.emails(rid))["completed"]["status"] == "pending"

    await world.deliver_all()
    await world.deliver_all()

    [mail] = world.sent_to(rid)
    assert mid(mail) == message_id_for(rid, "completed") and mail["To"] == "jane@example.com"
    row = (await world.emails(rid))["completed"]
    assert (row["status"], row["attempts"]) == ("sent", 1) and row["attempted_at"] and row["sent_at"]
    assert [e["kind"] for e in await world.emitted("EmailSent")] == ["completed"]


async def test_redelivered_outcome_owes_nothing_new(world: World) -> None:
    rid = await world.known()
    await world.completed(rid)
    # The same outcome again under a new event id (a producer retry): the Message-ID already exists.
    await world.send(RefundIssued(request_id=uuid.UUID(rid), subscription_id="sub-1", amount=Decimal("10.00"),
                                  currency="USD", status="succeeded"))
    assert list(await world.emails(rid)) == ["completed"]
    await world.deliver_all()
    assert len(world.sent_to(rid)) == 1


async def test_platform_failure_alerts_support_with_the_timeline(world: World) -> None:
    rid = await world.known()
    await world.platform_failed(rid)
    await world.deliver_all()
    mails = {m["X-Cancelflow-Kind"]: m for m in world.sent_to(rid)}
    assert set(mails) == {"failed_platform", "support_platform_failure"}
    assert mails["support_platform_failure"]["To"] == SUPPORT
    alert = text(mails["support_platform_failure"])
    # the error the commit met (the status says only the seed's text), and when access was to end
    for fact in (rid, "acc-1", "sub-1", "V-sub-1", "jane@example.com", "Timeline", "requested by",
                 "vendor acme asked to cancel V-sub-1", "encountered an error on our Platform",
                 "IntegrityError('subscriptions.quantity')", f"Access end date: {TODAY}"):
        assert fact in alert, fact


async def test_the_timeline_says_what_the_status_history_says(world: World) -> None:
    """Support's timeline and the tracker's status history have the same lines (cancelflow.timeline)."""
    told: list[Payload] = []
    send = world.send

    async def recording(payload: Payload) -> bool:
        told.append(payload)
        return await send(payload)

    world.send = recording  # type: ignore[method-assign]
    rid = await world.known()
    await world.platform_failed(rid)
    async with world.engine.connect() as conn:
        facts = (await conn.execute(select(orm.requests.c.facts).where(orm.requests.c.request_id == rid))).scalar_one()
    view = empty_view(rid)
    for payload in told:
        view = apply(view, payload, datetime.now(UTC)) or view
    history = [h["message"] for h in view["history"]]
    assert len(history) == 3 and [h["message"] for h in facts["history"]] == history


# --- killed between the SMTP send and the mark --------------------------------------------------------


async def test_kill_after_send_resends_the_same_message_and_emits_email_sent_once(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    rid = await world.known()
    await world.completed(rid)

    def crash(name: str) -> None:
        if name == "notification.after_smtp_send":
            raise Killed
    monkeypatch.setattr(sender_module, "crash_point", crash)
    with pytest.raises(Killed):
        await world.deliver_all()
    row = (await world.emails(rid))["completed"]
    assert row["status"] == "sending" and row["attempted_at"] is not None  # the intent was on record
    assert await world.emitted("EmailSent") == []

    monkeypatch.setattr(sender_module, "crash_point", lambda name: None)
    restarted = world.new_sender()
    assert await restarted.recover() == 1
    await restarted.deliver_due()

    copies = world.sent_to(rid)
    assert len(copies) == 2 and {mid(m) for m in copies} == {message_id_for(rid, "completed")}
    assert copies[0].as_bytes() == copies[1].as_bytes()  # byte for byte the same message
    assert (await world.emails(rid))["completed"]["status"] == "sent"
    assert len(await world.emitted("EmailSent")) == 1


class WatchfulMailer(FakeMailer):
    """Counts, each time the server accepts a message, the accepted messages not yet recorded as sent:
    what a kill at that instant would send again."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.unrecorded: list[int] = []

    async def send(self, msg: Any) -> None:
        await asyncio.sleep(0)  # the other connections move on meanwhile
        await super().send(msg)
        accepted = {mid(m) for m in self.sent}
        rows = (await self.world.emails_by_message_id()).values()
        self.unrecorded.append(sum(1 for r in rows if r["message_id"] in accepted and r["status"] != "sent"))


@pytest.mark.parametrize("connections", [1, 4])
async def test_each_message_is_recorded_before_its_connection_carries_another(world: World, connections: int) -> None:
    """A kill resends at most the messages in flight, one per SMTP connection, never a whole round."""
    rids = [await world.known(subscription=f"sub-{n}") for n in range(12)]
    for n, rid in enumerate(rids):
        await world.completed(rid, subscription=f"sub-{n}")
    world.mailer = WatchfulMailer(world)
    sender = world.new_sender(in_flight=connections)
    assert await sender.deliver_due()  # one round of all twelve
    assert len(world.mailer.sent) == 12 and len(await world.emitted("EmailSent")) == 12
    assert max(world.mailer.unrecorded) <= connections, world.mailer.unrecorded
    assert max(world.mailer.unrecorded) == connections or connections == 1  # they did go out concurrently


async def test_a_claim_is_not_taken_twice(world: World) -> None:
    """Two senders (an overlap during a redeploy) never both send a pending email."""
    rid = await world.known()
    await world.completed(rid)
    other = world.new_sender()
    assert [r["request_id"] for r in await world.sender._claim_due(10)] == [rid]
    assert await other._claim_due(10) == []
    assert await other.deliver_due() is False
    assert world.mailer.sent == []


async def test_a_stale_claim_of_a_live_process_is_retried(world: World) -> None:
    rid = await world.known()
    await world.completed(rid)
    async with world.engine.begin() as conn:
        await conn.execute(update(orm.emails).values(status="sending",
                                                     attempted_at=datetime.now(UTC) - timedelta(minutes=10)))
    assert await world.sender.recover(older_than_s=60) == 1
    await world.deliver_all()
    assert len(world.sent_to(rid)) == 1


# --- SMTP outages -------------------------------------------------------------------------------------


async def test_outage_keeps_emails_pending_then_delivers_each_once(world: World) -> None:
    rids = [await world.known(subscription=f"sub-{i}") for i in range(3)]
    for rid, i in zip(rids, range(3), strict=True):
        await world.completed(rid, subscription=f"sub-{i}")
    world.mailer.fail_next(MailDeliveryError("connection refused", retryable=True), times=5)

    assert await world.sender.deliver_due() is False  # the round's three sends, together
    assert world.mailer.attempts == 3 and world.sender._outage_failures == 1  # one outage, not three
    for _ in range(2):
        assert await world.sender.deliver_due() is False  # during the outage: one probe per round
    assert world.mailer.attempts == 5 and world.mailer.sent == []
    assert world.sender._outage_failures == 3
    rows = [(await world.emails(rid))["completed"] for rid in rids]
    assert [r["status"] for r in rows] == ["pending"] * 3
    assert rows[0]["attempts"] == 3 and "connection refused" in rows[0]["last_error"]

    assert await world.sender.deliver_due() is True  # the probe gets through: the outage is over
    assert world.sender._outage_failures == 0
    await world.deliver_all()
    assert sorted(m["X-Cancelflow-Request-Id"] for m in world.mailer.sent) == sorted(rids)
    assert len(await world.emitted("EmailSent")) == 3


def test_backoff_doubles_up_to_the_setting() -> None:
    sender = EmailSender(FakeMailer(), lambda: None, max_backoff_s=60)  # type: ignore[arg-type,return-value]
    assert [sender.backoff(n) for n in (1, 2, 3, 4, 7, 8, 100)] == [1, 2, 4, 8, 60, 60, 60]
    assert EmailSender(FakeMailer(), lambda: None, max_backoff_s=1.5).backoff(5) == 1.5  # type: ignore[arg-type,return-value]


async def test_a_4xx_for_one_message_does_not_hold_back_the_others(world: World) -> None:
    first, second = await world.known(subscription="sub-a"), await world.known(subscription="sub-b")
    await world.completed(first, subscription="sub-a")
    await world.completed(second, subscription="sub-b")
    world.mailer.fail_next(MailDeliveryError("452 mailbox full", retryable=True, smtp_code=452))
    assert await world.sender.deliver_due() is True
    assert [m["X-Cancelflow-Request-Id"] for m in world.mailer.sent] == [second]
    row = (await world.emails(first))["completed"]
    assert row["status"] == "pending" and row["next_attempt_at"].replace(tzinfo=UTC) > datetime.now(UTC)
    assert world.sender._outage_failures == 0


async def test_a_permanent_refusal_is_failed_and_reported(world: World) -> None:
    rid = await world.known()
    await world.completed(rid)
    world.mailer.fail_next(MailDeliveryError("554 rejected", retryable=False, smtp_code=554))
    await world.deliver_all()
    await world.deliver_all()
    assert world.mailer.attempts == 1
    assert (await world.emails(rid))["completed"]["status"] == "failed"
    [failed] = await world.emitted("Failed")
    assert (failed["source"], failed["code"]) == ("notification", "email_rejected")
    assert failed["details"]["message_id"] == message_id_for(rid, "completed")


# --- the customer's contact arrives after the outcome -------------------------------------------------


async def test_outcome_before_contact_waits_and_is_sent_when_the_contact_arrives(world: World) -> None:
    rid = await world.known(contact=False)
    await world.platform_failed(rid)
    rows = await world.emails(rid)
    assert rows["failed_platform"]["status"] == "awaiting_contact" and rows["failed_platform"]["raw"] is None
    assert rows["failed_platform"]["context"]["request_id"] == rid
    assert rows["support_platform_failure"]["status"] == "pending"  # support does not wait
    await world.deliver_all()
    assert [m["X-Cancelflow-Kind"] for m in world.sent_to(rid)] == ["support_platform_failure"]

    await world.send(activated())
    rows = await world.emails(rid)
    assert rows["failed_platform"]["status"] == "pending" and rows["failed_platform"]["context"] is None
    await world.deliver_all()
    mail = next(m for m in world.sent_to(rid) if m["X-Cancelflow-Kind"] == "failed_platform")
    assert mail["To"] == "jane@example.com" and mid(mail) == message_id_for(rid, "failed_platform")
    assert "Hello Jane," in mail.get_body(("plain",)).get_content() and "Acme CRM" in text(mail)
    # A later activation (facts replaced) sends nothing again.
    await world.send(activated())
    await world.deliver_all()
    assert len(world.sent_to(rid)) == 2


async def test_the_sender_is_woken_only_by_a_commit_that_made_an_email_due(world: World) -> None:
    """Most records owe no email: their commits must not start a delivery round (measured: one claim
    transaction per poll); every commit that made an email due must."""
    rid = await world.known(contact=False)
    assert not world.woke_sender()
    await world.completed(rid)  # the customer's email waits for the contact: nothing due yet
    assert (await world.emails(rid))["completed"]["status"] == "awaiting_contact"
    assert not world.woke_sender()
    await world.send(activated())  # the contact arrives: the kept email is due now
    assert world.woke_sender()
    await world.platform_failed(await world.known(subscription="sub-2"))  # support's alert is due at once
    assert world.woke_sender()
    await world.deliver_all()
    await world.send(activated())  # nothing new owed
    assert not world.woke_sender()


async def test_emails_not_sent_yet_are_counted_by_status_for_operators(world: World) -> None:
    """An email waiting for a contact that never comes would otherwise be silent (alert
    CancelflowEmailsAwaitingContact): the sender counts what it owes into a gauge."""
    rid = await world.known(contact=False)
    await world.platform_failed(rid)  # the customer's email waits for the contact; support's is due
    assert await world.sender.count_waiting() == {"pending": 1, "sending": 0, "awaiting_contact": 1}
    assert REGISTRY.get_sample_value("cancelflow_emails_waiting", {"status": "awaiting_contact"}) == 1
    await world.deliver_all()
    assert await world.sender.count_waiting() == {"pending": 0, "sending": 0, "awaiting_contact": 1}
    await world.send(activated())
    assert await world.sender.count_waiting() == {"pending": 1, "sending": 0, "awaiting_contact": 0}
    assert REGISTRY.get_sample_value("cancelflow_emails_waiting", {"status": "awaiting_contact"}) == 0


async def test_another_accounts_contact_never_releases_the_email(world: World) -> None:
    rid = await world.known(contact=False)
    await world.completed(rid)
    await world.send(activated(account="acc-2", subscription="sub-1", email="mallory@example.com"))
    assert (await world.emails(rid))["completed"]["status"] == "awaiting_contact"


# --- opt_out_of_emails --------------------------------------------------------------------------------


async def test_opt_out_sends_this_outcome_and_nothing_after_it_but_support_alerts(world: World) -> None:
    first = await world.known(opt_out=True)
    await world.send(stuck(first))  # before its outcome: its own emails all still go
    await world.completed(first)
    later = await world.known(subscription="sub-2")
    await world.platform_failed(later)
    await world.deliver_all()

    assert sorted(m["X-Cancelflow-Kind"] for m in world.sent_to(first)) == [
        "completed", "manual_review", "support_stuck"]
    assert [m["X-Cancelflow-Kind"] for m in world.sent_to(later)] == ["support_platform_failure"]
    assert (await world.emails(later))["failed_platform"]["status"] == "suppressed"


async def test_opt_out_of_a_request_without_outcome_email_yet_changes_nothing_before_it(world: World) -> None:
    earlier = await world.known()
    opting = await world.known(subscription="sub-2", opt_out=True)
    await world.completed(earlier)  # the earlier request's outcome came first: sent
    await world.completed(opting, subscription="sub-2")
    await world.deliver_all()
    assert len(world.sent_to(earlier)) == 1 and len(world.sent_to(opting)) == 1


# --- stuck requests -----------------------------------------------------------------------------------


async def test_stuck_request_alerts_support_and_tells_the_customer_once(world: World) -> None:
    rid = await world.known()
    assert await world.send(stuck(rid))
    assert await world.send(stuck(rid, seconds=5400))  # said again later: nothing new
    await world.deliver_all()
    mails = {m["X-Cancelflow-Kind"]: m for m in world.sent_to(rid)}
    assert set(mails) == {"manual_review", "support_stuck"} and len(world.sent_to(rid)) == 2
    alert = text(mails["support_stuck"])
    for fact in (rid, "acc-1", "sub-1", "Jane", "jane@example.com", "V-sub-1", "vendor", "45 minutes",
                 "2026-11-21 10:00:00 UTC", "Timeline", "requested by", "asked to cancel V-sub-1"):
        assert fact in alert, fact
    assert "taking longer than it should" in text(mails["manual_review"])
    assert mails["manual_review"]["To"] == "jane@example.com"


async def test_stuck_request_notification_never_saw_still_alerts_support(world: World) -> None:
    rid = str(uuid.uuid4())
    await world.send(stuck(rid, stage="validation", seconds=90))
    await world.deliver_all()
    [alert] = world.sent_to(rid)
    assert alert["X-Cancelflow-Kind"] == "support_stuck" and alert["To"] == SUPPORT
    assert "validation" in text(alert) and "1 minute" in text(alert)
