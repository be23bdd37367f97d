"""The dispute service's records: charges copy, cases, per-charge outcomes and the audit trail."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, insert, select, update

from cancelflow.events import utcnow
from cancelflow.sql import Among, Db, Query
from dispute import orm
from dispute.domain import Charge

# The statements of every event, built once (cancelflow.sql).
CHARGES_AMONG = Among(lambda ids: select(orm.charges).where(orm.charges.c.charge_id.in_(ids)))
ACCOUNT_CHARGES = Query(select(orm.charges).where(orm.charges.c.account_id == bindparam("account_id")))
CASE = Query(select(orm.disputes).where(orm.disputes.c.request_id == bindparam("request_id")))
ADD_CASE = Query(insert(orm.disputes))
# Cases waiting for their charges' facts (handlers.AWAITING_FACTS), oldest first.
AWAITING = Query(select(orm.disputes.c.request_id).where(
    (orm.disputes.c.account_id == bindparam("account_id")) & (orm.disputes.c.state == "awaiting_facts"))
    .order_by(orm.disputes.c.created_at))
ALL_AWAITING = Query(select(orm.disputes.c.request_id).where(orm.disputes.c.state == "awaiting_facts")
                     .order_by(orm.disputes.c.created_at).limit(500))
SET_CASE = Query(update(orm.disputes).where(orm.disputes.c.request_id == bindparam("match_request_id")))
ADD_LINE = Query(insert(orm.dispute_charges))
LINES = Query(select(orm.dispute_charges).where(orm.dispute_charges.c.request_id == bindparam("request_id"))
              .order_by(orm.dispute_charges.c.position))
SET_LINE = Query(update(orm.dispute_charges).where(
    (orm.dispute_charges.c.request_id == bindparam("match_request_id"))
    & (orm.dispute_charges.c.charge_id == bindparam("match_charge_id"))))
ADD_AUDIT = Query(insert(orm.audit))
AUDIT_TRAIL = Query(select(orm.audit).where(orm.audit.c.request_id == bindparam("request_id"))
                    .order_by(orm.audit.c.id))


def _charge(row: Any) -> Charge:
    captured = row["captured_at"]
    if captured.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        captured = captured.replace(tzinfo=UTC)
    return Charge(charge_id=row["charge_id"], account_id=row["account_id"], subscription_id=row["subscription_id"],
                  gateway_charge_id=row["gateway_charge_id"], amount=Decimal(str(row["amount"])).quantize(
                      Decimal("0.01")), currency=row["currency"], captured_at=captured)


class DisputeRepository:
    def __init__(self, db: Db) -> None:
        self.db = db

    # --- charges -----------------------------------------------------------------------------

    async def charges(self, charge_ids: list[str]) -> dict[str, Charge]:
        if not charge_ids:
            return {}
        return {r["charge_id"]: _charge(r) for r in await self.db.among(CHARGES_AMONG, charge_ids)}

    async def account_charges(self, account_id: str) -> list[Charge]:
        return [_charge(r) for r in await self.db.all(ACCOUNT_CHARGES, account_id=account_id)]

    # --- cases -------------------------------------------------------------------------------

    async def case(self, request_id: str) -> dict[str, Any] | None:
        return await self.db.first(CASE, request_id=request_id)

    async def add_case(self, **values: Any) -> None:
        now = utcnow()
        await self.db.run(ADD_CASE, created_at=now, updated_at=now, **values)

    async def set_case(self, request_id: str, **values: Any) -> None:
        await self.db.run(SET_CASE, match_request_id=request_id, updated_at=utcnow(), **values)

    async def awaiting_facts(self, account_id: str | None = None) -> list[str]:
        """Cases waiting for the facts of charges of `account_id` (None: of any account), oldest first."""
        if account_id is None:
            return [row["request_id"] for row in await self.db.all(ALL_AWAITING)]
        return [row["request_id"] for row in await self.db.all(AWAITING, account_id=account_id)]

    # --- per-charge outcomes -----------------------------------------------------------------

    async def add_line(self, **values: Any) -> None:
        await self.db.run(ADD_LINE, updated_at=utcnow(), **values)

    async def lines(self, request_id: str) -> list[dict[str, Any]]:
        return await self.db.all(LINES, request_id=request_id)

    async def set_line(self, request_id: str, charge_id: str, **values: Any) -> None:
        await self.db.run(SET_LINE, match_request_id=request_id, match_charge_id=charge_id, updated_at=utcnow(),
                          **values)

    # --- audit -------------------------------------------------------------------------------

    async def add_audit(self, *, request_id: str, step: str, actor: str, charge_id: str | None, message: str,
                        data: dict[str, Any]) -> None:
        await self.db.run(ADD_AUDIT, request_id=request_id, step=step, actor=actor, charge_id=charge_id,
                          message=message, data=data, at=utcnow())

    async def audit_trail(self, request_id: str) -> list[dict[str, Any]]:
        return await self.db.all(AUDIT_TRAIL, request_id=request_id)
