"""The refund guard and the money records, over the service's own database."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import Numeric, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql

from cancelflow.events import ChargeCaptured, utcnow
from cancelflow.sql import Db, Query
from payment_gateway import orm
from payment_gateway.domain import ChargeBalance

charges, refunds = orm.charges, orm.refunds

CHARGE = Query(select(charges).where(charges.c.charge_id == bindparam("charge_id")))
ADD_CHARGE = Query(insert(charges))
PERIOD_CHARGES = Query(select(charges).where(
    (charges.c.subscription_id == bindparam("subscription_id")) & (charges.c.account_id == bindparam("account_id"))
    & (charges.c.period_start == bindparam("period_start")) & (charges.c.currency == bindparam("currency"))
).order_by(charges.c.captured_at.desc(), charges.c.charge_id))
BALANCE_FOR_UPDATE = Query(select(charges.c.amount, charges.c.refunded_amount)
                           .where(charges.c.charge_id == bindparam("charge_id")).with_for_update())
SET_REFUNDED = Query(update(charges).where(charges.c.charge_id == bindparam("match_charge_id")))
RELEASE = Query(update(charges).where(charges.c.charge_id == bindparam("match_charge_id")).values(
    refunded_amount=charges.c.refunded_amount - bindparam("released", type_=Numeric(12, 2))))
REFUNDS_FOR = Query(select(refunds).where(refunds.c.request_id == bindparam("request_id"))
                    .order_by(refunds.c.created_at, refunds.c.idempotency_key))
REFUND = Query(select(refunds).where(refunds.c.idempotency_key == bindparam("key")))
ADD_REFUND = Query(insert(refunds))
SET_REFUND = Query(update(refunds).where(refunds.c.idempotency_key == bindparam("match_key")))
SCHEDULE_STOP = Query(select(orm.schedule_stops.c.subscription_id)
                      .where(orm.schedule_stops.c.subscription_id == bindparam("subscription_id")))
# Two full cancellations of a subscription may both find no stop recorded and both insert one: the
# second is dropped, not a unique violation (PostgreSQL; SQLite's writers queue). Same SQL on both.
ADD_SCHEDULE_STOP = Query(postgresql.insert(orm.schedule_stops).on_conflict_do_nothing(
    index_elements=[orm.schedule_stops.c.subscription_id]))


class Ledger:
    def __init__(self, db: Db) -> None:
        self.db = db

    async def record_charge(self, charge: ChargeCaptured) -> None:
        if await self.db.first(CHARGE, charge_id=charge.charge_id):
            return
        await self.db.run(
            ADD_CHARGE, charge_id=charge.charge_id, account_id=charge.account_id, subscription_id=charge.subscription_id,
            gateway_charge_id=charge.gateway_charge_id, amount=charge.amount, refunded_amount=Decimal("0"),
            currency=charge.currency, captured_at=charge.captured_at, period_start=charge.period_start,
            period_end=charge.period_end)

    async def period_charges(self, account_id: str, subscription_id: str, period_start: Any,
                             currency: str) -> list[ChargeBalance]:
        """The charges that paid for the period, most recent first, with what each has left."""
        rows = await self.db.all(PERIOD_CHARGES, subscription_id=subscription_id, account_id=account_id,
                                 period_start=period_start, currency=currency)
        return [ChargeBalance(r["charge_id"], r["gateway_charge_id"],
                              Decimal(r["amount"]) - Decimal(r["refunded_amount"]), r["currency"]) for r in rows]

    async def reserve(self, charge_id: str, amount: Decimal) -> bool:
        """Take `amount` from the charge's refundable balance, atomically; False when it has not enough.

        The balance is compared in Decimal here, not in SQL: SQLite keeps NUMERIC as binary floats, where
        0.30 - 0.10 >= 0.20 is false. The row lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite) keeps the
        read and the write one step."""
        row = await self.db.first(BALANCE_FOR_UPDATE, charge_id=charge_id)
        if row is None:
            return False
        refunded = Decimal(row["refunded_amount"])
        if Decimal(row["amount"]) - refunded < amount:
            return False
        await self.db.run(SET_REFUNDED, match_charge_id=charge_id, refunded_amount=refunded + amount)
        return True

    async def charge_row(self, charge_id: str) -> dict[str, Any] | None:
        """The charge as the guard keeps it (amount, refunded_amount, ...), None when unknown."""
        return await self.db.first(CHARGE, charge_id=charge_id)

    async def refund_record(self, key: str) -> dict[str, Any] | None:
        """The refund recorded under an idempotency key, None when there is none."""
        return await self.db.first(REFUND, key=key)

    async def release(self, charge_id: str, amount: Decimal) -> None:
        await self.db.run(RELEASE, match_charge_id=charge_id, released=amount)

    async def refunds_for(self, request_id: str) -> list[dict[str, Any]]:
        return await self.db.all(REFUNDS_FOR, request_id=request_id)

    async def add_refund(self, *, key: str, request_id: str, charge: ChargeBalance, amount: Decimal) -> None:
        now = utcnow()
        await self.db.run(
            ADD_REFUND, idempotency_key=key, request_id=request_id, charge_id=charge.charge_id,
            gateway_charge_id=charge.gateway_charge_id, amount=amount, currency=charge.currency,
            status="pending", created_at=now, updated_at=now)

    async def settle_refund(self, key: str, **values: Any) -> None:
        await self.db.run(SET_REFUND, match_key=key, updated_at=utcnow(), **values)

    async def schedule_stopped(self, subscription_id: str) -> bool:
        return await self.db.first(SCHEDULE_STOP, subscription_id=subscription_id) is not None

    async def record_schedule_stop(self, subscription_id: str, request_id: str) -> None:
        await self.db.run(ADD_SCHEDULE_STOP, subscription_id=subscription_id, request_id=request_id,
                          stopped_at=utcnow())
