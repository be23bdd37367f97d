"""cancelflow.sql: statements built once, run on the SQLite driver directly, on PostgreSQL through
SQLAlchemy. Values must come back exactly as SQLAlchemy's own execution returns them, on both."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from cancelflow.db import create_schema, make_engine, reads, session_factory, transactions
from cancelflow.messaging import deadletter
from cancelflow.sql import Among, Db, Query, Savepoint

metadata = MetaData()
serials = itertools.count(1)
things = Table(
    "things", metadata,
    Column("id", String(40), primary_key=True),
    Column("day", Date, nullable=True),
    Column("at", DateTime(timezone=True), nullable=True),
    Column("amount", Numeric(12, 2), nullable=True),
    Column("active", Boolean, nullable=False, default=True),
    Column("serial", Integer, nullable=False, default=lambda: next(serials)),
    Column("data", JSON, nullable=True),
)

ADD = Query(insert(things))
GET = Query(select(things).where(things.c.id == bindparam("thing_id")))
ACTIVE_IDS = Query(select(things.c.id).where(things.c.active == bindparam("active")).order_by(things.c.id))
SET = Query(update(things).where(things.c.id == bindparam("thing_id")))
DROP = Query(delete(things).where(things.c.id == bindparam("thing_id")))

FULL = {"id": "a", "day": date(2026, 11, 21), "at": datetime(2026, 11, 21, 9, 30, 15, 123456, tzinfo=UTC),
        "amount": Decimal("12.50"), "active": False, "serial": 7, "data": {"lines": [1, 2], "note": "é"}}


@pytest.fixture
async def sessions(store):  # type: ignore[no-untyped-def]
    engine = make_engine(store("sql"))
    await create_schema(engine, metadata)
    try:
        yield engine, session_factory(engine)
    finally:
        await engine.dispose()


async def test_rows_come_back_as_sqlalchemy_returns_them(sessions) -> None:  # type: ignore[no-untyped-def]
    _, new_session = sessions
    async with new_session() as session, session.begin():
        db = Db(session)
        await db.run(ADD, **FULL)
        await db.run_many(ADD, [{"id": "b", "day": None, "at": None, "amount": None, "data": None},
                                {"id": "c", "day": date(2026, 1, 31), "at": None, "amount": Decimal("0.10"),
                                 "data": [1]}])
    async with new_session() as session:
        db = Db(session)
        for thing_id in ("a", "b", "c"):
            ours = await db.first(GET, thing_id=thing_id)
            theirs = (await session.execute(select(things).where(things.c.id == thing_id))).mappings().one()
            assert ours == dict(theirs)
        a = await db.first(GET, thing_id="a")
        assert a is not None and {**a, "at": None} == {**FULL, "at": None}
        at = a["at"]  # SQLite keeps no offset (SQLAlchemy's own behaviour); PostgreSQL gives it back
        assert (at if at.tzinfo else at.replace(tzinfo=UTC)) == FULL["at"]
        # column defaults: the scalar one, and the callable one computed for each row
        b, c = await db.first(GET, thing_id="b"), await db.first(GET, thing_id="c")
        assert b["active"] is True and c["active"] is True
        assert b["serial"] != c["serial"]
        assert await db.first(GET, thing_id="nope") is None
        assert await db.all(ACTIVE_IDS, active=True) == [{"id": "b"}, {"id": "c"}]
        assert await db.scalar(ACTIVE_IDS, active=False) == "a"
        # of several rows, first and scalar give the first in the query's order
        assert await db.first(ACTIVE_IDS, active=True) == {"id": "b"}
        assert await db.scalar(ACTIVE_IDS, active=True) == "b"
        assert await db.first(ACTIVE_IDS, active=None) is None


async def test_values_are_stored_as_sqlalchemy_stores_them(sessions) -> None:  # type: ignore[no-untyped-def]
    _, new_session = sessions
    row = {**FULL, "id": "ours", "data": None, "amount": None}
    async with new_session() as session, session.begin():
        await Db(session).run(ADD, **row)
        await session.execute(insert(things).values(**{**row, "id": "theirs"}))
    async with new_session() as session:
        connection = await session.connection()
        stored = {r[0]: r[1:] for r in (await connection.exec_driver_sql(
            "SELECT id, day, at, amount, active, serial, data FROM things")).all()}
    assert stored["ours"] == stored["theirs"]


async def test_writes_report_rows_and_belong_to_the_session_transaction(sessions) -> None:  # type: ignore[no-untyped-def]
    _, new_session = sessions
    async with new_session() as session, session.begin():
        await Db(session).run_many(ADD, [{"id": "a"}, {"id": "b"}])
    async with new_session() as session:
        db = Db(session)
        await session.begin()
        assert await db.run(SET, thing_id="a", amount=Decimal("3.00"), active=False) == 1
        assert await db.run(SET, thing_id="missing", amount=Decimal("1.00")) == 0
        assert await db.run(DROP, thing_id="b") == 1
        await session.rollback()  # nothing of it stays
        await session.begin()
        assert (await db.first(GET, thing_id="a"))["amount"] is None
        assert await db.first(GET, thing_id="b") is not None
        await db.run(SET, thing_id="a", amount=Decimal("3.00"))
        await session.commit()  # a new transaction after a commit gets its own connection
        assert (await db.first(GET, thing_id="a"))["amount"] == Decimal("3.00")


@pytest.mark.parametrize("way", ["Db.savepoint", "begin_nested"])
async def test_a_savepoint_undoes_only_its_own_statements(sessions, way) -> None:  # type: ignore[no-untyped-def]
    _, new_session = sessions
    step = Savepoint("step")

    def savepoint(session, db):  # type: ignore[no-untyped-def]
        return db.savepoint(step) if way == "Db.savepoint" else session.begin_nested()

    async with new_session() as session, session.begin():
        db = Db(session)
        await db.run(ADD, id="kept")
        with pytest.raises(RuntimeError):
            async with savepoint(session, db):
                await db.run(ADD, id="undone")
                raise RuntimeError("the platform commit failed")
        async with savepoint(session, db):
            await db.run(ADD, id="inside")
        await db.run(ADD, id="after")
    async with new_session() as session:
        assert [row["id"] for row in await Db(session).all(Query(select(things.c.id).order_by(things.c.id)))] \
            == ["after", "inside", "kept"]


def test_a_savepoint_name_must_be_a_plain_name() -> None:
    with pytest.raises(ValueError, match="savepoint name"):
        Savepoint("step; DROP TABLE things")


async def test_sqlite_skips_sqlalchemy_execution_postgresql_goes_through_it(store, sessions) -> None:  # type: ignore[no-untyped-def]
    engine, new_session = sessions
    seen: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    async with new_session() as session, session.begin():
        await Db(session).run(ADD, id="a")
        await Db(session).first(GET, thing_id="a")
    statements = [s for s in seen if "things" in s]
    assert len(statements) == (0 if store.kind == "sqlite" else 2)


async def test_in_lists_are_refused_on_the_direct_path(store, sessions) -> None:  # type: ignore[no-untyped-def]
    _, new_session = sessions
    among = Query(select(things).where(things.c.id.in_(bindparam("ids", expanding=True))))
    async with new_session() as session:
        if store.kind == "sqlite":
            with pytest.raises(TypeError, match="IN lists"):
                await Db(session).all(among, ids=["a"])
        else:
            assert await Db(session).all(among, ids=["a"]) == []


THINGS_AMONG = Among(lambda ids: select(things.c.id).where(things.c.id.in_(ids)), most=8)


@pytest.mark.parametrize("asked", [1, 3, 8, 20])
async def test_an_in_list_runs_as_padded_statements_built_once(sessions, asked) -> None:  # type: ignore[no-untyped-def]
    """`Among`: a statement per power of two (padded with the last value), lists longer than `most`
    in chunks; the rows are the same for any count, and each statement is compiled once."""
    _, new_session = sessions
    async with new_session() as session, session.begin():
        await Db(session).run_many(ADD, [{"id": f"t{i}"} for i in range(0, 40, 2)])
    values = [f"t{i}" for i in range(asked)] + ["t0"]  # a repeated value
    async with new_session() as session:
        found = await Db(session).among(THINGS_AMONG, values)
    ids = [row["id"] for row in found]
    assert set(ids) == {v for v in values if int(v[1:]) % 2 == 0}
    if len(values) <= THINGS_AMONG.most:
        assert len(ids) == len(set(ids))  # one statement: a repeated value matches its row once
    assert set(THINGS_AMONG._queries) <= {1, 2, 4, 8}
    with pytest.raises(ValueError, match="power of two"):
        THINGS_AMONG.query(3)


async def test_driver_transactions_read_and_store_values_as_sqlalchemy_does(store, sessions) -> None:  # type: ignore[no-untyped-def]
    """Units of work run on the driver (`db.transactions`: InlineSqlite, or asyncpg on PostgreSQL) with
    SQLAlchemy's own bind and result conversions: what they store and read back is what SQLAlchemy
    stores and reads, JSON, decimals, dates and defaults included."""
    engine, new_session = sessions
    new_tx = transactions(engine)
    async with new_tx() as tx, tx.begin():
        assert not isinstance(tx, AsyncSession)  # the driver path on both stores
        db = Db(tx)
        await db.run(ADD, **FULL)
        await db.run_many(ADD, [{"id": "b", "day": None, "at": None, "amount": None, "data": None},
                                {"id": "c", "day": date(2026, 1, 31), "at": None, "amount": Decimal("0.10"),
                                 "data": [1]}])
        assert await db.run(SET, thing_id="c", amount=Decimal("0.20")) == 1
        assert await db.run(DROP, thing_id="missing") == 0
    async with new_session() as session, session.begin():
        await session.execute(insert(things).values(**{**FULL, "id": "theirs"}))
    async with reads(engine)() as reader, new_session() as session:  # no transaction: no write lock held
        db = Db(reader)
        for thing_id in ("a", "b", "c"):
            theirs = (await session.execute(select(things).where(things.c.id == thing_id))).mappings().one()
            assert await db.first(GET, thing_id=thing_id) == dict(theirs)
        ours, theirs = await db.first(GET, thing_id="a"), await db.first(GET, thing_id="theirs")
        assert {**ours, "id": None, "serial": None} == {**theirs, "id": None, "serial": None}
        assert (await db.first(GET, thing_id="c"))["amount"] == Decimal("0.20")
        assert await db.all(ACTIVE_IDS, active=True) == [{"id": "b"}, {"id": "c"}]
        assert sorted(r["id"] for r in await db.among(THINGS_AMONG, ["a", "c", "zz"])) == ["a", "c"]


@pytest.mark.pg
@pytest.mark.parametrize("store", ["pg"], indirect=True)  # only a server can end a connection
async def test_a_driver_connection_the_server_closed_is_not_used_again(store, sessions) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL closed an idle connection (restart, idle timeout): the transaction that finds it fails
    with an error the retry policy retries, and the next one gets a new connection."""
    assert store.kind == "pg"
    engine, new_session = sessions
    new_tx = transactions(engine)
    pid_query = Query(select(func.pg_backend_pid().label("pid")))
    async with new_tx() as tx:
        pid = (await Db(tx).first(pid_query))["pid"]
    async with new_session() as session:  # the connection is idle in the driver pool now
        await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    failures: list[BaseException] = []
    for _ in range(2):
        try:
            async with new_tx() as tx, tx.begin():
                await Db(tx).run(ADD, id="after-restart")
                new_pid = (await Db(tx).first(pid_query))["pid"]
            break
        except Exception as exc:  # noqa: BLE001 - what the retry policy would see
            failures.append(exc)
    else:
        pytest.fail(f"no transaction succeeded: {failures!r}")
    assert new_pid != pid
    assert all(deadletter.is_transient(exc) for exc in failures), failures
