"""Alembic migrations of the status_tracker database (PostgreSQL); see cancelflow.migrations."""
