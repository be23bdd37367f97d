"""The refund per charge (CONTRACT.md section 5) through the handlers and a real store (SQLite and
PostgreSQL): licenses removed in steps, an upstream refresh in between, records naming one gateway
charge twice, a charge in another currency."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import orm as billing_orm
from cancelflow.db import create_schema, make_engine, session_factory
from cancelflow.events import ChargeCaptured, PlatformCommitted, SubscriptionSnapshot
from cancelflow.sql import Db
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.testing.messages import handle, message
from payment_gateway import orm
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.ledger import Ledger
from tests.unit.test_handlers import Billing, activated, outbox, provisioned, requested, types

PERIOD_START = date(2026, 11, 1)
PERIOD_END = date(2026, 12, 1)  # 30 days
A_THIRD_USED = PERIOD_START + timedelta(days=10)


@pytest.fixture
async def engine(store: Any) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(store("payment_gateway"))
    await create_schema(engine, orm.metadata)
    yield engine
    await engine.dispose()


class Payments:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.gateway = FakeGatewayClient()
        self.handlers = PaymentHandlers(self.gateway)

    async def charge(self, amount: str, *, charge_id: str = "c1", gateway_charge_id: str | None = None,
                     currency: str = "USD", quantity: int | None = None, capture: bool = True) -> None:
        captured_at = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
        gateway_charge_id = gateway_charge_id or f"gw-{charge_id}"
        if capture:
            await self.gateway.capture(amount=Decimal(amount), currency=currency, account_id="acc-1",
                                       subscription_id="sub-1", captured_at=captured_at,
                                       gateway_charge_id=gateway_charge_id)
        event = ChargeCaptured(charge_id=charge_id, account_id="acc-1", subscription_id="sub-1", amount=amount,
                               currency=currency, captured_at=captured_at, gateway_charge_id=gateway_charge_id,
                               period_start=PERIOD_START, period_end=PERIOD_END, quantity=quantity)
        await handle(self.engine, orm, self.handlers.charge_captured, message(event))

    async def commit(self, event: PlatformCommitted) -> list[dict[str, Any]]:
        before = len(await outbox(self.engine, orm))
        await handle(self.engine, orm, self.handlers.platform_committed, message(event))
        return (await outbox(self.engine, orm))[before:]

    async def remove(self, quantity_before: int, removed: int, *, effective: date = A_THIRD_USED,
                     **overrides: Any) -> list[dict[str, Any]]:
        return await self.commit(committed(quantity_before=quantity_before,
                                           quantity_after=quantity_before - removed,
                                           effective_date=effective, **overrides))

    def refunded(self) -> Decimal:
        """What the gateway refunded, all keys together."""
        return sum((Decimal(e["amount"]) for e in self.gateway.effects if e["type"] in ("refund", "reversal")),
                   Decimal("0.00"))


def committed(**overrides: Any) -> PlatformCommitted:
    values: dict[str, Any] = dict(
        request_id=uuid.uuid4(), account_id="acc-1", subscription_id="sub-1", mode="past_dated",
        full=overrides.get("quantity_after", 0) == 0, trial=False, effective_date=A_THIRD_USED,
        access_end_date=A_THIRD_USED, period_start=PERIOD_START, period_end=PERIOD_END, quantity_before=1,
        quantity_after=0, currency="USD", refund_due=True, history="",
        snapshot=SubscriptionSnapshot(subscription_status="canceled", provisioning_status="Synchronized"))
    values.update(overrides)
    return PlatformCommitted.model_validate(values)


@pytest.fixture
async def payments(engine: AsyncEngine) -> Payments:
    return Payments(engine)


# --- 1. licenses removed in steps ---------------------------------------------------------------------


STEPS = {
    # (captured, licenses, licenses removed by each partial request before the full one) -> fair total
    "nine of ten one by one, then the rest": ("300.00", 10, [1] * 9, "200.00"),  # was 276.14
    "two of five, then the rest": ("150.00", 5, [2], "100.00"),  # was 113.33
    "one at a time out of a hundred": ("3000.00", 100, [1] * 99, "2000.00"),  # was 2,948.08
}


# Where licenses_paid comes from: the charge, billing's quantity when the period began, or the first
# request's quantity (no one said). The hundred steps run once: they are slow on PostgreSQL.
SOURCES = [(case, source) for case in STEPS for source in ("charge", "billing", "first request")
           if case != "one at a time out of a hundred" or source == "billing"]


@pytest.mark.parametrize(("case", "licenses_paid_from"), SOURCES, ids=[f"{c}-{s}" for c, s in SOURCES])
async def test_licenses_removed_in_steps_refund_what_one_request_would(payments: Payments, case: str,
                                                                       licenses_paid_from: str) -> None:
    captured, licenses, partials, fair = STEPS[case]
    await payments.charge(captured, quantity=licenses if licenses_paid_from == "charge" else None)
    extra = {"period_quantity": licenses} if licenses_paid_from == "billing" else {}
    left = licenses
    for removed in partials:
        await payments.remove(left, removed, **extra)
        left -= removed
    emitted = await payments.remove(left, left, **extra)
    assert types(emitted) == ["RefundIssued"]
    assert payments.refunded() == Decimal(fair)


async def test_a_refund_records_what_it_is_based_on(payments: Payments, engine: AsyncEngine) -> None:
    await payments.charge("300.00")
    await payments.remove(10, 2, period_quantity=10)
    async with engine.connect() as conn:
        refund = (await conn.execute(select(orm.refunds))).mappings().one()
    assert (refund["licenses"], refund["licenses_paid"], refund["effective_date"]) == (2, 10, A_THIRD_USED)
    assert Decimal(str(refund["amount"])) == Decimal("40.00")


# --- 2. an upstream refresh after a partial cancellation ----------------------------------------------


async def test_licenses_refunded_never_exceed_licenses_paid_whatever_upstream_says(payments: Payments) -> None:
    await payments.charge("150.00")
    await payments.remove(5, 2, period_quantity=5)
    await payments.remove(5, 4, period_quantity=5)  # upstream brought the 2 back: 3 are still paid for
    await payments.remove(1, 1, period_quantity=5)
    assert payments.refunded() == Decimal("100.00")  # was 132.89


async def test_billing_keeps_the_quantity_its_cancellations_set(store: Any, payments: Payments) -> None:
    """Remove 2 of 5, an upstream refresh with quantity 5, remove 4, cancel the rest: 100.00 of 150.00."""
    billing_engine = make_engine(store("billing"))
    await create_schema(billing_engine, billing_orm.metadata)
    billing = Billing(billing_engine)
    try:
        await payments.charge("150.00")
        await billing.send(activated(unit_price="30.00", quantity=5))

        async def cancel(**request: Any) -> list[dict[str, Any]]:
            asked = requested(mode="past_dated", effective_date=A_THIRD_USED, **request)
            emitted = await billing.send(asked)
            if types(emitted) != ["CancellationReceived", "VendorCancellationRequested"]:
                return emitted
            new_quantity = emitted[1]["payload"]["new_quantity"]
            [platform] = await billing.send(provisioned(asked.request_id, new_quantity=new_quantity))
            return await payments.commit(PlatformCommitted.model_validate(platform["payload"]))

        assert types(await cancel(quantity=2)) == ["RefundIssued"]
        await billing.send(activated(unit_price="30.00", quantity=5))
        assert (await billing.subscription())["quantity"] == 3
        refused = await cancel(quantity=4)
        assert types(refused) == ["CancellationReceived", "Failed"]
        assert refused[1]["payload"]["code"] == "invalid_quantity"
        assert types(await cancel()) == ["RefundIssued"]
        assert payments.refunded() == Decimal("100.00")  # was 132.89
    finally:
        await billing_engine.dispose()


async def test_a_new_period_takes_upstream_quantity_again(store: Any) -> None:
    engine = make_engine(store("billing"))
    await create_schema(engine, billing_orm.metadata)
    billing = Billing(engine)
    try:
        await billing.send(activated(quantity=5))
        asked = requested(quantity=2)
        await billing.send(asked)
        await billing.send(provisioned(asked.request_id, new_quantity=3))
        await billing.send(activated(quantity=2))  # upstream may lower it
        assert (await billing.subscription())["quantity"] == 2
        await billing.send(activated(quantity=7, current_period_start=PERIOD_END,
                                     current_period_end=PERIOD_END + timedelta(days=31)))
        sub = await billing.subscription()
        assert (sub["quantity"], sub["period_quantity"]) == (7, 7)
    finally:
        await engine.dispose()


# --- 3. one refundable balance per gateway charge -----------------------------------------------------


async def test_two_records_of_one_gateway_charge_never_plan_more_than_it_has(payments: Payments,
                                                                               engine: AsyncEngine) -> None:
    await payments.charge("30.00", charge_id="c1", gateway_charge_id="gw-1")
    await payments.charge("30.00", charge_id="c2", gateway_charge_id="gw-1", capture=False)
    emitted = await payments.commit(committed())
    assert types(emitted) == ["RefundIssued"]
    issued = emitted[0]["payload"]
    assert issued["amount"] == "20.00"  # was 40.00 planned, 20.00 of it refused by the gateway
    assert [(line["charge_id"], line["outcome"]) for line in issued["lines"]] == [("c1", "succeeded")]
    async with engine.connect() as conn:
        planned = (await conn.execute(select(orm.refunds.c.amount))).scalars().all()
    assert sum(Decimal(str(a)) for a in planned) == Decimal("20.00")


async def test_the_guard_is_one_balance_per_gateway_charge(payments: Payments, engine: AsyncEngine) -> None:
    await payments.charge("30.00", charge_id="c1", gateway_charge_id="gw-1")
    await payments.charge("30.00", charge_id="c2", gateway_charge_id="gw-1", capture=False)
    async with session_factory(engine)() as session, session.begin():
        ledger = Ledger(Db(session))
        assert await ledger.reserve("c1", Decimal("25.00")) is True
        assert await ledger.reserve("c2", Decimal("5.01")) is False  # was True: 30.00 more through c2
        assert await ledger.reserve("c2", Decimal("5.00")) is True
        assert await ledger.refundable("c1") == await ledger.refundable("c2") == Decimal("0.00")


async def test_a_cancellation_refunds_no_more_than_the_gateway_charge_has_left(payments: Payments,
                                                                              engine: AsyncEngine) -> None:
    """A charge partly refunded already (a dispute's refund, say): the cancellation's fair share (20.00)
    is cut to what is left (5.00), and the request goes on instead of replanning for ever."""
    await payments.charge("30.00")
    async with session_factory(engine)() as session, session.begin():
        assert await Ledger(Db(session)).reserve("c1", Decimal("25.00")) is True
    emitted = await payments.commit(committed())
    assert types(emitted) == ["RefundIssued"]
    assert emitted[0]["payload"]["amount"] == "5.00"
    assert payments.refunded() == Decimal("5.00")


# --- 4. a charge in another currency ------------------------------------------------------------------


async def test_a_charge_in_another_currency_is_manual_review_not_no_refund_due(payments: Payments) -> None:
    await payments.charge("30.00", currency="EUR")
    emitted = await payments.commit(committed())
    assert types(emitted) == ["Failed"]  # was RefundIssued, "not_due"
    failed = emitted[0]["payload"]
    assert (failed["source"], failed["code"], failed["retryable"]) == ("payment", "currency_mismatch", False)
    assert "c1" in failed["message"] and "EUR" in failed["message"] and "USD" in failed["message"]
    assert failed["details"]["not_refunded"] == [
        {"charge_id": "c1", "gateway_charge_id": "gw-c1", "amount": "30.00", "currency": "EUR"}]
    assert payments.refunded() == Decimal("0.00")
    # A redelivery says the same, and refunds nothing.
    assert types(await payments.commit(committed(request_id=failed["request_id"]))) == ["Failed"]


async def test_the_charges_in_the_subscriptions_currency_are_refunded_the_other_reviewed(payments: Payments) -> None:
    await payments.charge("30.00", charge_id="c1")
    await payments.charge("30.00", charge_id="c2", currency="EUR")
    emitted = await payments.commit(committed())
    assert types(emitted) == ["Failed"]
    failed = emitted[0]["payload"]
    assert failed["code"] == "currency_mismatch"
    assert [(line["charge_id"], line["amount"], line["outcome"]) for line in failed["details"]["refunds"]] == [
        ("c1", "20.00", "succeeded")]
    assert payments.refunded() == Decimal("20.00")
