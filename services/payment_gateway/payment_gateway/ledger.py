"""The refund guard and the money records, over the service's own database."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import Numeric, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql

from cancelflow.contract import CANCELLATION_REFUND_PREFIX
from cancelflow.events import ChargeCaptured, utcnow
from cancelflow.sql import Db, Query
from payment_gateway import orm
from payment_gateway.domain import ChargeBalance, EarlierRefunds, unused_days

charges, refunds = orm.charges, orm.refunds
CENT = Decimal("0.01")

CHARGE = Query(select(charges).where(charges.c.charge_id == bindparam("charge_id")))
ADD_CHARGE = Query(insert(charges))
PERIOD_CHARGES = Query(select(charges).where(
    (charges.c.subscription_id == bindparam("subscription_id")) & (charges.c.account_id == bindparam("account_id"))
    & (charges.c.period_start == bindparam("period_start"))
).order_by(charges.c.captured_at, charges.c.charge_id))
# Every record naming a gateway charge: together they hold its one refundable balance.
GATEWAY_CHARGE = Query(select(charges.c.amount, charges.c.refunded_amount)
                       .where(charges.c.gateway_charge_id == bindparam("gateway_charge_id")))
GATEWAY_CHARGE_FOR_UPDATE = Query(select(charges.c.amount, charges.c.refunded_amount)
                                  .where(charges.c.gateway_charge_id == bindparam("gateway_charge_id"))
                                  .with_for_update())
EARLIER_CANCELLATION_REFUNDS = Query(select(refunds.c.licenses, refunds.c.licenses_paid, refunds.c.effective_date,
                                            refunds.c.amount).where(
    (refunds.c.gateway_charge_id == bindparam("gateway_charge_id"))
    & refunds.c.idempotency_key.startswith(CANCELLATION_REFUND_PREFIX, autoescape=True)
    & (refunds.c.status != "failed") & refunds.c.licenses.is_not(None)
).order_by(refunds.c.created_at, refunds.c.idempotency_key))
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
            period_end=charge.period_end, quantity=charge.quantity)

    async def period_charges(self, account_id: str, subscription_id: str, period_start: Any) -> list[ChargeBalance]:
        """The gateway charges that paid for the period, in every currency, oldest first. Records naming
        the same gateway charge are one charge: the first recorded stands for it (its key, its terms)."""
        rows = await self.db.all(PERIOD_CHARGES, subscription_id=subscription_id, account_id=account_id,
                                 period_start=period_start)
        found: dict[str, ChargeBalance] = {}
        for r in rows:
            if r["gateway_charge_id"] in found:
                continue
            named = [o for o in rows if o["gateway_charge_id"] == r["gateway_charge_id"]]
            found[r["gateway_charge_id"]] = ChargeBalance(
                r["charge_id"], r["gateway_charge_id"], await self._refundable(r["gateway_charge_id"]),
                r["currency"], captured=_money(r["amount"]),
                quantity=next((o["quantity"] for o in named if o["quantity"]), None),
                period_start=r["period_start"], period_end=r["period_end"])
        return list(found.values())

    async def _refundable(self, gateway_charge_id: str, *, lock: bool = False) -> Decimal:
        rows = await self.db.all(GATEWAY_CHARGE_FOR_UPDATE if lock else GATEWAY_CHARGE,
                                 gateway_charge_id=gateway_charge_id)
        if not rows:
            return Decimal("0.00")
        # Records that disagree on the amount: the smallest is all the gateway charge can have captured.
        captured = min(_money(r["amount"]) for r in rows)
        return captured - sum((_money(r["refunded_amount"]) for r in rows), Decimal("0.00"))

    async def refundable(self, charge_id: str) -> Decimal | None:
        """What the gateway charge this record names has left to refund; None for an unknown charge."""
        row = await self.db.first(CHARGE, charge_id=charge_id)
        return None if row is None else await self._refundable(row["gateway_charge_id"])

    async def reserve(self, charge_id: str, amount: Decimal) -> bool:
        """Take `amount` from the refundable balance of the gateway charge this record names, atomically;
        False when it has not enough. However many records name a gateway charge, it has one balance.

        The balance is compared in Decimal here, not in SQL: SQLite keeps NUMERIC as binary floats, where
        0.30 - 0.10 >= 0.20 is false. The row locks (PostgreSQL) or BEGIN IMMEDIATE (SQLite) keep the
        read and the write one step."""
        row = await self.db.first(CHARGE, charge_id=charge_id)
        if row is None:
            return False
        if await self._refundable(row["gateway_charge_id"], lock=True) < amount:
            return False
        mine = await self.db.first(CHARGE, charge_id=charge_id)
        assert mine is not None
        await self.db.run(SET_REFUNDED, match_charge_id=charge_id,
                          refunded_amount=_money(mine["refunded_amount"]) + amount)
        return True

    async def earlier_refunds(self, gateway_charge_id: str, period_start: date, period_end: date) -> EarlierRefunds:
        """What cancellation refunds of the gateway charge took so far (failed ones not counted). Read
        under the gateway charge's lock: a request planned at the same time is counted once committed."""
        await self._refundable(gateway_charge_id, lock=True)
        rows = await self.db.all(EARLIER_CANCELLATION_REFUNDS, gateway_charge_id=gateway_charge_id)
        return EarlierRefunds(
            licenses=sum(r["licenses"] for r in rows),
            license_days=sum(r["licenses"] * unused_days(period_start, period_end, r["effective_date"]) for r in rows),
            amount=sum((_money(r["amount"]) for r in rows), Decimal("0.00")),
            licenses_paid=rows[0]["licenses_paid"] if rows else None)

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

    async def add_refund(self, *, key: str, request_id: str, charge: ChargeBalance, amount: Decimal,
                         licenses: int | None = None, licenses_paid: int | None = None,
                         effective_date: date | None = None) -> None:
        now = utcnow()
        await self.db.run(
            ADD_REFUND, idempotency_key=key, request_id=request_id, charge_id=charge.charge_id,
            gateway_charge_id=charge.gateway_charge_id, amount=amount, currency=charge.currency,
            status="pending", licenses=licenses, licenses_paid=licenses_paid, effective_date=effective_date,
            created_at=now, updated_at=now)

    async def settle_refund(self, key: str, **values: Any) -> None:
        await self.db.run(SET_REFUND, match_key=key, updated_at=utcnow(), **values)

    async def schedule_stopped(self, subscription_id: str) -> bool:
        return await self.db.first(SCHEDULE_STOP, subscription_id=subscription_id) is not None

    async def record_schedule_stop(self, subscription_id: str, request_id: str) -> None:
        await self.db.run(ADD_SCHEDULE_STOP, subscription_id=subscription_id, request_id=request_id,
                          stopped_at=utcnow())


def _money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(CENT)
