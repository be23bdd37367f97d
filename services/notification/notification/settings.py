"""Notification's settings: NOTIFICATION_DATABASE_URL, NOTIFICATION_HTTP_PORT (default 8085) and what every service reads."""

from cancelflow.settings import ServiceSettings

Settings = ServiceSettings.named("notification", prefix="NOTIFICATION", port=8085)
