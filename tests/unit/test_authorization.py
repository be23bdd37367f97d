"""Authorization: a request only ever touches subscriptions and charges of its own account.

Hypothesis deals subscriptions and charges out to a few accounts at random, then lets random accounts
ask to cancel random subscriptions and dispute random sets of charges. Whatever the draw, a request
that names anything of another account is rejected `not_owner`, reveals nothing about it, and leaves
no effect: no lock, no vendor call, no gateway call, no refund. On SQLite and PostgreSQL: one database
per test, emptied before each example.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import orm as billing_orm
from billing.handlers import BillingHandlers
from cancelflow.db import create_schema, make_engine
from cancelflow.events import (
    CancellationReceived,
    CancellationRequested,
    ChargeCaptured,
    SubscriptionActivated,
)
from cancelflow_tools.testing.messages import handle, message
from dispute import orm as dispute_orm
from dispute.handlers import DisputeHandlers

TODAY = date(2026, 11, 21)
ACCOUNTS = ("acct-a", "acct-b", "acct-c")
PROFILE = settings(max_examples=30, derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])  # the database, emptied per example


class FixedClock:
    def today(self) -> date:
        return TODAY


def _subscription(subscription_id: str, owner: str) -> SubscriptionActivated:
    return SubscriptionActivated(
        subscription_id=subscription_id, account_id=owner, customer={"email": "x@example.com", "name": "X"},
        product_name="P", vendor="v", vendor_subscription_id=f"v-{subscription_id}", billing_period="monthly",
        unit_price="10.00", currency="USD", quantity=2, status="active",
        current_period_start=TODAY - timedelta(days=5), current_period_end=TODAY + timedelta(days=25),
        auto_renew=True)


@pytest.fixture
def database(store: Any) -> str:
    return store("authorization")


async def _engine(url: str, orm: Any) -> AsyncEngine:
    engine = make_engine(url)
    await create_schema(engine, orm.metadata)
    async with engine.begin() as conn:
        for table in reversed(orm.metadata.sorted_tables):
            await conn.execute(delete(table))
    return engine


async def _outbox(engine: AsyncEngine, orm: Any, request_id: str) -> list[dict[str, Any]]:
    table = orm.messaging.outbox
    async with engine.connect() as conn:
        rows = (await conn.execute(select(table.c.value).order_by(table.c.id))).scalars().all()
    events = [orjson.loads(v) for v in rows]
    return [e for e in events if e["correlation_id"] == request_id]


owners = st.lists(st.sampled_from(ACCOUNTS), min_size=1, max_size=4)


@PROFILE
@given(subscription_owners=owners,
       asks=st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.integers(0, 3)), min_size=1, max_size=6))
def test_cancellations_never_touch_another_accounts_subscription(database: str, subscription_owners: list[str],
                                                                asks: list[tuple[str, int]]) -> None:
    async def scenario() -> None:
        engine = await _engine(database, billing_orm)
        handlers = BillingHandlers(FixedClock())  # type: ignore[arg-type]
        try:
            for n, owner in enumerate(subscription_owners):
                await handle(engine, billing_orm, handlers.subscription_activated, message(_subscription(f"s{n}", owner)))
            for account, pick in asks:
                subscription_id = f"s{pick % len(subscription_owners)}"
                owner = subscription_owners[pick % len(subscription_owners)]
                request = CancellationRequested(
                    request_id=uuid.uuid4(), account_id=account, target="subscription",
                    subscription_id=subscription_id,
                    requested_by={"user_id": "u", "role": "customer", "channel": "storefront"})
                before = await _row(engine, subscription_id)
                await handle(engine, billing_orm, handlers.cancellation_requested, message(request))
                emitted = await _outbox(engine, billing_orm, str(request.request_id))
                types = [e["event_type"] for e in emitted]
                if account != owner:
                    assert types == ["CancellationReceived", "Failed"]
                    failed = emitted[1]["payload"]
                    assert failed["code"] == "not_owner" and failed["snapshot"] is None
                    assert "active" not in failed["message"] and "progress" not in failed["message"].lower()
                    assert await _row(engine, subscription_id) == before, "another account's request changed it"
                else:
                    assert "Failed" not in types or emitted[-1]["payload"]["code"] != "not_owner"
        finally:
            await engine.dispose()

    asyncio.run(scenario())


async def _row(engine: AsyncEngine, subscription_id: str) -> dict[str, Any]:
    table = billing_orm.subscriptions
    async with engine.connect() as conn:
        row = (await conn.execute(select(table).where(table.c.subscription_id == subscription_id))).mappings().one()
    return {k: v for k, v in row.items() if k != "updated_at"}


@PROFILE
@given(charge_owners=owners, asks=st.lists(
    st.tuples(st.sampled_from(ACCOUNTS), st.sets(st.integers(0, 3), min_size=1, max_size=3)), min_size=1, max_size=5))
def test_disputes_never_touch_another_accounts_charges(database: str, charge_owners: list[str],
                                                      asks: list[tuple[str, set[int]]]) -> None:
    async def scenario() -> None:
        engine = await _engine(database, dispute_orm)
        handlers = DisputeHandlers(window_hours=72)
        captured = datetime(2026, 11, 20, 12, tzinfo=UTC)
        try:
            for n, owner in enumerate(charge_owners):
                charge = ChargeCaptured(charge_id=f"c{n}", account_id=owner, subscription_id=f"s-{owner}",
                                        amount="10.00", currency="USD", captured_at=captured + timedelta(minutes=n),
                                        gateway_charge_id=f"g{n}", period_start=TODAY, period_end=TODAY + timedelta(30))
                await handle(engine, dispute_orm, handlers.charge_captured, message(charge))
            for account, picks in asks:
                charge_ids = sorted({f"c{p % len(charge_owners)}" for p in picks})
                foreign = any(charge_owners[int(c[1:])] != account for c in charge_ids)
                received = CancellationReceived(
                    request_id=uuid.uuid4(), account_id=account, target="charges", charge_ids=charge_ids,
                    mode="immediate", requested_by={"user_id": "u", "role": "customer", "channel": "storefront"})
                await handle(engine, dispute_orm, handlers.cancellation_received, message(received))
                types = [e["event_type"] for e in await _outbox(engine, dispute_orm, str(received.request_id))]
                failures = [e for e in await _outbox(engine, dispute_orm, str(received.request_id))
                            if e["event_type"] == "Failed"]
                if foreign:
                    assert [f["payload"]["code"] for f in failures] == ["not_owner"]
                    assert "ChargesVerificationRequested" not in types
                    assert "DuplicateRefundRequested" not in types
                    assert all(str(charge_owners[int(c[1:])]) not in orjson.dumps(failures).decode()
                               for c in charge_ids if charge_owners[int(c[1:])] != account)
                else:
                    assert all(f["payload"]["code"] != "not_owner" for f in failures)
        finally:
            await engine.dispose()

    asyncio.run(scenario())
