"""The dispute service's database: its own copy of charges (facts it may keep), the dispute cases,
what became of each listed charge, and the audit trail of every step."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
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

charges = Table(
    "charges", metadata,
    Column("charge_id", String(100), primary_key=True),
    Column("account_id", String(100), nullable=False, index=True),
    Column("subscription_id", String(100), nullable=False, index=True),
    Column("gateway_charge_id", String(200), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("captured_at", UtcDateTime(), nullable=False),
    Column("period_start", Date, nullable=False),
    Column("period_end", Date, nullable=False),
)

# One per request (target `charges`): dispute.domain.Case; its state moves by domain.TRANSITIONS.
disputes = Table(
    "disputes", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("account_id", String(100), nullable=False, index=True),
    Column("state", String(30), nullable=False),
    Column("requested_by", String(250), nullable=False),  # domain.requester: role, user id, channel
    Column("reason", Text, nullable=True),
    Column("charge_ids", JSON, nullable=False),
    Column("window_hours", Integer, nullable=False),
    Column("error_code", String(50), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# What became of each listed charge. Transaction facts are copied in (not for charges of another
# account: a rejected request keeps only the id and the code).
dispute_charges = Table(
    "dispute_charges", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("charge_id", String(100), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("subscription_id", String(100), nullable=True),
    Column("gateway_charge_id", String(200), nullable=True),
    Column("amount", Numeric(12, 2), nullable=True),
    Column("currency", String(3), nullable=True),
    Column("captured_at", UtcDateTime(), nullable=True),
    Column("duplicate", String(5), nullable=False),  # "yes" | "no": the detection verdict
    Column("reason", String(40), nullable=False),  # dispute.domain.Reason
    Column("detail", Text, nullable=False),  # the reason, readable
    Column("related_charge_id", String(100), nullable=True),  # what it duplicates / is compared with
    Column("gateway_state", String(30), nullable=True),
    Column("outcome", String(30), nullable=False),  # dispute.domain.Outcome
    Column("idempotency_key", String(200), nullable=True),
    Column("refund_kind", String(20), nullable=True),
    Column("refund_id", String(200), nullable=True),
    Column("refund_error", Text, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# The audit trail: every step with time, actor and data, in order.
audit = Table(
    "dispute_audit", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("step", String(40), nullable=False),
    Column("actor", String(250), nullable=False),
    Column("charge_id", String(100), nullable=True),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=False),
    Column("at", UtcDateTime(), nullable=False),
)
