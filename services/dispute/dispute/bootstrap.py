"""Builds the dispute service."""

from __future__ import annotations

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime
from cancelflow.settings import service_settings
from dispute import orm
from dispute.handlers import DisputeHandlers


def build() -> ServiceRuntime:
    settings = service_settings("dispute")
    runtime = ServiceRuntime("dispute", settings, orm.metadata, orm.messaging)
    handlers = DisputeHandlers()
    runtime.add_route(Route(topics.PAYMENTS_CHARGES, {"ChargeCaptured": handlers.charge_captured}))
    runtime.add_route(Route(topics.SAGA, {"CancellationReceived": handlers.cancellation_received}))
    return runtime
