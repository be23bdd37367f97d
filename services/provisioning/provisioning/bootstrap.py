"""Builds provisioning: the vendor client and the saga route."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.events import Source, VendorCancellationRequested
from cancelflow.messaging.dispatch import Route
from cancelflow.service import ServiceRuntime, json_response
from cancelflow.sql import Db, Query
from provisioning import orm
from provisioning.adapters.vendor import VendorClient
from provisioning.handlers import ProvisioningHandlers
from provisioning.settings import Settings


def build() -> ServiceRuntime:
    settings = Settings()
    runtime = ServiceRuntime("provisioning", settings, orm.metadata, orm.messaging, failure_source=Source.vendor)
    vendor = VendorClient(settings.vendor_url, timeout=settings.vendor_timeout_s,
                          attempts=settings.vendor_attempts)
    handlers = ProvisioningHandlers(vendor)
    runtime.routes += routes(handlers)
    runtime.http.router.add_get("/subscriptions/{subscription_id}/operations", _operations_view(runtime))
    runtime.on_start.append(vendor.start)
    runtime.on_stop.append(vendor.close)
    return runtime


def routes(handlers: ProvisioningHandlers) -> list[Route]:
    """What provisioning consumes, and the handler of each event (the consume loop's and the tests')."""
    return [Route(topics.SAGA, rounds=True)
            .on(VendorCancellationRequested, handlers.vendor_cancellation_requested)]


OPERATIONS = Query(select(orm.vendor_operations)
                   .where(orm.vendor_operations.c.subscription_id == bindparam("subscription_id"))
                   .order_by(orm.vendor_operations.c.started_at))


def _operations_view(runtime: ServiceRuntime):
    """Read-only: every vendor operation of a subscription (empty when there was none)."""

    async def view(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            rows = await Db(session).all(OPERATIONS, subscription_id=request.match_info["subscription_id"])
        return json_response({"operations": rows})

    return view
