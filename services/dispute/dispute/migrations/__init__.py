"""Alembic migrations of the dispute database (PostgreSQL); see cancelflow.migrations."""
