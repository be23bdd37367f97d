"""The speed fork of cancelflow.sql against the plain library path (docs/performance.md, item 8).

`Query` and `Db` run statements with the SQL, parameter order and conversions SQLAlchemy compiled for
them, on the driver connection. Here the same generated statements and values go through `Db` on one
database and through plain SQLAlchemy Core (an `AsyncConnection` of an engine with no cancelflow
setup) on another: the rows, the rowcounts and what ends up stored must be the same, on both stores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from cancelflow.db import JSON_CODEC, create_schema, make_engine, session_factory, transactions
from cancelflow.sql import Among, Db, Query

metadata = MetaData()
items = Table(
    "items", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("label", String(60), nullable=True),
    Column("n", Integer, nullable=False),
    Column("amount", Numeric(14, 2), nullable=True),
    Column("day", Date, nullable=True),
    Column("at", DateTime(timezone=True), nullable=True),
    Column("flag", Boolean, nullable=False, default=False),
    Column("data", JSON, nullable=True),
)

# Shaped as the services write theirs: updates that SET the columns given at the call and match on
# `match_*` parameters, literal and expression values, several parameters of several types per statement.
STATEMENTS: dict[str, Any] = {
    "add": insert(items),
    "between": select(items).where(items.c.n >= bindparam("lo"), items.c.n < bindparam("hi"),
                                   items.c.label != bindparam("skip")).order_by(items.c.id),
    "labelled": select(items.c.id, items.c.amount, items.c.data).where(
        items.c.label == bindparam("label")).order_by(items.c.id.desc()),
    "oldest": select(items.c.id, items.c.at, items.c.day).where(items.c.flag == bindparam("flag")).order_by(
        items.c.n, items.c.id),
    "set": update(items).where(items.c.n >= bindparam("match_lo"), items.c.flag == bindparam("match_flag")),
    "bump": update(items).where(items.c.id == bindparam("match_id")).values(n=items.c.n + 1, flag=True),
    "drop": delete(items).where(items.c.n < bindparam("below"), items.c.label != bindparam("skip")),
    "totals": select(func.count().label("rows"), func.sum(items.c.amount).label("total"),
                     func.max(items.c.day).label("last_day")).where(items.c.day <= bindparam("until")),
}
QUERIES = {name: Query(construct) for name, construct in STATEMENTS.items()}
AMONG = Among(lambda ids: select(items.c.id, items.c.label).where(items.c.id.in_(ids)), most=8)

# Values the stores hold alike (PostgreSQL refuses NUL in text; JSON without floats, whose text may differ).
labels = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | labels,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(labels, inner, max_size=3), max_leaves=6)
amounts = st.none() | st.decimals(min_value=-10**11, max_value=10**11, places=2, allow_nan=False)
days = st.none() | st.dates(date(1970, 1, 1), date(2100, 12, 31))
moments = st.none() | st.datetimes(datetime(1970, 1, 2), datetime(2100, 1, 1), timezones=st.just(UTC))
ints = st.integers(-2**31, 2**31 - 1)


@st.composite
def rows(draw: st.DrawFn, ids: list[int]) -> dict[str, Any]:
    row = {"id": draw(st.sampled_from(ids)), "n": draw(ints)}
    # Every row gives the same keys in one run_many; a missing flag takes the column default.
    for key, values in (("label", st.none() | labels), ("amount", amounts), ("day", days), ("at", moments),
                        ("data", json_values)):
        row[key] = draw(values)
    if draw(st.booleans()):
        row["flag"] = draw(st.booleans())
    return row


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, Any]]:
    ids = list(range(1, 9))
    first = draw(st.lists(rows(ids), max_size=6, unique_by=lambda r: r["id"]))
    keys = set(first[0]) if first else set()
    script: list[tuple[str, Any]] = [("add_many", [r for r in first if set(r) == keys])]
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["add", "between", "labelled", "oldest", "set", "bump", "drop", "totals",
                                     "first", "among"]))
        if kind == "add":
            params = draw(rows(list(range(9, 40))))
        elif kind in ("between", "first"):
            params = {"lo": draw(ints), "hi": draw(ints), "skip": draw(labels)}
        elif kind == "labelled":
            params = {"label": draw(st.sampled_from([r["label"] or "" for r in first] or [""]) | labels)}
        elif kind == "oldest":
            params = {"flag": draw(st.booleans())}
        elif kind == "set":
            params = {"match_lo": draw(ints), "match_flag": draw(st.booleans()), "amount": draw(amounts),
                      "label": draw(st.none() | labels), "at": draw(moments)}
        elif kind == "bump":
            params = {"match_id": draw(st.sampled_from(ids))}
        elif kind == "drop":
            params = {"below": draw(ints), "skip": draw(labels)}
        elif kind == "totals":
            params = {"until": draw(days.filter(lambda d: d is not None))}
        else:
            params = draw(st.lists(st.integers(0, 45), max_size=12))
        script.append((kind, params))
    return script


async def through_db(db: Db, kind: str, params: Any) -> Any:
    """One step of a script through the fork (`Db`)."""
    if kind == "add_many":
        await db.run_many(QUERIES["add"], params)
        return None
    if kind == "among":
        # A row matched in two chunks comes back once per chunk (documented on `Db.among`).
        return sorted({(r["id"], r["label"]) for r in await db.among(AMONG, params)})
    if kind == "first":
        return await db.first(QUERIES["between"], **params)
    query = QUERIES[kind]
    if kind in ("add", "set", "bump", "drop"):
        return await db.run(query, **params)
    return await db.all(query, **params)


async def through_core(conn: AsyncConnection, kind: str, params: Any) -> Any:
    """The same step through plain SQLAlchemy Core."""
    if kind == "add_many":
        if params:
            await conn.execute(STATEMENTS["add"], params)
        return None
    if kind == "among":
        found = await conn.execute(select(items.c.id, items.c.label).where(items.c.id.in_(params)))
        return sorted((r.id, r.label) for r in found)
    if kind == "first":
        row = (await conn.execute(STATEMENTS["between"], params)).mappings().first()
        return None if row is None else dict(row)
    result = await conn.execute(STATEMENTS[kind], params)
    if kind in ("add", "set", "bump", "drop"):
        return result.rowcount
    return [dict(r) for r in result.mappings()]


async def outcome(step: Any) -> tuple[str, Any]:
    """What a step gave, or whether the error it raised is a constraint's (a duplicate id) or another
    (an integer out of range on PostgreSQL): the fork raises the driver's errors, SQLAlchemy wraps them."""
    try:
        return "ok", await step
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        causes = (exc, getattr(exc, "orig", None), exc.__cause__)
        names = {kind.__name__ for cause in causes if cause is not None for kind in type(cause).__mro__}
        return "error", "integrity" if names & {"IntegrityError", "IntegrityConstraintViolationError"} else "other"


