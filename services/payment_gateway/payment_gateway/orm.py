"""The payment-gateway service's database: its copy of charges with the refund guard, refunds, and the
cancellations whose refund waits for their charges' facts."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Date, Integer, Numeric, String, Table, Text

from cancelflow.columns import UtcDateTime
from cancelflow.messaging.store import service_metadata

metadata, messaging = service_metadata()

charges = Table(
    "charges", metadata,
    Column("charge_id", String(100), primary_key=True),
    Column("account_id", String(100), nullable=False, index=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    # Records naming the same gateway charge share one refundable balance (the guard, Ledger.reserve).
    Column("gateway_charge_id", String(200), nullable=False, index=True),
    Column("amount", Numeric(12, 2), nullable=False),
    # The guard: what has been refunded or reserved for a refund in flight through this record; with
    # the other records of its gateway charge, never above the charge's amount.
    Column("refunded_amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("captured_at", UtcDateTime(), nullable=False),
    Column("period_start", Date, nullable=False),
    Column("period_end", Date, nullable=False),
    Column("quantity", Integer, nullable=True),  # the licenses it pays for, when upstream said
)

refunds = Table(
    "refunds", metadata,
    Column("idempotency_key", String(200), primary_key=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("charge_id", String(100), nullable=False, index=True),
    Column("gateway_charge_id", String(200), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    # pending | succeeded | failed | not_due (licenses removed, nothing left to refund of them)
    Column("status", String(20), nullable=False),
    Column("kind", String(20), nullable=True),  # refund | reversal (the gateway decides)
    Column("refund_id", String(200), nullable=True),
    Column("error", Text, nullable=True),
    # A cancellation refund's basis (CONTRACT.md section 5); null for duplicate-charge refunds.
    Column("licenses", Integer, nullable=True),  # licenses this refund removed from the charge
    Column("licenses_paid", Integer, nullable=True),  # licenses the charge paid for
    Column("effective_date", Date, nullable=True),  # where the unused days begin
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

schedule_stops = Table(
    "schedule_stops", metadata,
    Column("subscription_id", String(100), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("stopped_at", UtcDateTime(), nullable=False),
)

# A cancellation met before the charges that paid for its period were read (a backlog after a restart):
# its refund waits here, and is decided once they come, or the facts are read up to it, or after a bound.
refund_waits = Table(
    "refund_waits", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    Column("event", JSON, nullable=False),  # the PlatformCommitted, decided when the wait ends
    Column("occurred_at", UtcDateTime(), nullable=False),  # the event's: the facts must reach it
    Column("created_at", UtcDateTime(), nullable=False),  # when it began waiting: the bound
)
