"""SQLite transactions (cancelflow.db.InlineSqlite): BEGIN IMMEDIATE runs on the event loop's thread
when the database is free, and waits in aiosqlite's thread, not on the loop, when another connection
(a second instance, or this process's own relay) holds the write lock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text

from cancelflow.db import BUSY_TIMEOUT_MS, InlineSqlite, create_schema, make_engine, session_factory

pytestmark = pytest.mark.timeout(60)

METADATA = MetaData()
ROWS = Table("rows", METADATA, Column("id", Integer, primary_key=True))


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per call handed to aiosqlite's thread after the connection was set up."""
    calls: list[int] = []
    finished = InlineSqlite._finished_in_thread

    def counted(self: InlineSqlite) -> None:
        calls.append(1)
        finished(self)

    monkeypatch.setattr(InlineSqlite, "_finished_in_thread", counted)
    return calls


async def test_a_free_database_begins_on_the_loop(tmp_path: Path, thread_calls: list[int]) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/free.db")
    await create_schema(engine, METADATA)
    sessions = session_factory(engine)
    try:
        async with sessions() as session, session.begin():
            await session.execute(select(1))  # connect (the pool's first connection) and begin
        thread_calls.clear()
        async with sessions() as session, session.begin():
            await session.execute(insert(ROWS).values(id=1))
            timeout = (await session.execute(text("PRAGMA busy_timeout"))).scalar_one()
        assert thread_calls == []  # BEGIN, the insert and the commit ran on the loop
        assert timeout == BUSY_TIMEOUT_MS  # the no-wait attempt put the busy timeout back
    finally:
        await engine.dispose()


async def test_a_busy_database_waits_in_the_thread_while_the_loop_runs_on(tmp_path: Path,
                                                                          thread_calls: list[int]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/busy.db"
    first, second = make_engine(url), make_engine(url)  # two instances of a service on one file
    await create_schema(first, METADATA)
    try:
        async with session_factory(first)() as holder, holder.begin():
            await holder.execute(insert(ROWS).values(id=1))  # holds the write lock

            async def write_from_the_second() -> int:
                async with session_factory(second)() as session, session.begin():
                    await session.execute(insert(ROWS).values(id=2))
                    return (await session.execute(select(func.count()).select_from(ROWS))).scalar_one()

            waiting = asyncio.create_task(write_from_the_second())
            await asyncio.sleep(0.3)  # a wait on the loop itself would block here until the busy timeout
            assert not waiting.done()  # BEGIN waits for the holder; it did not fail
            thread_calls.clear()
        # The holder committed: the second writer began (in the thread) and saw its row.
        assert await asyncio.wait_for(waiting, 10) == 2
        assert thread_calls  # the waiting BEGIN went to aiosqlite's thread
    finally:
        await first.dispose()
        await second.dispose()
