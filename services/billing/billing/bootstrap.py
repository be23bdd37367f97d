"""Builds billing: its settings, database, routes and HTTP fault hook."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from billing import orm
from billing.clock import MAX_OFFSET_DAYS, Clock
from billing.handlers import AWAITING_FACTS, BillingHandlers
from billing.locks import OverdueLocks
from billing.repository import BillingRepository
from billing.scheduler import EndOfTermScheduler
from billing.settings import Settings
from cancelflow import topics
from cancelflow.events import (
    CancellationApproved,
    CancellationDeclined,
    CancellationRequested,
    RequestStuck,
    Source,
    SubscriptionActivated,
    VendorCancellationFailed,
    VendorProvisioned,
)
from cancelflow.messaging.dispatch import Route
from cancelflow.messaging.facts import FactsWaiter
from cancelflow.service import ServiceRuntime
from cancelflow.sql import Db


def build() -> ServiceRuntime:
    settings = Settings()
    runtime = ServiceRuntime("billing", settings, orm.metadata, orm.messaging, failure_source=Source.platform)
    clock = Clock(settings.clock_offset_days)
    handlers = BillingHandlers(clock, runtime.facts)
    scheduler = EndOfTermScheduler(runtime.new_uow, handlers.start_scheduled, clock,
                                   interval_s=settings.scheduler_interval_s)
    handlers.on_scheduled = scheduler.notify
    waiter = FactsWaiter(runtime.new_uow, lambda uow: BillingRepository(uow.db).awaiting_facts(),
                         handlers.settle_waiting)
    runtime.wake_on(AWAITING_FACTS, waiter.notify)
    runtime.on_start.append(lambda: clock.load(runtime.sessions))
    locks = OverdueLocks(runtime.new_uow, handlers.release_lock, stuck_after_s=settings.stuck_after_s)
    runtime.tasks += [scheduler.run, waiter.run, locks.run]
    runtime.routes += routes(handlers)
    runtime.add_view("/subscriptions/{subscription_id}", _subscription, missing="unknown subscription")
    if settings.enable_fault_hooks:
        runtime.http.router.add_post("/_faults", _arm_fault(runtime))
        runtime.http.router.add_post("/_clock", _set_clock(runtime, clock, scheduler))
    return runtime


def routes(handlers: BillingHandlers) -> list[Route]:
    """What billing consumes, and the handler of each event (the consume loop's and the tests')."""
    return [
        Route(topics.PLATFORM_SUBSCRIPTIONS, dead_letter=True, batch=True, facts=True)
        .on(SubscriptionActivated, handlers.subscription_activated),
        Route(topics.REQUESTED, dead_letter=True, batch=True)
        .on(CancellationRequested, handlers.cancellation_requested)
        .on(CancellationApproved, handlers.cancellation_approved)
        .on(CancellationDeclined, handlers.cancellation_declined),
        Route(topics.SAGA, batch=True)
        .on(VendorProvisioned, handlers.vendor_provisioned)
        .on(VendorCancellationFailed, handlers.vendor_failed)
        .on(RequestStuck, handlers.request_stuck),
    ]


async def _json_object(request: web.Request) -> dict:
    """The body as a JSON object, or {} (the hooks then say what they need)."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _arm_fault(runtime: ServiceRuntime):
    async def arm(request: web.Request) -> web.Response:
        body = await _json_object(request)
        subscription_id, stage = body.get("subscription_id"), body.get("stage", "commit")
        if not isinstance(subscription_id, str) or stage != "commit":
            return web.json_response({"error": "need subscription_id and stage 'commit'"}, status=400)
        async with runtime.sessions() as session, session.begin():
            await BillingRepository(Db(session)).arm_fault(subscription_id, stage)
        return web.json_response({"armed": {"subscription_id": subscription_id, "stage": stage}}, status=201)

    return arm


def _set_clock(runtime: ServiceRuntime, clock: Clock, scheduler: EndOfTermScheduler):
    """Test/demo hook: move billing's today by `offset_days` (end-of-term runs without waiting a month)."""

    async def set_clock(request: web.Request) -> web.Response:
        body = await _json_object(request)
        offset = body.get("offset_days")
        if not isinstance(offset, int) or isinstance(offset, bool) or abs(offset) > MAX_OFFSET_DAYS:
            return web.json_response({"error": f"need an integer offset_days between -{MAX_OFFSET_DAYS} and "
                                               f"{MAX_OFFSET_DAYS}"}, status=400)
        await clock.set_offset(runtime.sessions, offset)
        scheduler.notify()
        return web.json_response({"today": clock.today().isoformat(), "offset_days": offset})

    return set_clock


async def _subscription(db: Db, subscription_id: str) -> dict[str, Any] | None:
    """The subscription, its history records and its billings, for operators and the CLI."""
    repo = BillingRepository(db)
    row = await repo.subscription(subscription_id)
    if row is None:
        return None
    return {"subscription": row, "history": await repo.history(subscription_id),
            "billings": await repo.billings(subscription_id)}
