"""Alembic environment of the notification database: the models are notification.orm.metadata."""

from cancelflow.migrations import run_env
from notification import orm

run_env(orm.metadata)
