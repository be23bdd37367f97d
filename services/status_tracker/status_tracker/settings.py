"""The status tracker's settings: STATUS_DATABASE_URL, STATUS_HTTP_PORT (default 8080) and what every service reads."""

from cancelflow.settings import ServiceSettings

Settings = ServiceSettings.named("status_tracker", prefix="STATUS", port=8080)
