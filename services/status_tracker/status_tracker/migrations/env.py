"""Alembic environment of the status_tracker database: the models are status_tracker.orm.metadata."""

from cancelflow.migrations import run_env
from status_tracker import orm

run_env(orm.metadata)
