"""Alembic environment of the dispute database: the models are dispute.orm.metadata."""

from cancelflow.migrations import run_env
from dispute import orm

run_env(orm.metadata)
