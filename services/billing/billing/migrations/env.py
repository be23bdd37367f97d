"""Alembic environment of the billing database: the models are billing.orm.metadata."""

from billing import orm
from cancelflow.migrations import run_env

run_env(orm.metadata)
