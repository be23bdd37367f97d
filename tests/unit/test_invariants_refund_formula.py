"""The checker's refund formula (CONTRACT.md section 5), judged from a real payment-gateway store
(SQLite and PostgreSQL): over-refunds built into the store are reported, fair books are not."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from cancelflow.db import create_schema, make_engine
from cancelflow_tools.invariants import FORMULA, Evidence, Expectations, check, read_databases
from payment_gateway import orm

START, END = date(2026, 11, 1), date(2026, 12, 1)
A_THIRD_USED = date(2026, 11, 11)
NOW = datetime(2026, 11, 11, 12, tzinfo=UTC)


async def books(url: str, *, captured: str, quantity: int | None,
                refunds: list[tuple[int, int, str]], status: str = "succeeded") -> dict[str, Any]:
    """A store with one charge (gw-1) and cancellation refunds (licenses, licenses paid, amount) of it,
    effective a third into the period; the databases' facts as the checker reads them."""
    engine = make_engine(url)
    try:
        await create_schema(engine, orm.metadata)
        async with engine.begin() as conn:
            await conn.execute(orm.charges.insert().values(
                charge_id="c1", account_id="acc-1", subscription_id="sub-1", gateway_charge_id="gw-1",
                amount=Decimal(captured), refunded_amount=sum(Decimal(a) for *_, a in refunds), currency="USD",
                captured_at=NOW, period_start=START, period_end=END, quantity=quantity))
            for n, (licenses, licenses_paid, amount) in enumerate(refunds):
                await conn.execute(orm.refunds.insert().values(
                    idempotency_key=f"cf-refund-r{n}-c1", request_id=f"r{n}", charge_id="c1",
                    gateway_charge_id="gw-1", amount=Decimal(amount), currency="USD", status=status,
                    licenses=licenses, licenses_paid=licenses_paid, effective_date=A_THIRD_USED,
                    created_at=NOW, updated_at=NOW))
    finally:
        await engine.dispose()
    return await read_databases({"payment_gateway": url})


def violations(databases: dict[str, Any]) -> list[str]:
    evidence = Evidence(statuses=[], dead_letters=[], vendor_ledger={}, gateway_ledger={}, mails=[],
                        databases=databases)
    report = check(evidence, Expectations(accepted=set()))
    assert report.checked[FORMULA] == 1
    return report.violations.get(FORMULA, [])


async def test_fair_steps_pass(store: Any) -> None:
    # 5 licenses at 30.00, a third used: 2 then 3 licenses, 40.00 + 60.00.
    found = await books(store("payment_gateway"), captured="150.00", quantity=None,
                        refunds=[(2, 5, "40.00"), (3, 5, "60.00")])
    assert violations(found) == []


async def test_the_old_formula_is_reported(store: Any) -> None:
    # What was left after the first refund, prorated again: 40.00 + 73.33 = 113.33 against a fair 100.00.
    found = await books(store("payment_gateway"), captured="150.00", quantity=5,
                        refunds=[(2, 5, "40.00"), (3, 5, "73.33")])
    assert violations(found) == ["gw-1: 113.33 refunded for 5 of 5 licenses, the formula allows 100.00"]


async def test_more_licenses_than_paid_for_are_reported(store: Any) -> None:
    # An upstream refresh brought 2 removed licenses back and they were refunded again.
    found = await books(store("payment_gateway"), captured="150.00", quantity=None,
                        refunds=[(2, 5, "40.00"), (4, 5, "80.00")])
    assert "gw-1: 6 licenses refunded of 5 paid for" in violations(found)


async def test_licenses_paid_other_than_the_charge_says_are_reported(store: Any) -> None:
    found = await books(store("payment_gateway"), captured="150.00", quantity=5, refunds=[(1, 3, "33.33")])
    assert violations(found)[0].startswith("gw-1: refunds count [3] licenses paid, the charge says [5]")


@pytest.mark.parametrize("status", ["pending", "not_due"])
async def test_refunds_in_flight_count(store: Any, status: str) -> None:
    found = await books(store("payment_gateway"), captured="150.00", quantity=5,
                        refunds=[(5, 5, "100.01")], status=status)
    assert violations(found) == ["gw-1: 100.01 refunded for 5 of 5 licenses, the formula allows 100.00"]
