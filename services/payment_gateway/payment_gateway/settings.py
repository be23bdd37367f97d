"""Payment-gateway's settings: PAYMENT_GATEWAY_DATABASE_URL, PAYMENT_GATEWAY_HTTP_PORT (default 8083) and what every service reads."""

from cancelflow.settings import ServiceSettings

Settings = ServiceSettings.named("payment_gateway", prefix="PAYMENT_GATEWAY", port=8083)
