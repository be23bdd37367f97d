"""Database setup shared by every service: one engine per service database, SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
from sqlalchemy import MetaData, Table, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from cancelflow.logging import get_logger
from cancelflow.messaging.relay import RoundLock, no_lock

log = get_logger(__name__)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_path(url: str) -> str:
    """The file of a SQLite URL ('' or ':memory:' for an in-memory database)."""
    return url.split(":///", 1)[-1]


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# JSON columns (status views, email contexts, outbox headers) go through orjson: the standard
# library's encoder was 4% of the status tracker's CPU in a benchmark burst.
JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def make_engine(url: str) -> AsyncEngine:
    if not is_sqlite(url):
        return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True, **JSON_CODEC)
    path = _sqlite_path(url)
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # A few pooled connections, so opening one per unit of work (NullPool) does not cost the pragmas
    # every time. BEGIN IMMEDIATE still serializes the writers.

    writers = asyncio.Lock()  # this engine's connections queue here for the write lock (see InlineSqlite)

    async def connect() -> aiosqlite.Connection:
        connection = InlineSqlite(lambda: sqlite3.connect(path, timeout=30, check_same_thread=False), 64)
        connection.writers = writers
        return await connection

    engine = create_async_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=False, async_creator=connect,
                                 **JSON_CODEC)
    _sqlite_serializable_writes(engine)
    _DIRECT[engine] = direct = DriverConnections(connect, engine.dialect)
    event.listen(engine.sync_engine, "engine_disposed", lambda _engine: direct.close())
    return engine


class InlineSqlite(aiosqlite.Connection):
    """aiosqlite without a thread hop per call: statements run on the event loop, BEGIN too unless it must wait.

    Profiled: handing every cursor, execute, fetch and commit to aiosqlite's thread and back (two
    context switches and a fight for the GIL each) cost about half the CPU of a unit of work (2.3 ms
    against 1.2 ms for a four-statement transaction). A statement on a local SQLite file takes
    microseconds, so it runs on the event loop's thread. The one statement that can wait is BEGIN
    IMMEDIATE (every transaction starts with it, see `_sqlite_serializable_writes`): it waits in
    SQLite's busy handler while another connection writes, and that connection may be this process's
    own, waiting for the loop. So BEGIN is first tried on the loop with no busy wait, and only when
    another connection holds the write lock does it go to the thread and wait there (the hop cost
    about 300 microseconds of CPU, more than half of a one-insert transaction). Once BEGIN returns,
    this connection holds the write lock and nothing after it waits (WAL: readers never block,
    commits do not wait).
    A call made while the thread still works for this connection (its caller was cancelled, say at
    shutdown) queues behind it: a sqlite3 connection must never be used by two threads at once.

    The connections of one engine (one process: its consumer, outbox relay, email sender, HTTP views)
    first queue for the write lock among themselves, on `writers`, from BEGIN until their transaction
    ends. Measured without it: a BEGIN that found this process's own consume loop holding the lock (it
    yields between a batch's records) went to the thread and waited in SQLite's busy handler, which
    sleeps in steps of up to 100 ms; the relay's events were late by that much. Queued, it begins
    the moment the holder commits, without the thread. Other processes (a second instance) are still
    waited for in the thread.
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
    """A SQLite engine's driver connections for units of work and relays, without SQLAlchemy's session
    or pool (`transaction()`).

    Profiled (py-spy --gil, paced at 100 requests per second): the session around each transaction
    (its begin, the lookup of its connection, the BEGIN IMMEDIATE run through SQLAlchemy's execution,
    the commit, the pool's check-in) was 16% of billing's CPU and 29% of dispute's, more than the
    statements it wrapped. Here a transaction is BEGIN IMMEDIATE, the statements and COMMIT on an
    `InlineSqlite` connection: the same connections (same setup, same queue for the write lock among
    the engine's connections) with none of the machinery. SQLAlchemy's sessions stay for the rest
    (HTTP views, migrations, PostgreSQL).
    """

    IDLE_MAX = 4  # connections kept open between transactions; more are opened while needed

    def __init__(self, connect: Callable[[], Awaitable[InlineSqlite]], dialect: Dialect) -> None:
        self._connect = connect
        self.dialect = dialect
        self._idle: list[InlineSqlite] = []
        self._closed = False

    def transaction(self) -> DriverTransaction:
        return DriverTransaction(self)

    def reads(self) -> DriverTransaction:
        """For reads only: each statement runs on its own, outside a transaction (WAL: a consistent
        snapshot per statement, and no wait for the write lock, which a writer of this process may
        hold for a whole poll's batch)."""
        return DriverTransaction(self, reads_only=True)

    async def acquire(self) -> InlineSqlite:
        if self._closed:
            raise RuntimeError("the engine was disposed")
        if self._idle:
            return self._idle.pop()
        connection = await self._connect()
        await connection._execute(_sqlite_pragmas, connection._conn)
        return connection

    async def release(self, connection: InlineSqlite) -> None:
        try:
            if connection.in_transaction:
                await connection.run("ROLLBACK")
        except BaseException:
            connection.shut()  # in an unknown state: not reused
            raise
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
        self._connection: InlineSqlite | None = None
        self._open = False
        self._reads_only = reads_only

    @property
    def dialect(self) -> Dialect:
        return self._pool.dialect

    async def connection(self) -> InlineSqlite:
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
        await self._connection.run("BEGIN IMMEDIATE")
        self._open = True

    async def commit(self) -> None:
        if self._open:
            assert self._connection is not None
            self._open = False
            await self._connection.run("COMMIT")

    async def rollback(self) -> None:
        if self._open:
            assert self._connection is not None
            self._open = False
            await self._connection.run("ROLLBACK")

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


_DIRECT: weakref.WeakKeyDictionary[AsyncEngine, DriverConnections] = weakref.WeakKeyDictionary()


def transactions(engine: AsyncEngine) -> Callable[[], AsyncSession | DriverTransaction]:
    """What units of work and relays open their transactions with: `DriverTransaction`s on a SQLite
    engine made by `make_engine`, sessions otherwise."""
    direct = _DIRECT.get(engine)
    return direct.transaction if direct is not None else session_factory(engine)


def reads(engine: AsyncEngine) -> Callable[[], AsyncSession | DriverTransaction]:
    """For a read that needs no transaction around it (the relay's look at the outbox): statements
    on their own on SQLite (`DriverConnections.reads`), a session otherwise."""
    direct = _DIRECT.get(engine)
    return direct.reads if direct is not None else session_factory(engine)


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
