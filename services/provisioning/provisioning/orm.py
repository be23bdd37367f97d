"""Provisioning's own database: one row per vendor operation, written before the call is made."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Date, Integer, String, Table, Text

from cancelflow.columns import UtcDateTime
from cancelflow.messaging.store import service_metadata

metadata, messaging = service_metadata()

vendor_operations = Table(
    "vendor_operations", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    Column("vendor", String(100), nullable=False),
    Column("vendor_subscription_id", String(200), nullable=False),
    Column("operation", String(20), nullable=False),  # cancel | set_quantity
    Column("effective_date", Date, nullable=False),
    Column("current_quantity", Integer, nullable=False),
    Column("new_quantity", Integer, nullable=False),
    Column("status", String(20), nullable=False),  # pending | succeeded | failed
    Column("already_applied", Boolean, nullable=True),
    Column("code", String(50), nullable=True),
    Column("message", Text, nullable=True),
    Column("http_status", Integer, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("started_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime(), nullable=True),
)
