"""Statements built once (`Query`) and run on the driver connection (`Db`): a speed fork of SQLAlchemy.

Building and executing every statement through SQLAlchemy cost more than running it. `Db` runs the SQL,
parameter order and bind/result conversions SQLAlchemy compiled once, in a session's transaction or a
`cancelflow.db.DriverTransaction`, and commits nothing. docs/performance.md, items 8 and 26.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Executable, bindparam, text
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    """One statement compiled for one dialect and one set of parameter names."""

    sql: str
    names: tuple[str, ...]  # the parameters, in the order of the SQL's placeholders
    binds: tuple[Callable[[Any], Any] | None, ...]  # the bind processor of each position
    fixed: dict[str, Any]  # values the statement carries (literals, scalar column defaults)
    computed: dict[str, Callable[[], Any]]  # column defaults computed per row (callables)
    keys: tuple[str, ...]  # result columns
    # The result processor of each column; None until the column types are known, for a dialect whose
    # conversions depend on the types the server reports (asyncpg: numeric or float, by type oid).
    results: tuple[Callable[[Any], Any] | None, ...] | None
    types: tuple[Any, ...]  # the SQLAlchemy type of each result column

    @classmethod
    def compile(cls, construct: Executable, dialect: Dialect, names: Iterable[str]) -> _Plan:
        compiled = cast(ClauseElement, construct).compile(dialect=dialect, column_keys=sorted(names))
        assert isinstance(compiled, SQLCompiler)
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise TypeError("expanding parameters (IN lists) are not supported by Query: use the session")
        fixed = dict(compiled.construct_params(_check=False))
        computed: dict[str, Callable[[], Any]] = {}
        for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
            default: Any = column.default if column in compiled.insert_prefetch else column.onupdate
            if default is None or not (default.is_scalar or default.is_callable):
                raise TypeError(f"column default of {column} is not supported by Query: use the session")
            if default.is_scalar:
                fixed[column.key] = default.arg
            else:
                computed[column.key] = functools.partial(default.arg, None)
        processors = cast(Mapping[str, Callable[[Any], Any]], compiled._bind_processors)
        positions = tuple(compiled.positiontup or ())
        return cls(
            sql=compiled.string,
            names=positions,
            binds=tuple(processors.get(name) for name in positions),
            fixed=fixed,
            computed=computed,
            keys=tuple(entry.keyname for entry in compiled._result_columns),
            results=(tuple(entry.type._cached_result_processor(dialect, None) for entry in compiled._result_columns)
                     if dialect.name == "sqlite" else None if compiled._result_columns else ()),
            types=tuple(entry.type for entry in compiled._result_columns),
        )

    def parameters(self, given: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, bind in zip(self.names, self.binds, strict=True):
            if name in given:
                value = given[name]
            elif name in self.computed:
                value = self.computed[name]()
            else:
                value = self.fixed[name]
            values.append(value if bind is None else bind(value))  # None too: JSON stores 'null'
        return values

    def row(self, values: Sequence[Any]) -> Row:
        assert self.results is not None
        return {key: value if convert is None else convert(value)
                for key, convert, value in zip(self.keys, self.results, values, strict=True)}


class Query:
    """A statement built once: `Query(select(t).where(t.c.id == bindparam("id")))`."""

    __slots__ = ("construct", "_plans")

    def __init__(self, construct: Executable) -> None:
        self.construct = construct
        self._plans: dict[tuple[int, frozenset[str]], _Plan] = {}

    @staticmethod
    def _key(dialect: Dialect, names: Iterable[str]) -> tuple[int, frozenset[str]]:
        return id(dialect), frozenset(names)

    def plan(self, dialect: Dialect, names: Iterable[str]) -> _Plan:
        key = self._key(dialect, names)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan.compile(self.construct, dialect, key[1])
        return plan

    def typed(self, dialect: Dialect, names: Iterable[str], column_types: Sequence[Any]) -> _Plan:
        """The plan for `names` with its result conversions, from the column types the server reported
        (kept for the next call)."""
        plan = self.plan(dialect, names)
        typed = self._plans[self._key(dialect, names)] = dataclasses.replace(plan, results=tuple(
            kind._cached_result_processor(dialect, column_type)
            for kind, column_type in zip(plan.types, column_types, strict=True)))
        return typed

    def __repr__(self) -> str:
        return f"Query({self.construct})"


class Among:
    """A statement with an IN list, which a `Query` cannot hold: `Among(lambda ids: select(t).where(
    t.c.id.in_(ids)))`, run with `Db.among`. A statement is built for each power of two up to `most`
    (a list is padded by repeating its last value, and longer lists go in chunks), so a handful are
    ever built and each is compiled once, like any `Query`."""

    __slots__ = ("_build", "most", "_names", "_queries")

    def __init__(self, build: Callable[[list[Any]], Executable], *, most: int = 256) -> None:
        self._build = build
        self.most = most
        self._names = tuple(f"among_{i}" for i in range(most))
        self._queries: dict[int, Query] = {}

    def query(self, size: int) -> Query:
        """The statement for `size` values (a power of two up to `most`)."""
        if size < 1 or size > self.most or size & (size - 1):
            raise ValueError(f"not a power of two up to {self.most}: {size}")
        if size not in self._queries:
            self._queries[size] = Query(self._build([bindparam(name) for name in self._names[:size]]))
        return self._queries[size]

    def chunks(self, values: Sequence[Any]) -> Iterator[tuple[Query, dict[str, Any]]]:
        """Each statement to run for `values`, with its parameters."""
        for start in range(0, len(values), self.most):
            chunk = values[start:start + self.most]
            size = 1 << (len(chunk) - 1).bit_length()
            yield self.query(size), {name: chunk[min(i, len(chunk) - 1)] for i, name in enumerate(self._names[:size])}


class Savepoint:
    """A named savepoint as three plain statements, run by `Db.savepoint` (or one by one).

    The session's `begin_nested()` cost as much as the statements inside it: docs/performance.md, item 17."""

    __slots__ = ("begin", "release", "rollback_to")

    def __init__(self, name: str) -> None:
        if not name.isidentifier():
            raise ValueError(f"not a savepoint name: {name!r}")
        self.begin = Query(text(f"SAVEPOINT {name}"))
        self.release = Query(text(f"RELEASE SAVEPOINT {name}"))
        self.rollback_to = Query(text(f"ROLLBACK TO SAVEPOINT {name}"))


