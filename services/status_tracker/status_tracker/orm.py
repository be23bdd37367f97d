"""The tracker's database: a read model of every request's current view, for the read API, the
dashboard and the open-request gauges. The faust table `views` is the source of truth (it decides
versions and drops redelivered events); every replica writes the rows of its partitions here, so any
replica can answer a query about any request."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table

metadata = MetaData()

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
