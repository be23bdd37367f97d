"""Two relays on one outbox (two instances of a service on one database) publish every row once.

The race, step by step with real databases: relay A reads row X and is slow to get its broker
acknowledgement; relay B publishes X and deletes it; the table is empty when row Y is inserted; A
finally deletes "its" rows by id. On SQLite without AUTOINCREMENT, Y took X's id and A deleted it
unpublished (what stalled requests in the two-instance benchmark). The relays also take turns
(`db.relay_round_lock`), so a row is published once, not once per instance. Also: an outbox created
before the fix is rebuilt on start, rows kept.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, insert, select, text

from cancelflow import db
from cancelflow.messaging.relay import BUSY, OutboxRelay
from cancelflow.messaging.store import messaging_tables
from tests.conftest import DatabaseFactory, eventually, sqlite_left_by_an_older_release


class Acked:
    partition, offset = 0, 0


class FakeProducer:
    """Records what it was asked to send; `hold` keeps the acknowledgements back until released."""

    def __init__(self, hold: bool = False) -> None:
        self.sent: list[bytes] = []
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any) -> asyncio.Future[Acked]:
        self.sent.append(value)
        self.asked.set()
        ack: asyncio.Future[Acked] = asyncio.get_running_loop().create_future()

        async def acknowledge() -> None:
            await self.release.wait()
            ack.set_result(Acked())

        asyncio.get_running_loop().create_task(acknowledge())
        return ack


async def add(sessions: Any, outbox: Any, value: bytes) -> None:
    async with sessions() as session, session.begin():
        await session.execute(insert(outbox).values(topic="t", key="k", value=value, headers={}, event_type="E",
                                                    created_at=datetime.now(UTC)))


async def test_a_row_inserted_after_another_relay_emptied_the_table_survives(store: DatabaseFactory) -> None:
    metadata = MetaData()
    tables = messaging_tables(metadata)
    engine = db.make_engine(store("relays"))
    try:
        await db.create_schema(engine, metadata)
        sessions = db.session_factory(engine)
        slow, fast = FakeProducer(hold=True), FakeProducer()
        relay_a = OutboxRelay(db.transactions(engine), tables, slow, reads=db.reads(engine))  # type: ignore[arg-type]
        relay_b = OutboxRelay(db.transactions(engine), tables, fast, reads=db.reads(engine))  # type: ignore[arg-type]

        await add(sessions, tables.outbox, b"X")
        a_round = asyncio.create_task(relay_a.publish_pending())
        await slow.asked.wait()                       # A read X and waits for its acknowledgement
        assert await relay_b.publish_pending() == 1   # B publishes X and deletes it
        await add(sessions, tables.outbox, b"Y")      # the table was empty: does Y reuse X's id?
        slow.release.set()
        assert await a_round == 1                     # A deletes the rows it read, by id

        async with sessions() as session:
            left = (await session.execute(select(tables.outbox.c.value))).scalars().all()
        assert left == [b"Y"]
        assert await relay_b.publish_pending() == 1
        assert fast.sent == [b"X", b"Y"]
    finally:
        await engine.dispose()


async def test_an_outbox_from_before_is_rebuilt_with_its_rows(tmp_path: Path) -> None:
    async with sqlite_left_by_an_older_release(  # the table as create_all made it before the fix
        tmp_path / "old.db",
        "CREATE TABLE outbox (id INTEGER NOT NULL, topic VARCHAR(200) NOT NULL, \"key\" VARCHAR(200), "
        "value BLOB NOT NULL, headers JSON, event_type VARCHAR(100) NOT NULL, "
        "created_at DATETIME NOT NULL, PRIMARY KEY (id))",
        "INSERT INTO outbox VALUES (7, 't', 'k', x'01', '{}', 'E', '2026-11-21')",
    ) as engine:
        tables = messaging_tables(MetaData())
        await db.sqlite_outbox_ids_never_reused(engine, tables.outbox)
        await db.sqlite_outbox_ids_never_reused(engine, tables.outbox)  # a second start: nothing to do
        async with engine.begin() as conn:
            ddl = (await conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'outbox'"))).scalar_one()
            assert "AUTOINCREMENT" in ddl
            assert (await conn.execute(text("SELECT id, value FROM outbox"))).all() == [(7, b"\x01")]
            await conn.execute(text("DELETE FROM outbox"))
        sessions = db.session_factory(engine)
        await add(sessions, tables.outbox, b"new")
        async with sessions() as session:
            assert (await session.execute(select(tables.outbox.c.id))).scalar_one() == 8


async def test_relays_of_one_outbox_take_turns_and_publish_each_row_once(store: DatabaseFactory) -> None:
    metadata = MetaData()
    tables = messaging_tables(metadata)
    url = store("turns")
    engines = [db.make_engine(url), db.make_engine(url)]  # two instances: two engines, one database
    try:
        await db.create_schema(engines[0], metadata)
        sessions = [db.session_factory(e) for e in engines]
        slow, fast = FakeProducer(hold=True), FakeProducer()
        relay_a = OutboxRelay(db.transactions(engines[0]), tables, slow, reads=db.reads(engines[0]),  # type: ignore[arg-type]
                              round_lock=db.relay_round_lock(url, engines[0]))
        relay_b = OutboxRelay(db.transactions(engines[1]), tables, fast, reads=db.reads(engines[1]),  # type: ignore[arg-type]
                              round_lock=db.relay_round_lock(url, engines[1]))

        await add(sessions[0], tables.outbox, b"X")
        a_round = asyncio.create_task(relay_a.publish_pending())
        await slow.asked.wait()                          # A is in its round
        await add(sessions[1], tables.outbox, b"Y")      # B's instance commits a row meanwhile
        assert await relay_b.publish_pending() == BUSY   # B waits its turn, publishing nothing
        slow.release.set()
        assert await a_round == 1
        assert await relay_b.publish_pending() == 1      # then B's round takes what is left
        assert await relay_a.publish_pending() == 0
        assert (slow.sent, fast.sent) == ([b"X"], [b"Y"])
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_relay_that_died_in_its_round_leaves_the_lock_behind(store: DatabaseFactory) -> None:
    url = store("died")
    engines = [db.make_engine(url), db.make_engine(url)]
    try:
        await db.create_schema(engines[0], MetaData())
        dying, other = db.relay_round_lock(url, engines[0]), db.relay_round_lock(url, engines[1])
        held = dying()
        assert await held.__aenter__() is True
        async with other() as ours:
            assert ours is False
        # The process ends mid-round: its file descriptor closes / its connection drops.
        if isinstance(dying, db.FileRoundLock):
            dying.close()
        else:  # the server sees the connection go, as when the process is killed
            async with engines[1].connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                                        "AND pid <> pg_backend_pid() AND database = "
                                        "(SELECT oid FROM pg_database WHERE datname = current_database())"))

        async def taken_over() -> bool:
            async with other() as ours:
                return ours

        # The server releases the lock once the backend has exited: a moment after the termination.
        await eventually(taken_over, timeout=10, message="the lock released with its holder")
    finally:
        for engine in engines:
            await engine.dispose()
