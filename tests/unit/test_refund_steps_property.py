"""Property: licenses removed in any sequence of partial and full cancellations, on any dates, with
upstream refreshes bringing removed licenses back and every record redelivered, refund exactly the sum
of each step's fair share (CONTRACT.md section 5), and never more than one request removing everything
on the earliest of those dates would.

Through the payment-gateway handlers, a real store (SQLite and PostgreSQL: one database per test, emptied
before each example) and the gateway sandbox's rules. CI runs a fixed derandomized set;
`HYPOTHESIS_PROFILE=long` runs many more.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete

from cancelflow.db import create_schema, make_engine
from payment_gateway import orm
from tests.unit.test_refund_per_charge import PERIOD_END, PERIOD_START, Payments, committed

PERIOD_DAYS = (PERIOD_END - PERIOD_START).days
# The database is a function-scoped fixture, emptied before each example.
SLOW_AND_SHARED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
PROFILES = {"ci": settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=SLOW_AND_SHARED),
            "long": settings(max_examples=500, deadline=None, suppress_health_check=SLOW_AND_SHARED)}
PROFILE = PROFILES[os.environ.get("HYPOTHESIS_PROFILE", "ci")]


@dataclass(frozen=True)
class Step:
    removed: int  # licenses the request removes of what billing says there is; all of them: full
    unused: int  # days of the period after its effective date
    redelivered: bool
    refresh_before: bool  # upstream said the old quantity again just before this request


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, bool, list[Step]]:
    cents = draw(st.integers(1, 10**7))
    licenses = draw(st.integers(1, 12))
    paid_from_charge = draw(st.booleans())
    steps, quantity = [], licenses
    for _ in range(draw(st.integers(1, 8))):
        refresh = draw(st.booleans()) and quantity < licenses
        quantity = licenses if refresh else quantity
        removed = draw(st.integers(1, quantity))
        steps.append(Step(removed, draw(st.integers(0, PERIOD_DAYS)), draw(st.booleans()), refresh))
        quantity -= removed
        if quantity == 0:
            break
    return cents, licenses, paid_from_charge, steps


@pytest.fixture
def database(store: Any) -> str:
    return store("payment_gateway")


async def refund_steps(database: str, cents: int, licenses: int, paid_from_charge: bool,
                       steps: list[Step]) -> list[Decimal]:
    """What the gateway refunded after each step, with the step's record delivered once or twice."""
    engine = make_engine(database)
    try:
        await create_schema(engine, orm.metadata)
        async with engine.begin() as conn:
            for table in reversed(orm.metadata.sorted_tables):
                await conn.execute(delete(table))
        payments = Payments(engine)
        await payments.charge(str(Decimal(cents) / 100), quantity=licenses if paid_from_charge else None)
        quantity, refunded = licenses, []
        for step in steps:
            quantity = licenses if step.refresh_before else quantity
            extra = {} if paid_from_charge else {"period_quantity": licenses}
            effective = PERIOD_END - timedelta(days=step.unused)
            before = payments.refunded()
            event = committed(quantity_before=quantity, quantity_after=quantity - step.removed,
                              effective_date=effective, access_end_date=effective, **extra)
            await payments.commit(event)
            if step.redelivered:
                await payments.commit(event)  # the same event again under a new event id
            refunded.append(payments.refunded() - before)
            quantity -= step.removed
        return refunded
    finally:
        await engine.dispose()


def cents(exact: Fraction) -> Decimal:
    return Decimal(round(exact * 100)) / 100  # Python rounds a Fraction's tie to even


@PROFILE
@given(scenarios())
def test_steps_refund_their_fair_shares_and_never_more_than_one_request(database: str, scenario: tuple) -> None:
    paid_cents, licenses, paid_from_charge, steps = scenario
    refunded = asyncio.run(refund_steps(database, paid_cents, licenses, paid_from_charge, steps))
    captured = Fraction(paid_cents, 100)
    exact_total, still_paid = Fraction(0), licenses
    for step, amount in zip(steps, refunded, strict=True):
        counted = min(step.removed, still_paid)  # a license is refunded once, whatever upstream says
        still_paid -= counted
        share = captured * counted * step.unused / (licenses * PERIOD_DAYS)
        exact_total += share
        assert abs(amount - cents(share)) <= Decimal("0.01"), (step, amount, share)
    total = sum(refunded, Decimal("0.00"))
    assert total == cents(exact_total)
    earliest = max(step.unused for step in steps)
    assert total <= cents(captured * earliest / PERIOD_DAYS)
