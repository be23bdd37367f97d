"""Dispute's settings: DISPUTE_DATABASE_URL, DISPUTE_HTTP_PORT (default 8084) and what every service reads."""

from cancelflow.settings import ServiceSettings

Settings = ServiceSettings.named("dispute", prefix="DISPUTE", port=8084)
