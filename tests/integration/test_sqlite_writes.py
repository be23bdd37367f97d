"""SQLite transactions (cancelflow.db.InlineSqlite): BEGIN IMMEDIATE runs on the event loop's thread
when the database is free; the connections of one engine (one process) queue for the write lock among
themselves; a BEGIN that finds another process (a second instance) holding it waits in aiosqlite's
thread, not on the loop. Units of work run without a session (`db.DriverTransaction`) and behave as
one does."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text

from cancelflow import db
from cancelflow.db import BUSY_TIMEOUT_MS, InlineSqlite, create_schema, make_engine, session_factory
from cancelflow.sql import Db, Query

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


async def test_writers_of_one_process_queue_and_begin_as_soon_as_the_holder_commits(
        tmp_path: Path, thread_calls: list[int]) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/queue.db")
    await create_schema(engine, METADATA)
    sessions = session_factory(engine)
    order: list[str] = []
    try:
        async with sessions() as warm, warm.begin():  # two pooled connections, set up beforehand
            async with sessions() as other:
                await other.connection()
                await other.rollback()
        thread_calls.clear()
        holder_may_commit, holder_wrote = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with sessions() as session, session.begin():
                await session.execute(insert(ROWS).values(id=1))
                order.append("holder wrote")
                holder_wrote.set()
                await holder_may_commit.wait()

        async def relay() -> int:
            async with sessions() as session, session.begin():
                await session.execute(insert(ROWS).values(id=2))  # BEGIN (the session's is lazy), insert
                order.append("relay wrote")
                return (await session.execute(select(func.count()).select_from(ROWS))).scalar_one()

        holding = asyncio.create_task(holder())
        await holder_wrote.wait()
        queued = asyncio.create_task(relay())
        with pytest.raises(TimeoutError):  # the relay waits for the holder (its BEGIN cannot succeed)
            await asyncio.wait_for(asyncio.shield(queued), 0.3)
        assert order == ["holder wrote"]
        holder_may_commit.set()
        _, rows_seen_by_relay = await asyncio.wait_for(asyncio.gather(holding, queued), 10)
        assert rows_seen_by_relay == 2  # it began after the holder committed
        assert thread_calls == []  # nobody waited in SQLite's busy handler
    finally:
        await engine.dispose()


async def test_a_writer_queued_longer_than_the_busy_timeout_fails_clearly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/stuck.db")
    await create_schema(engine, METADATA)
    sessions = session_factory(engine)
    try:
        async with sessions() as holder, holder.begin():
            await holder.execute(insert(ROWS).values(id=1))
            monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 200)
            with pytest.raises(Exception, match="this process's other writers") as failure:
                async with sessions() as session, session.begin():
                    await session.execute(insert(ROWS).values(id=2))
            assert isinstance(failure.value.__cause__ or failure.value.orig, sqlite3.OperationalError)  # type: ignore[attr-defined]
        async with sessions() as session, session.begin():  # the queue is free again
            await session.execute(insert(ROWS).values(id=3))
    finally:
        await engine.dispose()


async def test_a_connection_closed_mid_transaction_frees_the_queue(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/closed.db")
    await create_schema(engine, METADATA)
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            await session.execute(insert(ROWS).values(id=1))  # BEGIN: holds the queue
            await (await session.connection()).invalidate()  # closed under the transaction
        async with sessions() as session, session.begin():  # would wait out the busy timeout otherwise
            await asyncio.wait_for(session.execute(insert(ROWS).values(id=2)), 5)
    finally:
        await engine.dispose()


ADD_ROW = Query(insert(ROWS))
ROW_IDS = Query(select(ROWS.c.id).order_by(ROWS.c.id))


async def _ids(sessions: Any) -> list[int]:
    async with sessions() as session:
        return list((await session.execute(select(ROWS.c.id).order_by(ROWS.c.id))).scalars())


async def test_driver_transactions_commit_roll_back_and_begin_again_as_a_session_does(tmp_path: Path) -> None:
    """Units of work and relays on SQLite run without a session (`db.transactions`): the same
    begin / commit / rollback / close, on connections kept for the next transaction."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/driver.db")
    await create_schema(engine, METADATA)
    new_tx, sessions = db.transactions(engine), session_factory(engine)
    try:
        async with new_tx() as tx, tx.begin():  # committed at the end of the block
            await Db(tx).run(ADD_ROW, id=1)
            first_connection = await tx.connection()
        with pytest.raises(RuntimeError, match="the platform commit failed"):
            async with new_tx() as tx, tx.begin():  # rolled back: the block raised
                await Db(tx).run(ADD_ROW, id=2)
                raise RuntimeError("the platform commit failed")
        async with new_tx() as tx:
            db_ = Db(tx)
            await tx.begin()
            with pytest.raises(RuntimeError, match="already open"):
                await tx.begin()
            await db_.run(ADD_ROW, id=3)
            await tx.commit()
            await db_.run(ADD_ROW, id=4)  # no transaction open: the statement begins one, as a session's does
            assert (await tx.connection()).in_transaction
            await tx.rollback()
            await db_.run(ADD_ROW, id=5)
            assert await db_.all(ROW_IDS) == [{"id": 1}, {"id": 3}, {"id": 5}]
        # left open at close: rolled back, and the connection goes back for the next transaction
        assert await _ids(sessions) == [1, 3]
        async with new_tx() as tx:
            assert await tx.connection() is first_connection
    finally:
        await engine.dispose()


