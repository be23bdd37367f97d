"""Alembic migrations of the payment_gateway database (PostgreSQL); see cancelflow.migrations."""
