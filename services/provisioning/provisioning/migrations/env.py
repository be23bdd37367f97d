"""Alembic environment of the provisioning database: the models are provisioning.orm.metadata."""

from cancelflow.migrations import run_env
from provisioning import orm

run_env(orm.metadata)
