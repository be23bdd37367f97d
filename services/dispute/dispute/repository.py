"""The dispute service's records: charges copy, cases (loaded and saved as `domain.Case`, with their
listed charges and audit steps) and the audit trail."""

from __future__ import annotations

from dataclasses import astuple
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, insert, select, update

from cancelflow.events import utcnow
from cancelflow.sql import Among, Db, Query
from dispute import orm
from dispute.domain import Case, Charge, Line, Outcome, State

# The statements of every event, built once (cancelflow.sql).
CHARGES_AMONG = Among(lambda ids: select(orm.charges).where(orm.charges.c.charge_id.in_(ids)))
ACCOUNT_CHARGES = Query(select(orm.charges).where(orm.charges.c.account_id == bindparam("account_id")))
CASE = Query(select(orm.disputes).where(orm.disputes.c.request_id == bindparam("request_id")))
ADD_CASE = Query(insert(orm.disputes))
# Cases waiting for their charges' facts, oldest first.
AWAITING = Query(select(orm.disputes.c.request_id).where(
    (orm.disputes.c.account_id == bindparam("account_id")) & (orm.disputes.c.state == State.awaiting_facts.value))
    .order_by(orm.disputes.c.created_at))
ALL_AWAITING = Query(select(orm.disputes.c.request_id).where(orm.disputes.c.state == State.awaiting_facts.value)
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




def _cents(amount: Any) -> Decimal:
    return Decimal(str(amount)).quantize(Decimal("0.01"))


def _charge(row: Any) -> Charge:
    return Charge(charge_id=row["charge_id"], account_id=row["account_id"], subscription_id=row["subscription_id"],
                  gateway_charge_id=row["gateway_charge_id"], amount=_cents(row["amount"]), currency=row["currency"],
                  captured_at=row["captured_at"])


def _line(row: dict[str, Any], account_id: str) -> Line:
    facts = None if row["amount"] is None else _charge({**row, "account_id": account_id})
    return Line(
        charge_id=row["charge_id"], position=row["position"], outcome=Outcome(row["outcome"]),
        duplicate=row["duplicate"] == "yes", reason=row["reason"], detail=row["detail"], facts=facts,
        related_charge_id=row["related_charge_id"], gateway_state=row["gateway_state"],
        idempotency_key=row["idempotency_key"], refund_kind=row["refund_kind"], refund_id=row["refund_id"],
        refund_error=row["refund_error"])


def _facts(line: Line) -> dict[str, Any]:
    """A listed charge's facts as copied in (none of another account's charge)."""
    if line.facts is None:
        return dict.fromkeys(("subscription_id", "gateway_charge_id", "amount", "currency", "captured_at"))
    facts = line.facts
    return {"subscription_id": facts.subscription_id, "gateway_charge_id": facts.gateway_charge_id,
            "amount": facts.amount, "currency": facts.currency, "captured_at": facts.captured_at}


def _line_values(line: Line) -> dict[str, Any]:
    """What a line's outcome changes (the facts copied in never change)."""
    return {"outcome": line.outcome.value, "reason": line.reason, "detail": line.detail,
            "gateway_state": line.gateway_state, "idempotency_key": line.idempotency_key,
            "refund_kind": line.refund_kind, "refund_id": line.refund_id, "refund_error": line.refund_error}


class DisputeRepository:
    def __init__(self, db: Db) -> None:
        self.db = db
        # What each loaded case looked like: `save` writes only what changed since.
        self._loaded: dict[str, tuple[tuple[Any, ...], dict[str, tuple[Any, ...]]]] = {}

    # --- charges -----------------------------------------------------------------------------

    async def charges(self, charge_ids: list[str]) -> dict[str, Charge]:
        if not charge_ids:
            return {}
        return {r["charge_id"]: _charge(r) for r in await self.db.among(CHARGES_AMONG, charge_ids)}

    async def account_charges(self, account_id: str) -> list[Charge]:
        return [_charge(r) for r in await self.db.all(ACCOUNT_CHARGES, account_id=account_id)]

    # --- cases -------------------------------------------------------------------------------

    async def get(self, request_id: str) -> Case | None:
        row = await self.db.first(CASE, request_id=request_id)
        if row is None:
            return None
        lines = [_line(r, row["account_id"]) for r in await self.db.all(LINES, request_id=request_id)]
        case = Case(request_id=row["request_id"], account_id=row["account_id"], requested_by=row["requested_by"],
                    reason=row["reason"], charge_ids=list(row["charge_ids"]), window_hours=row["window_hours"],
                    opened_at=row["created_at"], state=State(row["state"]), error_code=row["error_code"],
                    lines=lines)
        self._loaded[request_id] = self._snapshot(case)
        return case

    async def save(self, case: Case) -> None:
        """The case, its changed lines and its new audit steps. Its events are the caller's to emit."""
        now = utcnow()
        before = self._loaded.get(case.request_id)
        if before is None:
            await self.db.run(ADD_CASE, request_id=case.request_id, account_id=case.account_id, state=case.state.value,
                              requested_by=case.requested_by, reason=case.reason, charge_ids=case.charge_ids,
                              window_hours=case.window_hours, error_code=case.error_code, created_at=case.opened_at,
                              updated_at=now)
            old_lines: dict[str, tuple[Any, ...]] = {}
        else:
            old_case, old_lines = before
            if old_case != self._snapshot(case)[0]:
                await self.db.run(SET_CASE, match_request_id=case.request_id, state=case.state.value,
                                  error_code=case.error_code, updated_at=now)
        new = [line for line in case.lines if line.charge_id not in old_lines]
        await self.db.run_many(ADD_LINE, [{
            "request_id": case.request_id, "charge_id": line.charge_id, "position": line.position, **_facts(line),
            "duplicate": "yes" if line.duplicate else "no", "related_charge_id": line.related_charge_id,
            **_line_values(line), "updated_at": now} for line in new])
        for line in case.lines:
            if line.charge_id in old_lines and old_lines[line.charge_id] != astuple(line):
                await self.db.run(SET_LINE, match_request_id=case.request_id, match_charge_id=line.charge_id,
                                  updated_at=now, **_line_values(line))
        await self.db.run_many(ADD_AUDIT, [{
            "request_id": case.request_id, "step": step.step, "actor": step.actor, "charge_id": step.charge_id,
            "message": step.message, "data": step.data, "at": now} for step in case.steps])
        self._loaded[case.request_id] = self._snapshot(case)
        case.steps.clear()

    @staticmethod
    def _snapshot(case: Case) -> tuple[tuple[Any, ...], dict[str, tuple[Any, ...]]]:
        return (case.state, case.error_code), {line.charge_id: astuple(line) for line in case.lines}

    async def awaiting_facts(self, account_id: str | None = None) -> list[str]:
        """Cases waiting for the facts of charges of `account_id` (None: of any account), oldest first."""
        if account_id is None:
            return [row["request_id"] for row in await self.db.all(ALL_AWAITING)]
        return [row["request_id"] for row in await self.db.all(AWAITING, account_id=account_id)]

    # --- read API ----------------------------------------------------------------------------

    async def case(self, request_id: str) -> dict[str, Any] | None:
        return await self.db.first(CASE, request_id=request_id)

    async def lines(self, request_id: str) -> list[dict[str, Any]]:
        return await self.db.all(LINES, request_id=request_id)

    async def audit_trail(self, request_id: str) -> list[dict[str, Any]]:
        return await self.db.all(AUDIT_TRAIL, request_id=request_id)
