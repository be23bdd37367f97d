"""Provisioning's settings: PROVISIONING_DATABASE_URL, PROVISIONING_HTTP_PORT (default 8082) and what every service reads."""

from cancelflow.settings import ServiceSettings

Settings = ServiceSettings.named("provisioning", prefix="PROVISIONING", port=8082)
