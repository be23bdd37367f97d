"""Builds provisioning: the vendor client and the saga route."""

from __future__ import annotations

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime
from cancelflow.settings import service_settings
from provisioning import orm
from provisioning.adapters.vendor import VendorClient
from provisioning.handlers import ProvisioningHandlers


def build() -> ServiceRuntime:
    settings = service_settings("provisioning")
    runtime = ServiceRuntime("provisioning", settings, orm.metadata, orm.messaging)
    vendor = VendorClient(settings.vendor_url, timeout=settings.vendor_timeout_s,
                          attempts=settings.vendor_attempts)
    handlers = ProvisioningHandlers(vendor)
    runtime.add_route(Route(topics.SAGA, {
        "VendorCancellationRequested": handlers.vendor_cancellation_requested,
    }, rounds=True))
    runtime.on_start.append(vendor.start)
    runtime.on_stop.append(vendor.close)
    return runtime
