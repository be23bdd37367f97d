"""What every service's schema shares, on SQLite and PostgreSQL: the inbox and outbox its revisions
create with cancelflow.migrations' helpers are the tables messaging/store.py declares."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, inspect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from cancelflow import migrations
from cancelflow.messaging.store import messaging_tables
from tests.conftest import DatabaseFactory


async def test_the_shared_inbox_and_outbox_revisions_give_the_models(store: DatabaseFactory) -> None:
    metadata = MetaData()
    messaging_tables(metadata)

    def create_and_compare(connection: Any) -> tuple[list[Any], set[str]]:
        from alembic.operations import Operations
        from alembic.runtime.migration import MigrationContext

        with Operations.context(MigrationContext.configure(connection)):
            migrations.create_inbox_and_outbox()
            migrations.create_inbox_processed_at_index()
        return migrations.differences_sync(connection, metadata), set(inspect(connection).get_table_names())

    engine = create_async_engine(store("messaging_revisions"), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            differences, tables = await conn.run_sync(create_and_compare)
    finally:
        await engine.dispose()
    assert differences == [] and tables == {"inbox", "outbox"}
