"""The multiple-charge flow at handler level: the dispute service and payment-gateway's dispute handlers
on real units of work (SQLite and PostgreSQL), a fake gateway running the sandbox's rules, and the status fold.

Saga events are passed between the two services as the broker would, so every step can be checked:
the audit trail, the refund guard shared with cancellation refunds, and redeliveries.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import ModuleType
from typing import Any

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import create_schema, make_engine
from cancelflow.events import (
    REGISTRY,
    CancellationReceived,
    ChargeCaptured,
    Mode,
    Payload,
    PlatformCommitted,
    SubscriptionSnapshot,
)
from cancelflow.messaging.codec import Message
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.testing.messages import handle, message
from dispute import orm as dispute_orm
from dispute.bootstrap import routes as dispute_routes
from dispute.handlers import DisputeHandlers
from payment_gateway import orm as payment_orm
from payment_gateway.bootstrap import routes as payment_routes
from payment_gateway.disputes import DisputeRefundHandlers
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.retries import RefundRetryHandlers
from status_tracker import fold

NOW = datetime.now(UTC).replace(microsecond=0)
PERIOD_START = NOW.date() - timedelta(days=10)
PERIOD_END = PERIOD_START + timedelta(days=30)



async def new_engine(url: str, orm: ModuleType) -> AsyncEngine:
    engine = make_engine(url)
    await create_schema(engine, orm.metadata)
    return engine


class World:
    """The dispute and payment-gateway services with their databases, and the saga between them."""

    def __init__(self, dispute_engine: AsyncEngine, payment_engine: AsyncEngine, window_hours: int = 72) -> None:
        self.engines = {"dispute": dispute_engine, "payment": payment_engine}
        self.gateway = FakeGatewayClient()
        self.dispute = DisputeHandlers(window_hours=window_hours)
        self.payments = PaymentHandlers(self.gateway)
        self.routes = {"dispute": dispute_routes(self.dispute),
                       "payment": payment_routes(self.payments, DisputeRefundHandlers(self.gateway),
                                                 RefundRetryHandlers(self.gateway))}
        self.orms = {"dispute": dispute_orm, "payment": payment_orm}
        self.seen = {"dispute": 0, "payment": 0}
        self.saga: list[Payload] = []  # every saga event emitted, in order

    async def capture(self, charge_id: str, hours_ago: float, amount: str = "30.00", *, account: str = "acc-1",
                      subscription: str = "sub-1") -> ChargeCaptured:
        captured_at = NOW - timedelta(hours=hours_ago)
        await self.gateway.capture(amount=Decimal(amount), currency="USD", account_id=account,
                                   subscription_id=subscription, captured_at=captured_at,
                                   gateway_charge_id=f"gw-{charge_id}")
        event = ChargeCaptured(charge_id=charge_id, account_id=account, subscription_id=subscription, amount=amount,
                               currency="USD", captured_at=captured_at, gateway_charge_id=f"gw-{charge_id}",
                               period_start=PERIOD_START, period_end=PERIOD_END)
        await handle(self.engines["dispute"], dispute_orm, self.routes["dispute"], message(event))
        await handle(self.engines["payment"], payment_orm, self.routes["payment"], message(event))
        return event

    async def deliver(self, payload: Payload, msg: Message | None = None, *, follow: bool = True) -> list[Payload]:
        """Hand `payload` to the services that read it; with `follow`, what they emit too, until quiet.
        Returns every saga event emitted meanwhile."""
        start = len(self.saga)
        queue = [(payload, msg or message(payload))]
        while queue:
            event, record = queue.pop(0)
            for service, routes in self.routes.items():
                if not any(route.topic == record.topic and route.handles(record.event_type) for route in routes):
                    continue
                await handle(self.engines[service], self.orms[service], routes, record)
                for emitted in await self._new_outbox(service):
                    self.saga.append(emitted)
                    if follow:
                        queue.append((emitted, message(emitted)))
        return self.saga[start:]

    async def _new_outbox(self, service: str) -> list[Payload]:
        table = self.orms[service].messaging.outbox
        async with self.engines[service].connect() as conn:
            rows = (await conn.execute(select(table).order_by(table.c.id))).mappings().all()
        new = rows[self.seen[service]:]
        self.seen[service] = len(rows)
        found = []
        for row in new:
            envelope = orjson.loads(row["value"])
            cls = REGISTRY[(envelope["event_type"], envelope["schema_version"])]
            found.append(cls.model_validate(envelope["payload"]))
        return found

    def view(self, request: CancellationReceived) -> dict[str, Any]:
        """The status record the tracker would publish after the request and every saga event of it."""
        request_id = request.request_id
        view = fold.empty_view(str(request_id))
        at = NOW
        for event in [request, *self.saga]:
            if getattr(event, "request_id", None) == request_id:
                at += timedelta(seconds=1)
                view = fold.apply(view, event, at) or view
        return view

    async def audit(self, request_id: uuid.UUID) -> list[tuple[str, str | None]]:
        table = dispute_orm.audit
        async with self.engines["dispute"].connect() as conn:
            rows = (await conn.execute(select(table).where(table.c.request_id == str(request_id))
                                       .order_by(table.c.id))).mappings().all()
        return [(r["step"], r["charge_id"]) for r in rows]

    async def lines(self, request_id: uuid.UUID) -> dict[str, dict[str, Any]]:
        table = dispute_orm.dispute_charges
        async with self.engines["dispute"].connect() as conn:
            rows = (await conn.execute(select(table).where(table.c.request_id == str(request_id)))).mappings().all()
        return {r["charge_id"]: dict(r) for r in rows}

    async def refunded_amount(self, charge_id: str) -> Decimal:
        table = payment_orm.charges
        async with self.engines["payment"].connect() as conn:
            value = (await conn.execute(select(table.c.refunded_amount).where(table.c.charge_id == charge_id))).scalar()
        return Decimal(str(value)).quantize(Decimal("0.01"))

    def refund_effects(self, gateway_charge_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.gateway.effects if e["type"] in ("refund", "reversal")
                and (gateway_charge_id is None or e["gateway_charge_id"] == gateway_charge_id)]


@pytest.fixture
async def world(store: Any) -> AsyncIterator[World]:
    dispute_engine = await new_engine(store("dispute"), dispute_orm)
    payment_engine = await new_engine(store("payment"), payment_orm)
    yield World(dispute_engine, payment_engine)
    await dispute_engine.dispose()
    await payment_engine.dispose()


def dispute_of(*charge_ids: str, account: str = "acc-1") -> CancellationReceived:
    return CancellationReceived(request_id=uuid.uuid4(), account_id=account, target="charges",
                                charge_ids=list(charge_ids), mode="immediate",
                                requested_by={"user_id": "u-1", "role": "customer", "channel": "storefront"})


def committed(request_id: uuid.UUID | None = None) -> PlatformCommitted:
    today = NOW.date()
    return PlatformCommitted(
        request_id=request_id or uuid.uuid4(), account_id="acc-1", subscription_id="sub-1", mode=Mode.immediate,
        full=True, trial=False, effective_date=today, access_end_date=today, period_start=PERIOD_START,
        period_end=PERIOD_END, quantity_before=1, quantity_after=0, currency="USD", refund_due=True,
        history=f"Status is set to canceled with effective date {today}",
        snapshot=SubscriptionSnapshot(subscription_status="canceled", provisioning_status="Synchronized"))


def kinds(events: list[Payload]) -> list[str]:
    return [e.event_type for e in events]


async def test_duplicate_is_verified_refunded_once_and_audited(world: World) -> None:
    await world.capture("a", 3)
    await world.capture("b", 2)
    request = dispute_of("b")

    emitted = await world.deliver(request)

    assert kinds(emitted) == [
        "DisputeStepRecorded", "DisputeStepRecorded", "ChargesVerificationRequested", "ChargesVerified",
        "DisputeStepRecorded", "DisputeStepRecorded", "DuplicateRefundRequested", "DuplicateRefundsIssued",
        "DisputeStepRecorded", "RefundIssued"]
    issued = emitted[-1]
    key = f"cf-dispute-{request.request_id}-b"
    assert (issued.amount, issued.currency, issued.status) == (Decimal("30.00"), "USD", "succeeded")
    assert [(line.charge_id, line.idempotency_key, line.kind) for line in issued.lines] == [("b", key, "reversal")]
    assert [(e["idempotency_key"], e["amount"]) for e in world.refund_effects()] == [(key, "30.00")]
    assert await world.refunded_amount("b") == Decimal("30.00")
    assert await world.refunded_amount("a") == Decimal("0.00")
    assert await world.audit(request.request_id) == [
        ("received", None), ("validated", None), ("detected", "b"), ("gateway_verified", "b"),
        ("refund_requested", "b"), ("refund_issued", "b"), ("completed", None)]

    view = world.view(request)
    assert view["state"] == "completed"
    assert view["refund"] == {"amount": "30.00", "currency": "USD", "status": "succeeded"}
    history = [h["message"] for h in view["history"]]
    assert any("duplicate of a" in m for m in history)
    assert any(m.startswith("Gateway confirmed charge b") for m in history)
    assert any(key in m for m in history)


async def test_mixed_request_refunds_the_duplicate_and_sends_the_first_to_review(world: World) -> None:
    await world.capture("a", 3)
    await world.capture("b", 2)
    request = dispute_of("a", "b")

    emitted = await world.deliver(request)

    failed = emitted[-1]
    assert failed.event_type == "Failed"
    assert (failed.source.value, failed.code) == ("payment", "manual_review")
    assert [r["charge_id"] for r in failed.details["refunded"]] == ["b"]
    assert [(r["charge_id"], r["reason"]) for r in failed.details["review"]] == [("a", "earliest_of_group")]
    assert {t["charge_id"]: t["outcome"] for t in failed.details["transactions"]} == {
        "a": "manual_review", "b": "refunded"}
    assert len(world.refund_effects()) == 1 and world.refund_effects()[0]["gateway_charge_id"] == "gw-b"
    assert ("escalated", None) in await world.audit(request.request_id)
    view = world.view(request)
    assert view["state"] == "manual_review" and view["error"]["code"] == "manual_review"
    # What was refunded stays visible next to the review.
    assert view["refund"] == {"amount": "30.00", "currency": "USD", "status": "succeeded"}


async def test_nothing_provable_goes_to_review_without_asking_the_gateway(world: World) -> None:
    await world.capture("a", 100)
    await world.capture("b", 1)
    request = dispute_of("b")

    emitted = await world.deliver(request)

    assert "ChargesVerificationRequested" not in kinds(emitted)
    assert emitted[-1].event_type == "Failed" and emitted[-1].details["review"][0]["reason"] == "outside_window"
    assert world.gateway.calls == [] and world.refund_effects() == []


@pytest.mark.parametrize(("state", "reason"), [("refunded", "already_refunded"), ("disputed", "disputed")])
async def test_gateway_state_sends_a_duplicate_to_review(world: World, state: str, reason: str) -> None:
    await world.capture("a", 3)
    await world.capture("b", 2)
    world.gateway.force_state("gw-b", state)
    request = dispute_of("b")

    emitted = await world.deliver(request)

    assert "DuplicateRefundRequested" not in kinds(emitted)
    assert emitted[-1].event_type == "Failed"
    assert emitted[-1].details["review"][0]["reason"] == reason
    assert world.refund_effects() == []
    assert (await world.lines(request.request_id))["b"]["gateway_state"] == state


async def test_not_owner_is_rejected_before_any_side_effect(world: World) -> None:
    await world.capture("a", 3)
    await world.capture("x", 2, account="acc-2")
    request = dispute_of("a", "x")

    emitted = await world.deliver(request)

    assert kinds(emitted) == ["Failed"]
    assert (emitted[0].source.value, emitted[0].code) == ("validation", "not_owner")
    assert world.gateway.calls == []
    lines = await world.lines(request.request_id)
    assert lines["x"]["amount"] is None and lines["x"]["outcome"] == "rejected"  # nothing of theirs kept
    assert world.view(request)["state"] == "rejected"


async def test_unknown_charge_is_rejected(world: World) -> None:
    await world.capture("a", 3)
    emitted = await world.deliver(dispute_of("a", "nope"))
    assert [(e.event_type, getattr(e, "code", None)) for e in emitted] == [("Failed", "unknown_charge")]


async def test_cancellation_refund_between_verification_and_refund_is_caught_by_the_guard(world: World) -> None:
    """A cancellation takes the duplicate's balance after the gateway confirmed it: the dispute's refund
    is refused by our guard (the gateway never sees an amount it would have to refuse)."""
    await world.capture("a", 50)
    await world.capture("b", 49)
    request = dispute_of("b")
    emitted = await world.deliver(request, follow=False)
    verification = emitted[-1]
    assert verification.event_type == "ChargesVerificationRequested"
    (verified,) = await world.deliver(verification, follow=False)
    (asked,) = [e for e in await world.deliver(verified, follow=False) if e.event_type == "DuplicateRefundRequested"]

    cancellation = committed()
    (issued,) = await world.deliver(cancellation)
    # Two charges of 30.00 paid for the period, 20 of 30 days unused: 20.00 of each (section 5, per charge).
    assert [(line.charge_id, line.amount) for line in issued.lines] == [("a", Decimal("20.00")),
                                                                        ("b", Decimal("20.00"))]

    emitted = await world.deliver(asked)

    result = next(e for e in emitted if e.event_type == "DuplicateRefundsIssued")
    assert result.lines[0].outcome == "failed" and result.lines[0].error.startswith("insufficient_refundable_balance")
    assert emitted[-1].event_type == "Failed"
    assert emitted[-1].details["review"][0]["reason"] == "already_refunded"
    assert len(world.refund_effects("gw-b")) == 1  # the cancellation's only
    assert not [c for c in world.gateway.calls if c["call"] == "refund" and c["idempotency_key"].startswith(
        "cf-dispute-")]
    assert await world.refunded_amount("b") == Decimal("20.00")


async def test_dispute_first_leaves_the_cancellation_only_what_is_left(world: World) -> None:
    await world.capture("a", 50)
    await world.capture("b", 49)
    request = dispute_of("b")
    assert (await world.deliver(request))[-1].event_type == "RefundIssued"

    (issued,) = await world.deliver(committed())

    # Only a's 30.00 paid for the period now: 20.00, all from a.
    assert [(line.charge_id, line.amount) for line in issued.lines] == [("a", Decimal("20.00"))]
    assert await world.refunded_amount("b") == Decimal("30.00")
    assert len(world.refund_effects("gw-b")) == 1


async def test_redelivered_events_refund_once(world: World) -> None:
    await world.capture("a", 3)
    await world.capture("b", 2)
    request = dispute_of("b")
    emitted = await world.deliver(request)
    asked = next(e for e in emitted if e.event_type == "DuplicateRefundRequested")
    verify = next(e for e in emitted if e.event_type == "ChargesVerificationRequested")

    # The same request again (a new record), and the money commands again with new event ids.
    again = await world.deliver(request)
    assert again == []
    replayed = await world.deliver(asked)
    assert kinds(replayed) == ["DuplicateRefundsIssued"]  # the dispute ignores it: the case is closed
    assert replayed[0].lines[0].outcome == "succeeded"
    reverified = await world.deliver(verify)
    assert kinds(reverified) == ["ChargesVerified"]

    assert len(world.refund_effects()) == 1
    assert await world.refunded_amount("b") == Decimal("30.00")
    assert [e.event_type for e in world.saga].count("RefundIssued") == 1


async def test_window_setting_is_used(store: Any) -> None:
    dispute_engine = await new_engine(store("dispute"), dispute_orm)
    payment_engine = await new_engine(store("payment"), payment_orm)
    try:
        world = World(dispute_engine, payment_engine, window_hours=1)
        await world.capture("a", 3)
        await world.capture("b", 1)
        emitted = await world.deliver(dispute_of("b"))
        assert emitted[-1].event_type == "Failed"
        assert emitted[-1].details["review"][0]["reason"] == "outside_window"
    finally:
        await dispute_engine.dispose()
        await payment_engine.dispose()



# --- what the emails of a dispute say --------------------------------------------------------------


def test_manual_review_email_lists_what_was_refunded_and_what_is_reviewed() -> None:
    from notification.render import render

    context = {"request_id": "r-1", "account_id": "acc-1", "charge_ids": ["a", "b"], "error_source": "payment",
               "error_code": "manual_review", "reason": "a: the first of its group of identical charges",
               "charges": [
                   {"charge_id": "a", "amount": "30.00", "currency": "USD", "status": "under review",
                    "reason": "the first of its group", "captured_at": "2026-11-21T09:00:00+00:00"},
                   {"charge_id": "b", "amount": "30.00", "currency": "USD", "status": "refunded", "kind": "reversal"}],
               "transactions": [{"charge_id": "a", "gateway_charge_id": "gw-a", "outcome": "manual_review"},
                                {"charge_id": "b", "idempotency_key": "cf-dispute-r-1-b", "outcome": "refunded"}]}
    _, text, html = render("manual_review", context)
    flat = " ".join(text.split())
    assert "We have refunded 1 of the charges you reported" in flat
    assert "Refunded (reversal)" in flat and "Under review" in flat
    assert "Refunded (reversal)" in html and "Under review" in html
    _, text, _ = render("support_manual_review", context)
    flat = " ".join(text.split())
    for fact in ("gw-a", "cf-dispute-r-1-b", "the first of its group", "reversal, refunded"):
        assert fact in flat, fact
    # Without per-charge outcomes (a cancellation's review) the email is as before.
    _, text, _ = render("manual_review", {"request_id": "r-2", "reason": "card_expired"})
    assert "could not be completed automatically" in " ".join(text.split())