async def test_driver_transactions_queue_with_the_engines_sessions(tmp_path: Path, thread_calls: list[int]) -> None:
    """A driver transaction and a session of the same engine (the consume loop and an HTTP view) queue
    for the write lock together: the second begins the moment the first commits, without the thread."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/mixed.db")
    await create_schema(engine, METADATA)
    new_tx, sessions = db.transactions(engine), session_factory(engine)
    try:
        async with new_tx() as warm, warm.begin():  # both connected beforehand
            pass
        async with sessions() as other, other.begin():
            await other.connection()
        thread_calls.clear()
        async with new_tx() as holder:
            await Db(holder).run(ADD_ROW, id=1)  # begins: holds the write lock

            async def waiter() -> int:
                async with sessions() as session, session.begin():
                    await session.execute(insert(ROWS).values(id=2))
                    return (await session.execute(select(func.count()).select_from(ROWS))).scalar_one()

            queued = asyncio.create_task(waiter())
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(queued), 0.3)
            await holder.commit()
            assert await asyncio.wait_for(queued, 10) == 2  # it began after the holder committed
        assert thread_calls == []
    finally:
        await engine.dispose()


async def test_disposing_the_engine_closes_its_driver_connections(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/disposed.db")
    await create_schema(engine, METADATA)
    new_tx = db.transactions(engine)
    async with new_tx() as tx, tx.begin():
        await Db(tx).run(ADD_ROW, id=1)
        connection = await tx.connection()
    await engine.dispose()
    connection._thread.join(5)
    assert not connection._thread.is_alive()  # the thread closed the connection and ended
    with pytest.raises(RuntimeError, match="disposed"):
        async with new_tx() as tx:
            await tx.begin()


async def test_a_read_outside_a_transaction_does_not_wait_for_the_writer(tmp_path: Path, thread_calls: list[int]) -> None:
    """`db.reads` (the relay's look at the outbox): each statement on its own, so it sees what is
    committed and does not queue behind a writer of the process holding the write lock."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/reads.db")
    await create_schema(engine, METADATA)
    new_tx, new_reads = db.transactions(engine), db.reads(engine)
    try:
        async with new_tx() as tx, tx.begin():
            await Db(tx).run(ADD_ROW, id=1)
        async with new_reads() as warm:  # connected beforehand
            await Db(warm).all(ROW_IDS)
        thread_calls.clear()
        async with new_tx() as holder:
            await Db(holder).run(ADD_ROW, id=2)  # holds the write lock, not committed
            async with new_reads() as reads:
                assert await asyncio.wait_for(Db(reads).all(ROW_IDS), 1) == [{"id": 1}]
                with pytest.raises(RuntimeError, match="reads only"):
                    await reads.begin()
            await holder.commit()
        async with new_reads() as reads:
            assert await Db(reads).all(ROW_IDS) == [{"id": 1}, {"id": 2}]
        assert thread_calls == []
    finally:
        await engine.dispose()


async def test_driver_connections_in_use_at_once_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the engine's own pool: a transaction past `OPEN_MAX` waits for a connection to come back
    (a failure storm's one-by-one retries must not open a connection each on PostgreSQL)."""
    monkeypatch.setattr(db.DriverConnections, "OPEN_MAX", 2)
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/bounded.db")
    await create_schema(engine, METADATA)
    new_reads = db.reads(engine)
    try:
        async with new_reads() as first, new_reads() as second:
            await Db(first).all(ROW_IDS)
            await Db(second).all(ROW_IDS)
            async with new_reads() as third:
                waiting = asyncio.create_task(Db(third).all(ROW_IDS))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiting), 0.3)
                await first.close()  # its connection goes back: the third one gets it
                assert await asyncio.wait_for(waiting, 5) == []
                assert await third.connection() is not await second.connection()
    finally:
        await engine.dispose()
