"""Notification's database: contacts (its copy of customer facts), request context, owed emails."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from cancelflow.columns import UtcDateTime
from cancelflow.messaging.store import service_metadata

metadata, messaging = service_metadata()

contacts = Table(
    "contacts", metadata,
    Column("subscription_id", String(100), primary_key=True),
    Column("account_id", String(100), nullable=False, index=True),
    Column("email", String(320), nullable=False),
    Column("name", String(200), nullable=False),
    Column("product_name", String(200), nullable=False),
)

requests = Table(
    "requests", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("account_id", String(100), nullable=False),
    Column("subscription_id", String(100), nullable=True),
    Column("target", String(20), nullable=False),
    Column("mode", String(20), nullable=False),
    Column("opt_out_of_emails", Boolean, nullable=False),
    # what later steps taught us (effective date, vendor, quantities), for the email's context
    Column("facts", JSON, nullable=False),
)

emails = Table(
    "emails", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("kind", String(50), nullable=False),
    Column("audience", String(20), nullable=False),
    Column("subject", Text, nullable=False),
    # Derived from (request, kind): the unique key that makes an owed email exist once.
    Column("message_id", String(300), nullable=False, unique=True),
    # pending -> sending -> sent (or failed: refused for good); awaiting_contact -> pending once the
    # customer's address is known; suppressed: the account opted out (sender.py, handlers.py).
    Column("status", String(20), nullable=False),
    Column("raw", LargeBinary, nullable=True),
    # The render context of an email owed to a customer whose address is not known yet.
    Column("context", JSON, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    # When the last handover to SMTP started (status `sending`): recorded before the send.
    Column("attempted_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime(), nullable=True),
)

opt_outs = Table(
    "opt_outs", metadata,
    Column("account_id", String(100), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
)
