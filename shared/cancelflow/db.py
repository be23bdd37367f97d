"""Database setup shared by every service: one engine per service database, SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosqlite
import asyncpg
import orjson
from sqlalchemy import MetaData, Table, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from cancelflow.logging import get_logger

log = get_logger(__name__)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_path(url: str) -> str:
    """The file of a SQLite URL ('' or ':memory:' for an in-memory database)."""
    return url.split(":///", 1)[-1]


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# JSON columns (status views, email contexts, outbox headers) go through orjson, the cheaper encoder
# (docs/performance.md, "The speed forks").
JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def make_engine(url: str) -> AsyncEngine:
    if not is_sqlite(url):
        engine = create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True, **JSON_CODEC)
        if engine.dialect.driver == "asyncpg":
            _register(engine, DriverConnections(_pg_connector(engine), engine.dialect, begin="BEGIN"))
        return engine
    path = _sqlite_path(url)
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # A few pooled connections, so opening one per unit of work (NullPool) does not cost the pragmas
    # every time. BEGIN IMMEDIATE still serializes the writers.

    writers = asyncio.Lock()  # this engine's connections queue here for the write lock (see InlineSqlite)

    async def connect() -> InlineSqlite:
        connection = InlineSqlite(lambda: sqlite3.connect(path, timeout=30, check_same_thread=False), 64)
        connection.writers = writers
        await connection
        return connection

    async def connect_for_units_of_work() -> InlineSqlite:
        connection = await connect()
        await connection._execute(_sqlite_pragmas, connection._conn)  # the engine's "connect" hook
        return connection

    engine = create_async_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=False, async_creator=connect,
                                 **JSON_CODEC)
    _sqlite_serializable_writes(engine)
    _register(engine, DriverConnections(connect_for_units_of_work, engine.dialect, begin="BEGIN IMMEDIATE"))
    return engine


def _register(engine: AsyncEngine, direct: DriverConnections) -> None:
    _DIRECT[engine] = direct
    event.listen(engine.sync_engine, "engine_disposed", lambda _engine: direct.close())


class InlineSqlite(aiosqlite.Connection):
    """aiosqlite without a thread hop per call, a speed fork: statements run on the event loop.

    The hop cost more than the statement. Only BEGIN IMMEDIATE can wait (for another writer): it is tried
    on the loop without waiting, and goes to the thread when the database is busy; a call made while the
    thread works for this connection queues behind it (a sqlite3 connection is never used by two threads).
    The connections of one engine queue for the write lock among themselves, on `writers`, from BEGIN to
    the end of their transaction. docs/performance.md, items 5, 11 and 20.
    """

    _in_thread = 0  # calls handed to the thread and not finished yet (only touched on the loop)
    writers: asyncio.Lock | None = None  # shared by the connections of one engine
    _writing = False  # this connection holds `writers`

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        may_wait = bool(args) and isinstance(args[0], str) and args[0].lstrip()[:5].upper() == "BEGIN"
        if may_wait and self.writers is not None and not self._writing:
            await self._queue_for_writing(self.writers)
        try:
            return await self._call(fn, args, kwargs, may_wait)
        finally:
            if self._writing and not self._in_transaction():
                self._writing = False  # the transaction ended (commit, rollback, failed BEGIN, close)
                self.writers.release()  # type: ignore[union-attr]

    def _in_transaction(self) -> bool:
        try:
            return self._connection is not None and self._connection.in_transaction
        except sqlite3.ProgrammingError:  # closed (mid-transaction: at shutdown, or an invalidated connection)
            return False

    async def _queue_for_writing(self, writers: asyncio.Lock) -> None:
        try:
            async with asyncio.timeout(BUSY_TIMEOUT_MS / 1000):
                await writers.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError(
                f"database is locked: this process's other writers held it for {BUSY_TIMEOUT_MS} ms") from None
        self._writing = True

    async def _call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], may_wait: bool) -> Any:
        if not self._in_thread:
            if not may_wait:
                return fn(*args, **kwargs)
            # Most of the time no other connection writes: try BEGIN here without waiting, and go to
            # the thread (which may wait) only when the database is busy.
            if (began := self._begin_at_once(fn, args, kwargs)) is not _BUSY:
                return began
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._in_thread += 1

        def call() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:  # runs before the result is delivered: the count is right when the caller resumes
                loop.call_soon_threadsafe(self._finished_in_thread)

        self._tx.put_nowait((future, call))
        return await future

    def _finished_in_thread(self) -> None:
        self._in_thread -= 1

    @property
    def closed(self) -> bool:
        return not self._running or self._connection is None

    def shut(self) -> None:
        """Close from synchronous code (an engine's dispose): the thread closes the connection and
        ends, and no one is called back (the event loop may be gone by then)."""
        self._running = False

        def close_and_stop() -> object:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            return aiosqlite.core._STOP_RUNNING_SENTINEL

        self._tx.put_nowait((None, close_and_stop))

    async def run(self, sql: str) -> None:
        """One statement without parameters or rows (BEGIN IMMEDIATE, COMMIT, ROLLBACK)."""
        cursor = await self._execute(self._conn.execute, sql)
        cursor.close()

    # What `cancelflow.sql.Db` runs its statements with (the same calls on `PgDriver`): each is one
    # call on the loop (or queued behind the thread), the cursor opened and closed inside it.

    async def rows(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        return await self._execute(_fetch, self._conn, sql, parameters, all)  # type: ignore[no-any-return]

    async def first_row(self, sql: str, parameters: Sequence[Any]) -> Any:
        return await self._execute(_fetch, self._conn, sql, parameters, None)

    async def touch(self, sql: str, parameters: Sequence[Any]) -> int:
        return await self._execute(_touch, self._conn, sql, parameters)  # type: ignore[no-any-return]

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._execute(_many, self._conn, sql, rows)

    def _begin_at_once(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """BEGIN on the loop's thread with no busy wait: its result, or `_BUSY` when another
        connection holds the write lock (nothing began)."""
        connection = self._connection
        assert connection is not None
        connection.execute("PRAGMA busy_timeout=0")
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if connection.in_transaction or "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return _BUSY
        finally:
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


_BUSY = object()
BUSY_TIMEOUT_MS = 30_000


def _fetch(connection: sqlite3.Connection, sql: str, parameters: Sequence[Any], every: Any) -> Any:
    cursor = connection.execute(sql, parameters)
    try:
        return cursor.fetchall() if every is all else cursor.fetchone()
    finally:
        cursor.close()


def _touch(connection: sqlite3.Connection, sql: str, parameters: Sequence[Any]) -> int:
    cursor = connection.execute(sql, parameters)
    cursor.close()
    return cursor.rowcount


def _many(connection: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    connection.executemany(sql, rows).close()


def _sqlite_pragmas(dbapi_connection: Any) -> None:
    """How every connection to a service's SQLite file is set up (SQLAlchemy's and `DriverConnections`')."""
    dbapi_connection.isolation_level = None  # transactions are begun explicitly, BEGIN IMMEDIATE
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_serializable_writes(engine: AsyncEngine) -> None:
    # pysqlite begins transactions lazily, at the first write, so a read-check-write could interleave
    # with another process. BEGIN IMMEDIATE takes the write lock up front: every transaction is
    # serialized against other writers (two instances of a service may share the file).
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        _sqlite_pragmas(dbapi_connection)

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class DriverConnections:
    """An engine's driver connections for units of work and relays, without SQLAlchemy's session or
    execution (`transaction()`, `reads()`): `InlineSqlite` on SQLite, `PgDriver` (asyncpg) on PostgreSQL.

    The session around a transaction cost more than the statements in it (docs/performance.md, items 25
    and 26). Sessions stay for the rest: HTTP views, migrations, maintenance.
    """

    IDLE_MAX = 4  # connections kept open between transactions; more are opened while needed
    OPEN_MAX = 10  # in use at once, as the engine's own pool on PostgreSQL (5 + 5); more wait their turn

    def __init__(self, connect: Callable[[], Awaitable[Any]], dialect: Dialect, *, begin: str) -> None:
        self._connect = connect  # a new `InlineSqlite` or `PgDriver`, set up as the engine's are
        self.dialect = dialect
        self.begin = begin  # the statement a transaction begins with
        self._idle: list[Any] = []
        self._closed = False
        self._in_use = asyncio.Semaphore(self.OPEN_MAX)

    def transaction(self) -> DriverTransaction:
        return DriverTransaction(self)

    def reads(self) -> DriverTransaction:
        """For reads only: each statement runs on its own, outside a transaction (WAL: a consistent
        snapshot per statement, and no wait for the write lock, which a writer of this process may
        hold for a whole poll's batch)."""
        return DriverTransaction(self, reads_only=True)

    async def acquire(self) -> Any:
        if self._closed:
            raise RuntimeError("the engine was disposed")
        await self._in_use.acquire()
        try:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection
            return await self._connect()
        except BaseException:
            self._in_use.release()
            raise

    async def release(self, connection: Any) -> None:
        try:
            if connection.in_transaction:
                await connection.run("ROLLBACK")
        except BaseException:
            connection.shut()  # in an unknown state: not reused
            raise
        finally:
            self._in_use.release()
        if self._closed or len(self._idle) >= self.IDLE_MAX:
            connection.shut()
        else:
            self._idle.append(connection)

    def close(self) -> None:
        """The engine is disposed: idle connections close now, busy ones when they are released."""
        self._closed = True
        while self._idle:
            self._idle.pop().shut()


class DriverTransaction:
    """What a unit of work and a relay use of a session, on one of `DriverConnections`: `begin()` (awaited
    or `async with`), `commit()`, `rollback()`, `close()`, and `connection()` for `cancelflow.sql.Db`,
    which begins the transaction when none is open, as a session does after a commit."""

    __slots__ = ("_pool", "_connection", "_open", "_reads_only")

    def __init__(self, pool: DriverConnections, *, reads_only: bool = False) -> None:
        self._pool = pool
        self._connection: Any = None  # an InlineSqlite or a PgDriver
        self._open = False
        self._reads_only = reads_only

    @property
    def dialect(self) -> Dialect:
        return self._pool.dialect

    async def connection(self) -> Any:
        if self._reads_only:
            if self._connection is None:
                self._connection = await self._pool.acquire()
            return self._connection
        if not self._open:
            await self._begin()
        assert self._connection is not None
        return self._connection

    def begin(self) -> _Begin:
        return _Begin(self)

    async def _begin(self) -> None:
        if self._reads_only:
            raise RuntimeError("reads only: no transaction to begin")
        if self._open:
            raise RuntimeError("a transaction is already open")
        if self._connection is None:
            self._connection = await self._pool.acquire()
        await self._connection.run(self._pool.begin)
        self._open = True

    async def commit(self) -> None:
        await self._end("COMMIT")

    async def rollback(self) -> None:
        await self._end("ROLLBACK")

    async def _end(self, sql: str) -> None:
        if self._open:
            assert self._connection is not None
            self._open = False
            await self._connection.run(sql)

    async def close(self) -> None:
        connection, self._connection, self._open = self._connection, None, False
        if connection is not None:
            await self._pool.release(connection)  # rolls back what was left open

    async def __aenter__(self) -> DriverTransaction:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


class _Begin:
    """`await tx.begin()`, or `async with tx.begin():` (commit at the end, rollback on an exception)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: DriverTransaction) -> None:
        self._tx = tx

    def __await__(self) -> Generator[Any, None, None]:
        return self._tx._begin().__await__()

    async def __aenter__(self) -> DriverTransaction:
        await self._tx._begin()
        return self._tx

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            await self._tx.commit()
        else:
            await self._tx.rollback()


class PgDriver:
    """An asyncpg connection as `cancelflow.sql.Db` and `DriverTransaction` use it (the calls of
    `InlineSqlite`): statements prepared once by asyncpg, values and rows converted by SQLAlchemy's
    processors (`Db`), no SQLAlchemy execution in between (docs/performance.md, item 26)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    @property
    def closed(self) -> bool:
        return bool(self._raw.is_closed())

    @property
    def in_transaction(self) -> bool:
        return bool(self._raw.is_in_transaction())

    def shut(self) -> None:
        self._raw.terminate()

    async def run(self, sql: str) -> None:
        await self._lost_is_transient(self._raw.execute(sql))

    async def rows(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        return await self._lost_is_transient(self._raw.fetch(sql, *parameters))  # type: ignore[no-any-return]

    async def first_row(self, sql: str, parameters: Sequence[Any]) -> Any:
        return await self._lost_is_transient(self._raw.fetchrow(sql, *parameters))

    async def touch(self, sql: str, parameters: Sequence[Any]) -> int:
        # the status: "UPDATE 3", "INSERT 0 1", "DELETE 0"
        status = await self._lost_is_transient(self._raw.execute(sql, *parameters))
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else -1

    async def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._lost_is_transient(self._raw.executemany(sql, rows))

    async def result_types(self, sql: str) -> list[int]:
        """The type oid of each result column (asyncpg keeps the prepared statement for the next call)."""
        statement = await self._lost_is_transient(self._raw.prepare(sql))
        return [attribute.type.oid for attribute in statement.get_attributes()]

    async def _lost_is_transient(self, call: Awaitable[Any]) -> Any:
        """A call that failed because the connection is gone (the server restarted, or ended an idle
        connection) raises `ConnectionLost`, which the retry policy retries (on a new connection:
        a closed one is not used again). asyncpg's own error for a connection the server ended while
        idle is an InternalClientError ('cannot switch to state ...'), so the connection is asked."""
        try:
            return await call
        except Exception as exc:
            if self._raw.is_closed():
                raise ConnectionLost(f"the connection to PostgreSQL was lost: {exc!r}") from exc
            raise


class ConnectionLost(ConnectionError):
    """A database connection ended under a statement (transient: retried on a new connection)."""


def _pg_connector(engine: AsyncEngine) -> Callable[[], Awaitable[PgDriver]]:
    """New asyncpg connections to the engine's database, with the type codecs SQLAlchemy's asyncpg
    dialect sets on its own (JSON and JSONB through the engine's serializers)."""
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    dialect: Any = engine.dialect

    async def connect() -> PgDriver:
        raw = await asyncpg.connect(dsn)
        try:
            adapted = SimpleNamespace(_connection=raw)  # what the dialect's codec setup reads
            await dialect.setup_asyncpg_json_codec(adapted)
            await dialect.setup_asyncpg_jsonb_codec(adapted)
            if dialect._native_inet_types is False:
                await dialect._disable_asyncpg_inet_codecs(adapted)
        except BaseException:
            raw.terminate()
            raise
        return PgDriver(raw)

    return connect


_DIRECT: weakref.WeakKeyDictionary[AsyncEngine, DriverConnections] = weakref.WeakKeyDictionary()


def transactions(engine: AsyncEngine) -> Callable[[], AsyncSession | DriverTransaction]:
    """What units of work and relays open their transactions with: `DriverTransaction`s on an engine
    made by `make_engine` (SQLite, or PostgreSQL through asyncpg), sessions otherwise."""
    direct = _DIRECT.get(engine)
    return direct.transaction if direct is not None else session_factory(engine)


def reads(engine: AsyncEngine) -> Callable[[], AsyncSession | DriverTransaction]:
    """For a read that needs no transaction around it (the relay's look at the outbox): statements
    on their own (`DriverConnections.reads`; on SQLite they then do not wait for the write lock), a
    session otherwise."""
    direct = _DIRECT.get(engine)
    return direct.reads if direct is not None else session_factory(engine)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine, metadata: MetaData) -> None:
    """The tables and indexes of `metadata` that the database lacks (create_all adds no index to a
    table that exists, such as one a newer release indexes)."""

    def create(conn: Any) -> None:
        metadata.create_all(conn)
        for table in metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)

    async with engine.begin() as conn:
        await conn.run_sync(create)


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


