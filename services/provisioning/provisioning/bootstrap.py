"""Builds provisioning: the vendor client and the saga route."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.events import Source, VendorCancellationRequested
from cancelflow.messaging.dispatch import Route
from cancelflow.service import ServiceRuntime
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
    runtime.add_view("/subscriptions/{subscription_id}/operations", _operations)
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


async def _operations(db: Db, subscription_id: str) -> dict[str, Any]:
    """Every vendor operation of a subscription (empty when there was none)."""
    return {"operations": await db.all(OPERATIONS, subscription_id=subscription_id)}
