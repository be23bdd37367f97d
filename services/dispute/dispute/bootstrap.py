"""Builds the dispute service: its charges copy, the multiple-charge flow, and the read API
(`GET /disputes/{request_id}`: the case, each listed charge's outcome and the audit trail; no PII)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.messaging.facts import FactsWaiter
from cancelflow.service import ServiceRuntime, json_response
from cancelflow.settings import service_settings
from cancelflow.sql import Db, Query
from dispute import orm
from dispute.handlers import AWAITING_FACTS, DisputeHandlers
from dispute.repository import DisputeRepository

CHARGE = Query(select(orm.charges).where(orm.charges.c.charge_id == bindparam("charge_id")))


def build() -> ServiceRuntime:
    settings = service_settings("dispute")
    runtime = ServiceRuntime("dispute", settings, orm.metadata, orm.messaging)
    handlers = DisputeHandlers(window_hours=settings.duplicate_window_hours, facts=runtime.facts)
    waiter = FactsWaiter(runtime.new_uow, lambda uow: DisputeRepository(uow.db).awaiting_facts(),
                         handlers.settle_waiting)
    runtime.wake_on(AWAITING_FACTS, waiter.notify)
    runtime.tasks.append(waiter.run)
    runtime.add_route(Route(topics.PAYMENTS_CHARGES, {"ChargeCaptured": handlers.charge_captured}, batch=True,
                            facts=True))
    runtime.add_route(Route(topics.SAGA, {
        "CancellationReceived": handlers.cancellation_received,
        "ChargesVerified": handlers.charges_verified,
        "DuplicateRefundsIssued": handlers.duplicate_refunds_issued,
    }, batch=True))
    runtime.http.router.add_get("/disputes/{request_id}", _dispute_view(runtime))
    runtime.http.router.add_get("/charges/{charge_id}", _charge_view(runtime))
    return runtime


def _dispute_view(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
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
    """Timestamps as RFC 3339 UTC."""
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _charge_view(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    """Whether the dispute service has a charge (its copy from payments.charges)."""

    async def view(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            row = await Db(session).first(CHARGE, charge_id=request.match_info["charge_id"])
        if row is None:
            return json_response({"error": "unknown charge"}, 404)
        return json_response({"charge": _utc(row)})

    return view