# A round's lock: enter it, learn whether this relay holds it.
RoundLock = Callable[[], contextlib.AbstractAsyncContextManager[bool]]


@contextlib.asynccontextmanager
async def no_lock() -> AsyncIterator[bool]:
    """One relay per outbox (an in-memory database, tests): every round is its own."""
    yield True


def relay_round_lock(url: str, engine: AsyncEngine, name: str = "outbox") -> RoundLock:
    """The lock the outbox relays of one database take turns with (messaging/relay.py): a file lock
    beside a SQLite file (instances sharing a SQLite file share a machine), a PostgreSQL advisory lock
    otherwise. Both go with the process that held them, however it ends."""
    if is_sqlite(url):
        path = _sqlite_path(url)
        if not path or path == ":memory:":
            return no_lock
        return FileRoundLock(Path(f"{path}.{name}-relay.lock"))
    return AdvisoryRoundLock(engine, zlib.crc32(f"cancelflow-relay:{name}".encode()))


class FileRoundLock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[bool]:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """What the end of the process does: the descriptor closes and the lock goes with it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AdvisoryRoundLock:
    def __init__(self, engine: AsyncEngine, key: int) -> None:
        self._engine = engine
        self._key = key

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[bool]:
        async with self._engine.connect() as conn:
            ours = bool((await conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key})).scalar())
            await conn.commit()
            if not ours:
                yield False
                return
            try:
                yield True
            finally:
                try:
                    await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
                    await conn.commit()
                except BaseException:
                    # The lock must not stay with a pooled connection: drop the connection, which
                    # releases it on the server.
                    await conn.invalidate()
                    raise


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
