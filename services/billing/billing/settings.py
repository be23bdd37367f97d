"""Billing's settings: BILLING_DATABASE_URL, BILLING_HTTP_PORT (default 8081) and what every service reads."""

from cancelflow.settings import ServiceSettings

Settings = ServiceSettings.named("billing", prefix="BILLING", port=8081)
