"""An operator's refund retry at the payment-gateway handler (fake gateway; SQLite and PostgreSQL): the
refused line is refunded once under a new key, however many retry requests name it and however often
each is delivered; never above what the charge has left; and a retry of a request with nothing refused
ends `manual_review` with nothing refunded."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from cancelflow.db import create_schema, make_engine
from cancelflow.events import (
    ChargeCaptured,
    Mode,
    PlatformCommitted,
    RefundRetryRequested,
    SubscriptionSnapshot,
)
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.testing.messages import handle, message
from payment_gateway import orm
from payment_gateway.adapters.gateway import RefundOutcome
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.retries import RefundRetryHandlers

CAPTURED_AT = datetime(2026, 11, 1, 1, tzinfo=UTC)


class RefusingOnce(FakeGatewayClient):
    def __init__(self) -> None:
        super().__init__()
        self.refuse_next = 0

    async def refund(self, key: str, **kwargs: Any) -> RefundOutcome:
        if self.refuse_next:
            self.refuse_next -= 1
            return RefundOutcome(status="failed", idempotency_key=key, code="card_account_closed",
                                 message="refused", http_status=402)
        return await super().refund(key, **kwargs)


@pytest.fixture
async def money(store):  # type: ignore[no-untyped-def]
    engine = make_engine(store("payment_gateway"))
    await create_schema(engine, orm.metadata)
    gateway = RefusingOnce()
    await gateway.capture(amount=Decimal("30.00"), currency="USD", account_id="acc", subscription_id="sub",
                          gateway_charge_id="gw-1", captured_at=CAPTURED_AT)
    charge = ChargeCaptured(charge_id="ch-1", account_id="acc", subscription_id="sub", amount="30.00", currency="USD",
                            captured_at=CAPTURED_AT, gateway_charge_id="gw-1", period_start=date(2026, 11, 1),
                            period_end=date(2026, 12, 1))
    payments = PaymentHandlers(gateway)
    await handle(engine, orm, payments.charge_captured, message(charge))
    yield engine, gateway, payments, RefundRetryHandlers(gateway)
    await engine.dispose()


def _commit(unused_from: date) -> PlatformCommitted:
    return PlatformCommitted(
        request_id=uuid.uuid4(), account_id="acc", subscription_id="sub", mode=Mode.past_dated, full=True,
        trial=False, effective_date=unused_from, access_end_date=unused_from, period_start=date(2026, 11, 1),
        period_end=date(2026, 12, 1), quantity_before=1, quantity_after=0, currency="USD", refund_due=True,
        history="", snapshot=SubscriptionSnapshot())


def _retry(refused: uuid.UUID) -> RefundRetryRequested:
    return RefundRetryRequested(request_id=uuid.uuid4(), retry_of=refused, account_id="acc", subscription_id="sub",
                                operator="alice")


async def _rows(engine, table):  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(table))).mappings()]


def _refunded(gateway: FakeGatewayClient) -> list[tuple[str, Decimal]]:
    return [(e["idempotency_key"], Decimal(e["amount"])) for e in gateway.effects if e["type"] in ("refund", "reversal")]


async def test_a_refused_refund_is_retried_once_whatever_names_it(money) -> None:  # type: ignore[no-untyped-def]
    engine, gateway, payments, retries = money
    refused = _commit(date(2026, 11, 21))  # 10 of 30 days unused: 10.00
    gateway.refuse_next = 1
    await handle(engine, orm, payments.platform_committed, message(refused))
    assert _refunded(gateway) == []

    first, second = message(_retry(refused.request_id)), message(_retry(refused.request_id))
    for msg in (first, first, second, second):  # two retry requests (two clicks), each delivered twice
        await handle(engine, orm, retries.refund_retry_requested, msg)
    key = f"cf-refund-retry-{refused.request_id}-ch-1"
    assert _refunded(gateway) == [(key, Decimal("10.00"))]
    (charge,) = await _rows(engine, orm.charges)
    assert Decimal(charge["refunded_amount"]) == Decimal("10.00")


async def test_a_retry_refunds_no_more_than_the_charge_has_left(money) -> None:  # type: ignore[no-untyped-def]
    engine, gateway, payments, retries = money
    refused = _commit(date(2026, 11, 6))  # 25 of 30 days: 25.00, refused
    gateway.refuse_next = 1
    await handle(engine, orm, payments.platform_committed, message(refused))
    # Meanwhile support refunded 20.00 of the charge another way (through the guard).
    async with engine.begin() as conn:
        await conn.execute(orm.charges.update().values(refunded_amount=Decimal("20.00")))
    await handle(engine, orm, retries.refund_retry_requested, message(_retry(refused.request_id)))
    assert [amount for _, amount in _refunded(gateway)] == [Decimal("10.00")]


async def test_nothing_refused_nothing_refunded(money) -> None:  # type: ignore[no-untyped-def]
    engine, gateway, payments, retries = money
    done = _commit(date(2026, 11, 21))
    await handle(engine, orm, payments.platform_committed, message(done))
    before = _refunded(gateway)
    retry = _retry(done.request_id)
    await handle(engine, orm, retries.refund_retry_requested, message(retry))
    assert _refunded(gateway) == before
    outbox = await _rows(engine, orm.messaging.outbox)
    assert b"nothing_to_retry" in outbox[-1]["value"]


async def test_a_retry_gives_what_the_gateway_charge_has_left_whichever_record_took_the_rest(money) -> None:  # type: ignore[no-untyped-def]
    """Another record naming the same gateway charge took 20.00 of it since: the retry refunds the 10.00
    left (it skipped the line, measuring what its own record had left), and keeps the refused basis."""
    engine, gateway, payments, retries = money
    refused = _commit(date(2026, 11, 6))  # 25 of 30 days: 25.00, refused
    gateway.refuse_next = 1
    await handle(engine, orm, payments.platform_committed, message(refused))
    twin = ChargeCaptured(charge_id="ch-2", account_id="acc", subscription_id="sub", amount="30.00", currency="USD",
                          captured_at=CAPTURED_AT, gateway_charge_id="gw-1", period_start=date(2026, 11, 1),
                          period_end=date(2026, 12, 1))
    await handle(engine, orm, payments.charge_captured, message(twin))
    async with engine.begin() as conn:
        await conn.execute(orm.charges.update().where(orm.charges.c.charge_id == "ch-2")
                           .values(refunded_amount=Decimal("20.00")))
    await handle(engine, orm, retries.refund_retry_requested, message(_retry(refused.request_id)))
    assert [amount for _, amount in _refunded(gateway)] == [Decimal("10.00")]
    retried = [r for r in await _rows(engine, orm.refunds) if r["idempotency_key"].startswith("cf-refund-retry-")]
    assert [(r["licenses"], r["licenses_paid"]) for r in retried] == [(1, 1)]
