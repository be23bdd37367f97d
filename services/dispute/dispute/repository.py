"""The dispute service's records: charges copy, cases, per-charge outcomes and the audit trail."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cancelflow.events import utcnow
from dispute import orm
from dispute.domain import Charge


def _charge(row: Any) -> Charge:
    captured = row["captured_at"]
    if captured.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        captured = captured.replace(tzinfo=UTC)
    return Charge(charge_id=row["charge_id"], account_id=row["account_id"], subscription_id=row["subscription_id"],
                  gateway_charge_id=row["gateway_charge_id"], amount=Decimal(str(row["amount"])).quantize(
                      Decimal("0.01")), currency=row["currency"], captured_at=captured)


class DisputeRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- charges -----------------------------------------------------------------------------

    async def charges(self, charge_ids: list[str]) -> dict[str, Charge]:
        if not charge_ids:
            return {}
        rows = (await self.session.execute(select(orm.charges).where(
            orm.charges.c.charge_id.in_(charge_ids)))).mappings()
        return {r["charge_id"]: _charge(r) for r in rows}

    async def account_charges(self, account_id: str) -> list[Charge]:
        rows = (await self.session.execute(select(orm.charges).where(
            orm.charges.c.account_id == account_id))).mappings()
        return [_charge(r) for r in rows]

    # --- cases -------------------------------------------------------------------------------

    async def case(self, request_id: str) -> dict[str, Any] | None:
        row = (await self.session.execute(select(orm.disputes).where(
            orm.disputes.c.request_id == request_id))).mappings().first()
        return dict(row) if row else None

    async def add_case(self, **values: Any) -> None:
        now = utcnow()
        await self.session.execute(insert(orm.disputes).values(created_at=now, updated_at=now, **values))

    async def set_case(self, request_id: str, **values: Any) -> None:
        await self.session.execute(update(orm.disputes).where(orm.disputes.c.request_id == request_id)
                                   .values(updated_at=utcnow(), **values))

    # --- per-charge outcomes -----------------------------------------------------------------

    async def add_line(self, **values: Any) -> None:
        await self.session.execute(insert(orm.dispute_charges).values(updated_at=utcnow(), **values))

    async def lines(self, request_id: str) -> list[dict[str, Any]]:
        table = orm.dispute_charges
        rows = (await self.session.execute(select(table).where(table.c.request_id == request_id)
                                           .order_by(table.c.position))).mappings()
        return [dict(r) for r in rows]

    async def set_line(self, request_id: str, charge_id: str, **values: Any) -> None:
        table = orm.dispute_charges
        await self.session.execute(update(table).where(
            (table.c.request_id == request_id) & (table.c.charge_id == charge_id)).values(updated_at=utcnow(),
                                                                                          **values))

    # --- audit -------------------------------------------------------------------------------

    async def add_audit(self, *, request_id: str, step: str, actor: str, charge_id: str | None, message: str,
                        data: dict[str, Any]) -> None:
        await self.session.execute(insert(orm.audit).values(
            request_id=request_id, step=step, actor=actor, charge_id=charge_id, message=message, data=data,
            at=utcnow()))

    async def audit_trail(self, request_id: str) -> list[dict[str, Any]]:
        rows = (await self.session.execute(select(orm.audit).where(orm.audit.c.request_id == request_id)
                                           .order_by(orm.audit.c.id))).mappings()
        return [dict(r) for r in rows]
