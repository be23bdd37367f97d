"""Builds the dispute service: its charges copy, the multiple-charge flow, and the read API
(`GET /disputes/{request_id}`: the case, each listed charge's outcome and the audit trail; no PII)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
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
from cancelflow.service import ServiceRuntime, json_response
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
    runtime.http.router.add_get("/disputes/{request_id}", _dispute_view(runtime))
    runtime.http.router.add_get("/charges/{charge_id}", _charge_view(runtime))
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


def _dispute_view(runtime: ServiceRuntime):
    async def view(request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        async with runtime.sessions() as session:
            repo = DisputeRepository(Db(session))
            case = await repo.case(request_id)
            if case is None:
                return json_response({"error": "unknown dispute"}, 404)
            lines = await repo.lines(request_id)
            trail = await repo.audit_trail(request_id)
        charges = [_utc({k: v for k, v in line.items() if k != "request_id"}) for line in lines]
        audit = [_utc({k: v for k, v in entry.items() if k != "request_id"}) for entry in trail]
        return json_response({"dispute": _utc(case), "charges": charges, "audit": audit})

    return view


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    """Timestamps as RFC 3339 UTC (SQLite hands them back without their zone)."""
    return {k: (v.replace(tzinfo=UTC) if v.tzinfo is None else v).isoformat() if isinstance(v, datetime) else v
            for k, v in row.items()}


def _charge_view(runtime: ServiceRuntime):
    """Whether the dispute service has a charge (its copy from payments.charges)."""

    async def view(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            row = await Db(session).first(CHARGE, charge_id=request.match_info["charge_id"])
        if row is None:
            return json_response({"error": "unknown charge"}, 404)
        return json_response({"charge": _utc(row)})

    return view
