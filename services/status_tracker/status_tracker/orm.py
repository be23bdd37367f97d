"""The tracker's database: the current view of each request (the source of every status record)."""

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
    Column("version", Integer, nullable=False),
    Column("view", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
