"""Builds billing: its settings, database, routes and HTTP fault hook."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web
from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime, json_response
from cancelflow.settings import service_settings

from billing import orm
from billing.handlers import BillingHandlers
from billing.repository import BillingRepository


def today():  # type: ignore[no-untyped-def]
    return datetime.now(UTC).date()


def build() -> ServiceRuntime:
    settings = service_settings("billing")
    runtime = ServiceRuntime("billing", settings, orm.metadata, orm.messaging)
    handlers = BillingHandlers(today=today)
    runtime.add_route(Route(topics.PLATFORM_SUBSCRIPTIONS, {
        "SubscriptionActivated": handlers.subscription_activated,
    }, dead_letter=True))
    runtime.add_route(Route(topics.REQUESTED, {
        "CancellationRequested": handlers.cancellation_requested,
    }, dead_letter=True))
    runtime.add_route(Route(topics.SAGA, {
        "VendorProvisioned": handlers.vendor_provisioned,
        "VendorCancellationFailed": handlers.vendor_failed,
    }))
    runtime.http.router.add_get("/subscriptions/{subscription_id}", _subscription_view(runtime))
    if settings.enable_fault_hooks:
        runtime.http.router.add_post("/_faults", _arm_fault(runtime))
    return runtime


def _arm_fault(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    async def arm(request: web.Request) -> web.Response:
        body = await request.json()
        subscription_id, stage = body.get("subscription_id"), body.get("stage", "commit")
        if not isinstance(subscription_id, str) or stage != "commit":
            return web.json_response({"error": "need subscription_id and stage 'commit'"}, status=400)
        async with runtime.sessions() as session, session.begin():
            await BillingRepository(session).arm_fault(subscription_id, stage)
        return web.json_response({"armed": {"subscription_id": subscription_id, "stage": stage}}, status=201)

    return arm


def _subscription_view(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    """Read-only: the subscription and its history records, for operators and the CLI."""

    async def view(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            repo = BillingRepository(session)
            row = await repo.subscription(request.match_info["subscription_id"])
            if row is None:
                return web.json_response({"error": "unknown subscription"}, status=404)
            history = await repo.history(row["subscription_id"])
        return json_response({"subscription": row, "history": history})

    return view
