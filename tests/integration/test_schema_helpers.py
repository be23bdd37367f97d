"""What every service's schema shares, on SQLite and PostgreSQL: the inbox and outbox its revisions
create with cancelflow.migrations' helpers are the tables messaging/store.py declares, and a
`UtcDateTime` column hands back aware UTC timestamps on every path (SQLAlchemy's and cancelflow.sql's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, func, insert, inspect, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from cancelflow import migrations
from cancelflow.columns import UtcDateTime
from cancelflow.db import create_schema, make_engine, session_factory, transactions
from cancelflow.messaging.store import messaging_tables
from cancelflow.sql import Db, Query
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


def test_autogenerate_writes_our_column_types_as_sqlalchemy_types() -> None:
    from alembic.autogenerate import render_python_code
    from alembic.operations import ops

    table = Table("stamps", MetaData(), Column("id", Integer, primary_key=True), Column("at", UtcDateTime()))
    code = render_python_code(ops.UpgradeOps([ops.CreateTableOp.from_table(table)]),
                              render_item=migrations._render_item)
    assert "sa.DateTime(timezone=True)" in code and "UtcDateTime" not in code


stamps = Table("stamps", MetaData(), Column("id", String(10), primary_key=True), Column("at", UtcDateTime()),
               Column("n", Integer, nullable=True))
ADD_STAMP = Query(insert(stamps))
STAMPS = Query(select(stamps.c.id, stamps.c.at).order_by(stamps.c.id))
EARLIEST = Query(select(func.min(stamps.c.at).label("at")).where(stamps.c.n == bindparam("n")))

NOON = datetime(2026, 12, 7, 12, 0, 0, 250000, tzinfo=UTC)


async def test_utc_datetime_comes_back_aware_utc(store: DatabaseFactory) -> None:
    engine = make_engine(store("utc"))
    await create_schema(engine, stamps.metadata)
    written = {"aware": NOON, "offset": NOON.astimezone(timezone(timedelta(hours=2))),
               "naive": NOON.replace(tzinfo=None)}  # naive values are UTC by convention
    try:
        async with transactions(engine)() as tx, tx.begin():  # cancelflow.sql's direct path
            await Db(tx).run_many(ADD_STAMP, [{"id": k, "at": v, "n": 1} for k, v in written.items()])
        async with session_factory(engine)() as session, session.begin():  # SQLAlchemy's
            await session.execute(insert(stamps).values(id="session", at=NOON + timedelta(hours=1), n=2))
        async with transactions(engine)() as tx, tx.begin():
            direct = {row["id"]: row["at"] for row in await Db(tx).all(STAMPS)}
            earliest = await Db(tx).scalar(EARLIEST, n=1)
        async with session_factory(engine)() as session:
            through_session = dict((await session.execute(select(stamps.c.id, stamps.c.at))).tuples().all())
            session_earliest = (await session.execute(select(func.min(stamps.c.at)).where(stamps.c.n == 2))).scalar()
    finally:
        await engine.dispose()
    expected = {**{k: NOON for k in written}, "session": NOON + timedelta(hours=1)}
    for read in (direct, through_session):
        assert read == expected
        assert all(at.utcoffset() == timedelta(0) for at in read.values())
    assert earliest == NOON and earliest.tzinfo is not None
    assert session_earliest == NOON + timedelta(hours=1) and session_earliest.tzinfo is not None
