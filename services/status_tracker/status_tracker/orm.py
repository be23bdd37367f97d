"""The tracker's database: every request's current view (with the tracker's entry: version, event ids
folded, the saga partition), read by the API, the dashboard and the open-request gauges; and the
inbox and outbox. Every replica writes the rows of its partitions here, so any replica can answer a
query about any request."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Integer, String, Table, Text

from cancelflow.columns import UtcDateTime
from cancelflow.messaging.store import service_metadata

metadata, messaging = service_metadata()

views = Table(
    "request_views", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("state", String(30), nullable=True, index=True),
    Column("account_id", String(100), nullable=True, index=True),
    Column("subscription_id", String(100), nullable=True, index=True),
    Column("error_source", String(20), nullable=True, index=True),
    Column("version", Integer, nullable=False),
    Column("view", JSON, nullable=False),  # tracking.document(): the status fields, emails, errors
    Column("created_at", UtcDateTime(), nullable=False, index=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Every operator action, allowed or refused (CONTRACT.md section 11): who, when, what, on which
# request, and the answer they got.
audit = Table(
    "operator_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime(), nullable=False, index=True),
    Column("operator", String(100), nullable=False),
    Column("role", String(20), nullable=False),
    Column("action", String(30), nullable=False),
    Column("request_id", String(64), nullable=True, index=True),
    Column("new_request_id", String(64), nullable=True),
    Column("status", Integer, nullable=False),  # the HTTP answer
    Column("outcome", Text, nullable=False),
    Column("note", Text, nullable=True),
    sqlite_autoincrement=True,
)

# One decision (approve/decline) and one resolution (retry/resolve) per request: a second operator's
# click, or the same click twice, gets 409 instead of a second retry or refund.
claims = Table(
    "operator_claims", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("phase", String(20), primary_key=True),  # decision | resolution
    Column("action", String(30), nullable=False),
    Column("operator", String(100), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
)
