"""Alembic environment of the payment_gateway database: the models are payment_gateway.orm.metadata."""

from cancelflow.migrations import run_env
from payment_gateway import orm

run_env(orm.metadata)
