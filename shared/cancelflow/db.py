"""Database setup shared by every service: one engine per service database, SQLite or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData, Table, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from cancelflow.logging import get_logger

log = get_logger(__name__)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> AsyncEngine:
    if not is_sqlite(url):
        return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # A few pooled connections: aiosqlite runs each in a thread of its own, so opening one per unit of
    # work (NullPool) costs a thread start and the pragmas every time. BEGIN IMMEDIATE still serializes
    # the writers.
    engine = create_async_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=False,
                                 connect_args={"timeout": 30})
    _sqlite_serializable_writes(engine)
    return engine


def _sqlite_serializable_writes(engine: AsyncEngine) -> None:
    # pysqlite begins transactions lazily, at the first write, so a read-check-write could interleave
    # with another process. BEGIN IMMEDIATE takes the write lock up front: every transaction is
    # serialized against other writers (two instances of a service may share the file).
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine, metadata: MetaData) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def sqlite_outbox_ids_never_reused(engine: AsyncEngine, outbox: Table) -> None:
    """Rebuild an outbox table created before its ids were AUTOINCREMENT (an older embedded database),
    keeping its rows. Two instances starting together: BEGIN IMMEDIATE lets one do it."""
    async with engine.begin() as conn:
        ddl = (await conn.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"),
                                  {"name": outbox.name})).scalar_one_or_none()
        if ddl is None or "AUTOINCREMENT" in ddl.upper():
            return
        old = f"{outbox.name}_reused_ids"
        columns = ", ".join(f'"{c.name}"' for c in outbox.columns)
        await conn.execute(text(f'ALTER TABLE "{outbox.name}" RENAME TO "{old}"'))
        await conn.run_sync(outbox.create)
        await conn.execute(text(f'INSERT INTO "{outbox.name}" ({columns}) SELECT {columns} FROM "{old}"'))
        await conn.execute(text(f'DROP TABLE "{old}"'))
        log.info("outbox rebuilt with ids that are never reused", table=outbox.name)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
