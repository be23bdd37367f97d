"""The refund guard and the money records, over the service's own database."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cancelflow.events import ChargeCaptured, utcnow
from payment_gateway import orm
from payment_gateway.domain import ChargeBalance

charges, refunds = orm.charges, orm.refunds


class Ledger:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def record_charge(self, charge: ChargeCaptured) -> None:
        exists = (await self.session.execute(
            select(charges.c.charge_id).where(charges.c.charge_id == charge.charge_id))).first()
        if exists:
            return
        await self.session.execute(insert(charges).values(
            charge_id=charge.charge_id, account_id=charge.account_id, subscription_id=charge.subscription_id,
            gateway_charge_id=charge.gateway_charge_id, amount=charge.amount, refunded_amount=Decimal("0"),
            currency=charge.currency, captured_at=charge.captured_at, period_start=charge.period_start,
            period_end=charge.period_end))

    async def period_charges(self, account_id: str, subscription_id: str, period_start: Any,
                             currency: str) -> list[ChargeBalance]:
        """The charges that paid for the period, most recent first, with what each has left."""
        rows = (await self.session.execute(select(charges).where(
            (charges.c.subscription_id == subscription_id) & (charges.c.account_id == account_id)
            & (charges.c.period_start == period_start) & (charges.c.currency == currency)
        ).order_by(charges.c.captured_at.desc(), charges.c.charge_id))).mappings()
        return [ChargeBalance(r["charge_id"], r["gateway_charge_id"],
                              Decimal(r["amount"]) - Decimal(r["refunded_amount"]), r["currency"]) for r in rows]

    async def reserve(self, charge_id: str, amount: Decimal) -> bool:
        """Take `amount` from the charge's refundable balance, atomically; False when it has not enough.

        The balance is compared in Decimal here, not in SQL: SQLite keeps NUMERIC as binary floats, where
        0.30 - 0.10 >= 0.20 is false. The row lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite) keeps the
        read and the write one step."""
        row = (await self.session.execute(
            select(charges.c.amount, charges.c.refunded_amount).where(charges.c.charge_id == charge_id)
            .with_for_update())).first()
        if row is None:
            return False
        refunded = Decimal(row.refunded_amount)
        if Decimal(row.amount) - refunded < amount:
            return False
        await self.session.execute(update(charges).where(charges.c.charge_id == charge_id)
                                   .values(refunded_amount=refunded + amount))
        return True

    async def release(self, charge_id: str, amount: Decimal) -> None:
        await self.session.execute(update(charges).where(charges.c.charge_id == charge_id)
                                   .values(refunded_amount=charges.c.refunded_amount - amount))

    async def refunds_for(self, request_id: str) -> list[dict[str, Any]]:
        rows = (await self.session.execute(select(refunds).where(refunds.c.request_id == request_id)
                                           .order_by(refunds.c.created_at, refunds.c.idempotency_key))).mappings()
        return [dict(r) for r in rows]

    async def add_refund(self, *, key: str, request_id: str, charge: ChargeBalance, amount: Decimal) -> None:
        now = utcnow()
        await self.session.execute(insert(refunds).values(
            idempotency_key=key, request_id=request_id, charge_id=charge.charge_id,
            gateway_charge_id=charge.gateway_charge_id, amount=amount, currency=charge.currency,
            status="pending", created_at=now, updated_at=now))

    async def settle_refund(self, key: str, **values: Any) -> None:
        await self.session.execute(update(refunds).where(refunds.c.idempotency_key == key)
                                   .values(updated_at=utcnow(), **values))

    async def schedule_stopped(self, subscription_id: str) -> bool:
        return (await self.session.execute(select(orm.schedule_stops.c.subscription_id).where(
            orm.schedule_stops.c.subscription_id == subscription_id))).first() is not None

    async def record_schedule_stop(self, subscription_id: str, request_id: str) -> None:
        await self.session.execute(insert(orm.schedule_stops).values(
            subscription_id=subscription_id, request_id=request_id, stopped_at=utcnow()))


async def charge_row(session: AsyncSession, charge_id: str) -> dict[str, Any] | None:
    """The charge as the guard keeps it (amount, refunded_amount, ...), None when unknown."""
    row = (await session.execute(select(charges).where(charges.c.charge_id == charge_id))).mappings().first()
    return dict(row) if row else None


async def refund_record(session: AsyncSession, key: str) -> dict[str, Any] | None:
    """The refund recorded under an idempotency key, None when there is none."""
    row = (await session.execute(select(refunds).where(refunds.c.idempotency_key == key))).mappings().first()
    return dict(row) if row else None
