"""The dispute service's database: its own copy of charges (facts it may keep) and its cases."""

from __future__ import annotations

from sqlalchemy import Column, Date, DateTime, MetaData, Numeric, String, Table, Text

from cancelflow.messaging.store import messaging_tables

metadata = MetaData()
messaging = messaging_tables(metadata)

charges = Table(
    "charges", metadata,
    Column("charge_id", String(100), primary_key=True),
    Column("account_id", String(100), nullable=False, index=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    Column("gateway_charge_id", String(200), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("captured_at", DateTime(timezone=True), nullable=False),
    Column("period_start", Date, nullable=False),
    Column("period_end", Date, nullable=False),
)

cases = Table(
    "cases", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("account_id", String(100), nullable=False),
    Column("state", String(30), nullable=False),
    Column("note", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
