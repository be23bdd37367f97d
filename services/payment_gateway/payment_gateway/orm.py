"""The payment-gateway service's database: its copy of charges with the refund guard, and refunds."""

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
    # The guard: what has been refunded or reserved for a refund in flight; never above `amount`.
    Column("refunded_amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("captured_at", DateTime(timezone=True), nullable=False),
    Column("period_start", Date, nullable=False),
    Column("period_end", Date, nullable=False),
)

refunds = Table(
    "refunds", metadata,
    Column("idempotency_key", String(200), primary_key=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("charge_id", String(100), nullable=False, index=True),
    Column("gateway_charge_id", String(200), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(20), nullable=False),  # pending | succeeded | failed
    Column("kind", String(20), nullable=True),  # refund | reversal (the gateway decides)
    Column("refund_id", String(200), nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

schedule_stops = Table(
    "schedule_stops", metadata,
    Column("subscription_id", String(100), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("stopped_at", DateTime(timezone=True), nullable=False),
)
