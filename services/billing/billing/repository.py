"""Billing's reads and writes, so handlers speak in subscriptions and cancellations, not SQL."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from billing import orm
from billing.domain import SubscriptionFacts
from cancelflow.events import SubscriptionActivated, SubscriptionSnapshot, utcnow


class BillingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        row = (await self.session.execute(
            select(orm.subscriptions).where(orm.subscriptions.c.subscription_id == subscription_id)
        )).mappings().first()
        return dict(row) if row else None

    @staticmethod
    def facts(row: dict[str, Any]) -> SubscriptionFacts:
        return SubscriptionFacts(
            subscription_id=row["subscription_id"], account_id=row["account_id"], status=row["status"],
            provisioning_status=row["provisioning_status"], quantity=row["quantity"],
            current_period_start=row["current_period_start"], current_period_end=row["current_period_end"],
        )

    @staticmethod
    def snapshot(row: dict[str, Any], *, effective_date: date | None = None,
                 access_end_date: date | None = None) -> SubscriptionSnapshot:
        return SubscriptionSnapshot(subscription_status=row["status"],
                                    provisioning_status=row["provisioning_status"],
                                    effective_date=effective_date or row["effective_date"],
                                    access_end_date=access_end_date)

    async def upsert_subscription(self, facts: SubscriptionActivated, *, provisioning_status: str) -> None:
        values = dict(
            account_id=facts.account_id, product_name=facts.product_name, vendor=facts.vendor,
            vendor_subscription_id=facts.vendor_subscription_id, billing_period=facts.billing_period,
            unit_price=facts.unit_price, currency=facts.currency, quantity=facts.quantity,
            status=facts.status, trial=facts.status == "trial", current_period_start=facts.current_period_start,
            current_period_end=facts.current_period_end, auto_renew=facts.auto_renew, updated_at=utcnow(),
        )
        table = orm.subscriptions
        existing = await self.subscription(facts.subscription_id)
        if existing is None:
            await self.session.execute(insert(table).values(
                subscription_id=facts.subscription_id, provisioning_status=provisioning_status,
                effective_date=None, **values))
        else:
            if existing["provisioning_status"] == "In Progress":
                # A cancellation holds the lock: keep its view of status until it ends.
                values.pop("status")
                values.pop("trial")
            await self.session.execute(update(table).where(
                table.c.subscription_id == facts.subscription_id).values(**values))

    async def update_subscription(self, subscription_id: str, **values: Any) -> None:
        table = orm.subscriptions
        await self.session.execute(update(table).where(table.c.subscription_id == subscription_id)
                                   .values(updated_at=utcnow(), **values))

    async def add_history(self, subscription_id: str, request_id: str | None, message: str) -> None:
        await self.session.execute(insert(orm.history).values(
            subscription_id=subscription_id, request_id=request_id, at=utcnow(), message=message))

    async def history(self, subscription_id: str) -> list[dict[str, Any]]:
        rows = (await self.session.execute(select(orm.history).where(
            orm.history.c.subscription_id == subscription_id).order_by(orm.history.c.id))).mappings()
        return [dict(r) for r in rows]

    async def schedule_renewal(self, facts: SubscriptionActivated) -> None:
        table = orm.scheduled_billings
        await self.session.execute(update(table).where(
            (table.c.subscription_id == facts.subscription_id) & (table.c.status == "scheduled")
        ).values(status="superseded"))
        if facts.auto_renew:
            await self.session.execute(insert(table).values(
                subscription_id=facts.subscription_id, bill_on=facts.current_period_end,
                amount=facts.unit_price * facts.quantity, currency=facts.currency, status="scheduled"))

    async def cancel_scheduled_billings(self, subscription_id: str) -> int:
        table = orm.scheduled_billings
        result = await self.session.execute(update(table).where(
            (table.c.subscription_id == subscription_id) & (table.c.status == "scheduled")
        ).values(status="canceled"))
        return result.rowcount or 0

    async def reprice_scheduled_billings(self, subscription_id: str, amount: Decimal) -> int:
        """A partial cancellation: the next renewal bills only the licenses that are left."""
        table = orm.scheduled_billings
        result = await self.session.execute(update(table).where(
            (table.c.subscription_id == subscription_id) & (table.c.status == "scheduled")
        ).values(amount=amount))
        return result.rowcount or 0

    async def cancellation(self, request_id: str) -> dict[str, Any] | None:
        row = (await self.session.execute(select(orm.cancellations).where(
            orm.cancellations.c.request_id == request_id))).mappings().first()
        return dict(row) if row else None

    async def add_cancellation(self, **values: Any) -> None:
        now = utcnow()
        await self.session.execute(insert(orm.cancellations).values(created_at=now, updated_at=now, **values))

    async def set_cancellation(self, request_id: str, **values: Any) -> None:
        table = orm.cancellations
        await self.session.execute(update(table).where(table.c.request_id == request_id)
                                   .values(updated_at=utcnow(), **values))

    async def in_flight(self, subscription_id: str, *, exclude: str) -> bool:
        """Another request for the subscription is scheduled or at the vendor (it holds the lock)."""
        table = orm.cancellations
        found = await self.session.execute(select(table.c.request_id).where(
            (table.c.subscription_id == subscription_id) & (table.c.request_id != exclude)
            & table.c.state.in_(("scheduled", "awaiting_vendor"))).limit(1))
        return found.first() is not None

    async def park_decision(self, request_id: str, *, decision: str, decided_by: str, note: str) -> None:
        table = orm.parked_decisions
        if (await self.session.execute(select(table.c.request_id).where(table.c.request_id == request_id))).first():
            return  # the first decision stands
        await self.session.execute(insert(table).values(request_id=request_id, decision=decision,
                                                        decided_by=decided_by, note=note, at=utcnow()))

    async def take_parked_decision(self, request_id: str) -> dict[str, str] | None:
        table = orm.parked_decisions
        row = (await self.session.execute(select(table).where(table.c.request_id == request_id))).mappings().first()
        if row is None:
            return None
        await self.session.execute(table.delete().where(table.c.request_id == request_id))
        return {"decision": row["decision"], "decided_by": row["decided_by"], "note": row["note"]}

    async def take_fault(self, subscription_id: str, stage: str) -> bool:
        """Disarm and report a fault armed for this subscription's next `stage`."""
        table = orm.armed_faults
        result = await self.session.execute(table.delete().where(
            (table.c.subscription_id == subscription_id) & (table.c.stage == stage)))
        return bool(result.rowcount)

    async def arm_fault(self, subscription_id: str, stage: str) -> None:
        table = orm.armed_faults
        await self.session.execute(table.delete().where(table.c.subscription_id == subscription_id))
        await self.session.execute(insert(table).values(subscription_id=subscription_id, stage=stage,
                                                        armed_at=utcnow()))
