"""The speed fork of aiosqlite, `cancelflow.db.InlineSqlite`, against aiosqlite itself (docs/performance.md,
items 5 and 11).

InlineSqlite runs statements on the event loop instead of aiosqlite's thread. Here the same generated
statements go through it (its own calls, which `cancelflow.sql.Db` uses, and aiosqlite's API, which
SQLAlchemy uses) and through a plain `aiosqlite.connect()` on another file: every result, rowcount,
error and transaction state must be the same, and so must what the two files hold at the end.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cancelflow.db import InlineSqlite

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT UNIQUE, n INTEGER, r REAL, b BLOB)"
COLUMNS = "id, s, n, r, b"
SQL = {
    "insert": f"INSERT INTO t ({COLUMNS}) VALUES (?, ?, ?, ?, ?)",
    "update": "UPDATE t SET n = n + ?, r = ? WHERE n >= ? AND s <> ?",
    "delete": "DELETE FROM t WHERE n < ? OR s = ?",
    "select": f"SELECT {COLUMNS} FROM t WHERE n >= ? AND (s IS NULL OR s <> ?) ORDER BY id",
    "count": "SELECT count(*), total(n), group_concat(s, ?) FROM t WHERE b IS NOT ?",
}

texts = st.none() | st.text(st.characters(codec="utf-8"), max_size=12)
ints = st.integers(-2**63, 2**63 - 1)
small = st.integers(-1000, 1000)
reals = st.none() | st.floats(allow_nan=False, allow_infinity=False)
blobs = st.none() | st.binary(max_size=12)
row = st.tuples(st.integers(1, 12), st.sampled_from(["a", "b", "é"]) | texts, small | ints, reals, blobs)

steps = st.one_of(
    st.tuples(st.sampled_from(["BEGIN IMMEDIATE", "COMMIT", "ROLLBACK"]), st.just(())),
    st.tuples(st.just("insert"), row),
    st.tuples(st.just("insert_many"), st.lists(row, max_size=4)),
    st.tuples(st.just("update"), st.tuples(small, reals, small, texts)),
    st.tuples(st.just("delete"), st.tuples(small, texts)),
    st.tuples(st.sampled_from(["select", "first", "api_select", "api_first"]), st.tuples(small, texts)),
    st.tuples(st.just("count"), st.tuples(st.sampled_from([",", "|"]), blobs)),
)


async def through(connection: aiosqlite.Connection, kind: str, params: Any, *, inline: bool) -> Any:
    """One step: on InlineSqlite through the calls `Db` uses (or aiosqlite's API for `api_*`), on
    plain aiosqlite through its API."""
    if kind in ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK"):
        if inline:
            await connection.run(kind)  # type: ignore[attr-defined]
        else:
            await (await connection.execute(kind)).close()
        return None
    sql = SQL.get(kind, SQL["insert"] if kind == "insert_many" else SQL["select"] if "select" in kind or
                  "first" in kind else "")
    if inline and not kind.startswith("api_"):
        if kind == "insert_many":
            return await connection.many(sql, params)  # type: ignore[attr-defined]
        if kind in ("insert", "update", "delete"):
            return await connection.touch(sql, params)  # type: ignore[attr-defined]
        if kind == "first":
            return await connection.first_row(sql, params)  # type: ignore[attr-defined]
        return await connection.rows(sql, params)  # type: ignore[attr-defined]
    if kind == "insert_many":
        await (await connection.executemany(sql, params)).close()
        return None
    async with connection.execute(sql, params) as cursor:
        if kind in ("insert", "update", "delete"):
            return cursor.rowcount
        return await cursor.fetchone() if kind.endswith("first") else await cursor.fetchall()


async def outcome(connection: aiosqlite.Connection, kind: str, params: Any, *, inline: bool) -> tuple[Any, ...]:
    try:
        result: Any = ("ok", await through(connection, kind, params, inline=inline))
    except sqlite3.Error as exc:
        result = ("error", type(exc).__name__, str(exc))
    return (*result, connection.in_transaction, connection.total_changes)


async def compare(folder: Path, script: list[tuple[str, Any]]) -> None:
    for name in ("inline.db", "plain.db"):
        (folder / name).unlink(missing_ok=True)
    inline = await InlineSqlite(
        lambda: sqlite3.connect(folder / "inline.db", check_same_thread=False, isolation_level=None), 64)
    plain = await aiosqlite.connect(folder / "plain.db", isolation_level=None)
    try:
        for connection in (inline, plain):
            await connection.execute(SCHEMA)
        for kind, params in script:
            ours = await outcome(inline, kind, params, inline=True)
            theirs = await outcome(plain, kind, params, inline=False)
            if kind == "insert_many" and ours[0] == "ok":  # `many` returns nothing, as executemany gives no rows
                ours = ("ok", None, *ours[2:])
            assert ours == theirs, (kind, params)
        held = [await (await c.execute(f"SELECT {COLUMNS} FROM t ORDER BY id")).fetchall() for c in (inline, plain)]
        assert held[0] == held[1]
    finally:
        await inline.close()
        await plain.close()


def test_generated_statements_give_what_aiosqlite_gives(tmp_path: Path) -> None:
    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(steps, min_size=1, max_size=14))
    def check(script: list[tuple[str, Any]]) -> None:
        asyncio.run(compare(tmp_path, script))

    check()


def test_a_transaction_with_every_kind_of_step(tmp_path: Path) -> None:
    """One fixed script, so that a failure reads plainly: rowcounts above one, a constraint error
    inside a transaction (which goes on), a rollback, and the errors of a misplaced BEGIN or COMMIT."""
    asyncio.run(compare(tmp_path, [
        ("insert_many", [(1, "a", 5, 1.5, b"x"), (2, "b", 7, None, None), (3, None, -1, 0.0, b"")]),
        ("BEGIN IMMEDIATE", ()),
        ("BEGIN IMMEDIATE", ()),  # already in a transaction
        ("insert", (4, "a", 0, None, None)),  # s is unique
        ("update", (10, 2.5, 0, "b")),
        ("select", (0, "zz")),
        ("api_first", (0, "a")),
        ("COMMIT", ()),
        ("COMMIT", ()),  # no transaction
        ("BEGIN IMMEDIATE", ()),
        ("delete", (100, "b")),
        ("ROLLBACK", ()),
        ("count", ("|", None)),
        ("first", (1000, "")),
    ]))