class DriverTransaction(Protocol):
    """A transaction on a driver connection without a session (`cancelflow.db.DriverTransaction`)."""

    @property
    def dialect(self) -> Dialect: ...

    async def connection(self) -> Any: ...


class Db:
    """Runs `Query`s in a session's current transaction, or a `DriverTransaction`:
    `await db.first(SUBSCRIPTION, subscription_id=s)`.

    Rows come back as plain dicts on every database."""

    __slots__ = ("session", "_dialect", "_direct", "_transaction", "_connection", "_driver_tx")

    def __init__(self, session: AsyncSession | DriverTransaction) -> None:
        self.session = session
        self._transaction: object = None  # the session transaction `_connection` belongs to
        self._connection: Any = None
        if not isinstance(session, AsyncSession):
            self._driver_tx: DriverTransaction | None = session
            self._dialect = session.dialect
            self._direct = True
            return
        self._driver_tx = None
        bind = session.bind
        assert bind is not None, "a Db needs a session bound to an engine"
        self._dialect = bind.dialect
        self._direct = self._dialect.name == "sqlite"

    @property
    def _orm(self) -> AsyncSession:
        """The session, for the statements not run the direct way (a DriverTransaction's always are)."""
        return cast(AsyncSession, self.session)

    async def _plan(self, query: Query, names: Iterable[str]) -> tuple[_Plan, Any]:
        """The statement's plan for the driver connection (the direct way), and that connection."""
        plan = query.plan(self._dialect, names)
        driver = await self._driver()
        if plan.results is None:  # result conversions that depend on the column types the server reports
            plan = query.typed(self._dialect, names, await driver.result_types(plan.sql))
        return plan, driver

    async def all(self, query: Query, /, **params: Any) -> list[Row]:
        if self._direct:
            plan, driver = await self._plan(query, params)
            return [plan.row(values) for values in await driver.rows(plan.sql, plan.parameters(params))]
        return [dict(row) for row in (await self._orm.execute(query.construct, params)).mappings()]

    async def first(self, query: Query, /, **params: Any) -> Row | None:
        """The first row, or None; the rest are not fetched."""
        if self._direct:
            plan, driver = await self._plan(query, params)
            values = await driver.first_row(plan.sql, plan.parameters(params))
            return None if values is None else plan.row(values)
        row = (await self._orm.execute(query.construct, params)).mappings().first()
        return None if row is None else dict(row)

    async def scalar(self, query: Query, /, **params: Any) -> Any:
        row = await self.first(query, **params)
        return next(iter(row.values())) if row else None

    async def run(self, query: Query, /, **params: Any) -> int:
        """An insert, update or delete; returns how many rows it touched."""
        if self._direct:
            plan = query.plan(self._dialect, params)
            return int(await (await self._driver()).touch(plan.sql, plan.parameters(params)))
        result = await self._orm.execute(query.construct, params)
        return int(cast(CursorResult[Any], result).rowcount)

    async def run_many(self, query: Query, rows: Sequence[Mapping[str, Any]]) -> None:
        """The same insert, update or delete for every row (all rows have the same keys)."""
        if not rows:
            return
        if self._direct:
            plan = query.plan(self._dialect, rows[0])
            await (await self._driver()).many(plan.sql, [plan.parameters(row) for row in rows])
            return
        await self._orm.execute(query.construct, list(rows))

    async def among(self, among: Among, values: Sequence[Any]) -> list[Row]:
        """The rows of an `Among` statement for `values`. A row matched by two values comes back once
        per chunk that holds one of them (once, for lists of up to `most` values)."""
        rows: list[Row] = []
        for query, params in among.chunks(values):
            rows.extend(await self.all(query, **params))
        return rows

    @contextlib.asynccontextmanager
    async def savepoint(self, savepoint: Savepoint) -> AsyncIterator[None]:
        """What runs inside is undone, and the exception raised on, if it raises; the transaction
        goes on either way."""
        await self.run(savepoint.begin)
        try:
            yield
        except Exception:
            await self.undo(savepoint)
            raise
        await self.run(savepoint.release)

    async def undo(self, savepoint: Savepoint) -> None:
        """Roll back to `savepoint` and release it: its statements are undone, the transaction goes on."""
        await self.run(savepoint.rollback_to)
        await self.run(savepoint.release)

    async def _driver(self) -> Any:
        """The driver connection of the session's transaction, looked up once per transaction (asking
        the session costs two greenlet switches, more than running the statement)."""
        if self._driver_tx is not None:
            return await self._driver_tx.connection()
        assert isinstance(self.session, AsyncSession)
        transaction = self._innermost()
        if transaction is None or transaction is not self._transaction:
            # The session begins its transaction when a statement first asks for the connection (BEGIN
            # IMMEDIATE on SQLite), and a savepoint (`begin_nested`) the same way: ask for each
            # (a `Savepoint` is a statement in the transaction, no new lookup).
            connection = await self.session.connection()
            self._connection = (await connection.get_raw_connection()).driver_connection
            self._transaction = self._innermost()
        return self._connection

    def _innermost(self) -> object:
        assert isinstance(self.session, AsyncSession)
        sync = self.session.sync_session
        return sync.get_nested_transaction() or sync.get_transaction()
