"""Billing's own database: subscriptions, their history, scheduled billings, cancellations in flight."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    Integer,
    Numeric,
    String,
    Table,
    Text,
)

from cancelflow.columns import UtcDateTime
from cancelflow.messaging.store import service_metadata

metadata, messaging = service_metadata()

subscriptions = Table(
    "subscriptions", metadata,
    Column("subscription_id", String(100), primary_key=True),
    Column("account_id", String(100), nullable=False, index=True),
    Column("product_name", String(200), nullable=False),
    Column("vendor", String(100), nullable=False),
    Column("vendor_subscription_id", String(200), nullable=False),
    Column("billing_period", String(20), nullable=False),
    Column("unit_price", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("quantity", Integer, nullable=False),
    # The quantity when the current period began: the licenses a charge without its own quantity paid for.
    Column("period_quantity", Integer, nullable=True),
    Column("status", String(20), nullable=False),
    Column("trial", Boolean, nullable=False, default=False),
    Column("provisioning_status", String(30), nullable=False),
    Column("current_period_start", Date, nullable=False),
    Column("current_period_end", Date, nullable=False),
    Column("auto_renew", Boolean, nullable=False),
    Column("effective_date", Date, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

history = Table(
    "subscription_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    Column("request_id", String(64), nullable=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("message", Text, nullable=False),
)

scheduled_billings = Table(
    "scheduled_billings", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    Column("bill_on", Date, nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(20), nullable=False),  # scheduled | canceled
)

cancellations = Table(
    "cancellations", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("subscription_id", String(100), nullable=True, index=True),
    Column("account_id", String(100), nullable=False),
    Column("mode", String(20), nullable=False),
    # a cancellation.State value; its legal moves are cancellation.LEGAL
    Column("state", String(30), nullable=False),
    Column("effective_date", Date, nullable=True),
    Column("access_end_date", Date, nullable=True),
    Column("new_quantity", Integer, nullable=True),
    Column("run_on", Date, nullable=True),  # end_of_term: when the vendor-first steps run
    Column("request", JSON, nullable=True),  # the request as received, re-validated on approval
    Column("decided_by", String(200), nullable=True),
    Column("prior_status", String(20), nullable=True),
    Column("prior_provisioning_status", String(30), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Section 8 fault hook: the next platform commit for the subscription fails (embedded stack only).
armed_faults = Table(
    "armed_faults", metadata,
    Column("subscription_id", String(100), primary_key=True),
    Column("stage", String(20), nullable=False),
    Column("armed_at", UtcDateTime(), nullable=False),
)

# An operator's decision that arrived before its request (different partitions): applied on arrival.
parked_decisions = Table(
    "parked_decisions", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("decision", String(20), nullable=False),  # approved | declined
    Column("decided_by", String(200), nullable=False),
    Column("note", Text, nullable=False),
    Column("at", UtcDateTime(), nullable=False),
)

# Test and demo hook (POST /_clock with fault hooks on): days added to today; kept across restarts.
clock = Table(
    "clock", metadata,
    Column("id", Integer, primary_key=True),
    Column("offset_days", Integer, nullable=False),
)
