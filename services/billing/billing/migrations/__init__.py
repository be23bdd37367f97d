"""Alembic migrations of the billing database (PostgreSQL); see cancelflow.migrations."""
