"""Alembic migrations of the provisioning database (PostgreSQL); see cancelflow.migrations."""