async def stored(conn: AsyncConnection) -> list[tuple[Any, ...]]:
    """What the table holds, as the driver reads it back (no SQLAlchemy conversions)."""
    return [tuple(r) for r in await conn.exec_driver_sql(
        "SELECT id, label, n, amount, day, at, flag, data FROM items ORDER BY id")]


class Pair:
    """A database run through the fork and one run through plain SQLAlchemy, on the same store."""

    def __init__(self, store: Any, way: str) -> None:
        self.way = way
        self.loop = asyncio.new_event_loop()
        self.ours: AsyncEngine = make_engine(store("ours"))
        self.plain: AsyncEngine = create_async_engine(store("theirs"), **JSON_CODEC)
        self.loop.run_until_complete(create_schema(self.ours, metadata))
        self.loop.run_until_complete(create_schema(self.plain, metadata))

    def run(self, script: list[tuple[str, Any]]) -> None:
        self.loop.run_until_complete(self._run(script))

    async def _run(self, script: list[tuple[str, Any]]) -> None:
        new = transactions(self.ours) if self.way == "driver transaction" else session_factory(self.ours)
        async with new() as tx, tx.begin():
            assert self.way != "driver transaction" or type(tx).__name__ == "DriverTransaction"
            await Db(tx).run(Query(delete(items)))
        async with self.plain.begin() as conn:
            await conn.execute(delete(items))
        for kind, params in script:
            # A step in a transaction of its own: a failed statement aborts a PostgreSQL transaction.
            async with new() as tx:
                await tx.begin()
                ours = await outcome(through_db(Db(tx), kind, params))
                await (tx.commit() if ours[0] == "ok" else tx.rollback())
            async with self.plain.connect() as conn:
                await conn.begin()
                theirs = await outcome(through_core(conn, kind, params))
                await (conn.commit() if theirs[0] == "ok" else conn.rollback())
            assert ours == theirs, (kind, params)
        async with self.ours.connect() as ours_conn, self.plain.connect() as plain_conn:
            assert await stored(ours_conn) == await stored(plain_conn)

    def close(self) -> None:
        self.loop.run_until_complete(self.ours.dispose())
        self.loop.run_until_complete(self.plain.dispose())
        self.loop.close()


