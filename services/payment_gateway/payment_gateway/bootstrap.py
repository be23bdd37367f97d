"""Builds the payment-gateway service: the gateway client, the charges copy and the money step."""

from __future__ import annotations

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime
from cancelflow.settings import service_settings
from payment_gateway import orm
from payment_gateway.adapters.gateway import GatewayClient
from payment_gateway.handlers import PaymentHandlers


def build() -> ServiceRuntime:
    settings = service_settings("payment_gateway")
    runtime = ServiceRuntime("payment_gateway", settings, orm.metadata, orm.messaging)
    gateway = GatewayClient(settings.gateway_url, timeout=settings.gateway_timeout_s,
                            attempts=settings.gateway_attempts)
    handlers = PaymentHandlers(gateway)
    runtime.add_route(Route(topics.PAYMENTS_CHARGES, {"ChargeCaptured": handlers.charge_captured},
                            dead_letter=True))
    runtime.add_route(Route(topics.SAGA, {"PlatformCommitted": handlers.platform_committed}))
    runtime.on_start.append(gateway.start)
    runtime.on_stop.append(gateway.close)
    return runtime
