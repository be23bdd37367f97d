"""Builds the dispute service: its charges copy, the multiple-charge flow, and the read API
(`GET /disputes/{request_id}`: the case, each listed charge's outcome and the audit trail; no PII)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.events import (
    CancellationReceived,
    ChargeCaptured,
    ChargesVerified,
    DuplicateRefundsIssued,
    Source,
)
from cancelflow.messaging.dispatch import Route
from cancelflow.messaging.facts import FactsWaiter
from cancelflow.service import ServiceRuntime
from cancelflow.sql import Db, Query
from dispute import orm
from dispute.handlers import AWAITING_FACTS, DisputeHandlers
from dispute.repository import DisputeRepository
from dispute.settings import Settings

CHARGE = Query(select(orm.charges).where(orm.charges.c.charge_id == bindparam("charge_id")))


def build() -> ServiceRuntime:
    settings = Settings()
    runtime = ServiceRuntime("dispute", settings, orm.metadata, orm.messaging, failure_source=Source.payment)
    handlers = DisputeHandlers(window_hours=settings.duplicate_window_hours, facts=runtime.facts)
    waiter = FactsWaiter(runtime.new_uow, lambda uow: DisputeRepository(uow.db).awaiting_facts(),
                         handlers.settle_waiting)
    runtime.wake_on(AWAITING_FACTS, waiter.notify)
    runtime.tasks.append(waiter.run)
    runtime.routes += routes(handlers)
    runtime.add_view("/disputes/{request_id}", _dispute, missing="unknown dispute")
    runtime.add_view("/charges/{charge_id}", _charge, missing="unknown charge")
    return runtime


def routes(handlers: DisputeHandlers) -> list[Route]:
    """What dispute consumes, and the handler of each event (the consume loop's and the tests')."""
    return [
        Route(topics.PAYMENTS_CHARGES, batch=True, facts=True).on(ChargeCaptured, handlers.charge_captured),
        Route(topics.SAGA, batch=True)
        .on(CancellationReceived, handlers.cancellation_received)
        .on(ChargesVerified, handlers.charges_verified)
        .on(DuplicateRefundsIssued, handlers.duplicate_refunds_issued),
    ]


async def _dispute(db: Db, request_id: str) -> dict[str, Any] | None:
    repo = DisputeRepository(db)
    case = await repo.case(request_id)
    if case is None:
        return None
    charges = [_without_request(line) for line in await repo.lines(request_id)]
    audit = [_without_request(entry) for entry in await repo.audit_trail(request_id)]
    return {"dispute": case, "charges": charges, "audit": audit}


def _without_request(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "request_id"}


async def _charge(db: Db, charge_id: str) -> dict[str, Any] | None:
    """Whether the dispute service has a charge (its copy from payments.charges)."""
    row = await db.first(CHARGE, charge_id=charge_id)
    return None if row is None else {"charge": row}
