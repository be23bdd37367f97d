"""Alembic migrations of the notification database (PostgreSQL); see cancelflow.migrations."""
