"""The tracker's database: every request's current view (with the tracker's entry: version, event ids
folded, the saga partition), read by the API, the dashboard and the open-request gauges; and the
inbox and outbox. Every replica writes the rows of its partitions here, so any replica can answer a
query about any request."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table

from cancelflow.messaging.store import messaging_tables

metadata = MetaData()
messaging = messaging_tables(metadata)

views = Table(
    "request_views", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("state", String(30), nullable=True, index=True),
    Column("account_id", String(100), nullable=True, index=True),
    Column("subscription_id", String(100), nullable=True, index=True),
    Column("error_source", String(20), nullable=True, index=True),
    Column("version", Integer, nullable=False),
    Column("view", JSON, nullable=False),  # tracking.document(): the status fields, emails, errors
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
