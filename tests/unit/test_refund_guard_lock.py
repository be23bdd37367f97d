"""The refund guard's row lock on PostgreSQL: two reservations on one charge, the second made while the
first's transaction is still open, never take more than the charge has (no lost update)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from sqlalchemy import insert, text

from cancelflow.db import create_schema, make_engine, transactions
from cancelflow.sql import Db
from payment_gateway import orm
from payment_gateway.ledger import Ledger
from tests.conftest import eventually, pg_database_url

pytestmark = pytest.mark.pg


async def test_a_second_reservation_waits_for_the_first_and_sees_what_it_took(pg_server) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(pg_database_url(pg_server, "guard_lock"))
    try:
        await create_schema(engine, orm.metadata)
        async with engine.begin() as conn:
            await conn.execute(insert(orm.charges).values(
                charge_id="c1", account_id="acc-1", subscription_id="sub-1", gateway_charge_id="gw-1",
                amount=Decimal("30.00"), refunded_amount=Decimal("0"), currency="USD",
                captured_at=datetime(2026, 11, 1, tzinfo=UTC), period_start=date(2026, 11, 1),
                period_end=date(2026, 12, 1)))
        first, second = transactions(engine)(), transactions(engine)()
        await first.begin()
        await second.begin()
        try:
            assert await Ledger(Db(first)).reserve("c1", Decimal("20.00"))
            racing = asyncio.create_task(Ledger(Db(second)).reserve("c1", Decimal("20.00")))

            async def waiting_on_the_row_or_done() -> bool:  # the lock makes it wait; without it, it is done
                async with engine.connect() as conn:
                    waiting = (await conn.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"))).scalar_one()
                return racing.done() or waiting > 0

            await eventually(waiting_on_the_row_or_done, message="the second reservation reached the row")
            await first.commit()
            assert await racing is False  # 10.00 left: the second saw the first's 20.00
            await second.commit()
        finally:
            await first.close()
            await second.close()
        async with engine.connect() as conn:
            refunded = (await conn.execute(text("SELECT refunded_amount FROM charges"))).scalar_one()
        assert refunded == Decimal("20.00")
    finally:
        await engine.dispose()