@pytest.fixture(params=["driver transaction", "session"])
def pair(store: Any, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Units of work and relays run `Db` in driver transactions; HTTP views in sessions (on SQLite on
    the driver connection too)."""
    pair = Pair(store, request.param)
    try:
        yield pair
    finally:
        pair.close()


def test_generated_statements_give_what_plain_sqlalchemy_gives(pair: Pair) -> None:
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scripts())
    def check(script: list[tuple[str, Any]]) -> None:
        pair.run(script)

    check()


def test_a_statement_with_every_type_and_several_parameters(pair: Pair) -> None:
    """One fixed script, so that a failure reads plainly: every column type in and out, parameters of
    several types in one statement (their order matters), rowcounts above one, NULL and JSON null."""
    at = datetime(2026, 12, 6, 23, 59, 59, 999999, tzinfo=UTC)
    full = {"label": "Zoë", "amount": Decimal("-12.50"), "day": date(2026, 2, 28), "at": at,
            "data": {"lines": [1, "é", None], "ok": True}}
    pair.run([
        ("add_many", [{"id": 1, "n": 5, **full}, {"id": 2, "n": 7, **full, "label": None, "data": None},
                      {"id": 3, "n": -1, **full, "amount": None, "day": None, "at": None}]),
        ("add", {"id": 4, "n": 2**31 - 1, "label": "x" * 60, "flag": True}),
        ("add", {"id": 4, "n": 0}),  # a duplicate: the same error on both
        ("between", {"lo": 0, "hi": 8, "skip": "nobody"}),
        ("set", {"match_lo": 0, "match_flag": False, "amount": Decimal("0.01"), "label": "ä b", "at": None}),
        ("bump", {"match_id": 2}),
        ("oldest", {"flag": True}),
        ("labelled", {"label": "ä b"}),
        ("totals", {"until": date(2030, 1, 1)}),
        ("among", [1, 3, 3, 99]),
        ("drop", {"below": 6, "skip": "x" * 60}),
        ("first", {"lo": -5, "hi": 10, "skip": ""}),
    ])


def test_a_text_statement_compiles_its_named_parameters_in_order(pair: Pair) -> None:
    """Raw SQL with named parameters given in another order than they appear (SQLite's `?` and
    PostgreSQL's `$n` are positional). Its result columns are declared: the fork reads rows by the
    columns SQLAlchemy compiled."""
    query = Query(text("SELECT CAST(:b AS VARCHAR(9)) AS b, CAST(:a AS VARCHAR(9)) AS a, "
                       "CAST(:b AS VARCHAR(9)) || CAST(:a AS VARCHAR(9)) AS both_").columns(
        b=String, a=String, both_=String))

    async def check() -> None:
        new = transactions(pair.ours) if pair.way == "driver transaction" else session_factory(pair.ours)
        async with new() as tx, pair.plain.connect() as conn:
            ours = await Db(tx).first(query, a="first", b="second")
            theirs = dict((await conn.execute(query.construct, {"a": "first", "b": "second"})).mappings().one())
        assert ours == theirs == {"b": "second", "a": "first", "both_": "secondfirst"}

    pair.loop.run_until_complete(check())
