"""The unit of work a handler runs in: one transaction, the outbox and the inbox.

The transaction is a `cancelflow.db.DriverTransaction` (`db.transactions`: SQLite, and PostgreSQL
through asyncpg) or a session: both begin, commit, roll back and close the same way, and `Db` runs
the statements in either."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from cancelflow.crashpoints import crash_point
from cancelflow.events import Envelope, Payload, envelope_for, utcnow
from cancelflow.messaging.codec import Message, encode
from cancelflow.messaging.store import MessagingTables
from cancelflow.sql import Db

# What a unit of work opens its transaction with: `cancelflow.db.transactions(engine)` (a session
# factory, or driver transactions). Typed loosely: both have begin/commit/rollback/close.
Transactions = Callable[[], Any]

OUTBOX = "outbox"  # what a unit of work wrote, for `on_commit`: outbox rows (the relay's wake-up)


class UnitOfWork:
    """`async with uow:` opens a transaction; `emit` adds to the outbox; `commit` records the inbox. The
    `HandlerContext` (messaging/dispatch.py) of a handler one by one and in a batch.

    Handlers that call the outside world (vendor, gateway, SMTP) first record their intent and
    `checkpoint()` it, so a crash after the call is found and resolved on redelivery.
    """

    def __init__(self, sessions: Transactions, tables: MessagingTables, *,
                 producer: str, message: Message[Payload] | None = None,
                 on_commit: Callable[[frozenset[str]], None] | None = None, write_lock: asyncio.Lock | None = None) -> None:
        self._sessions = sessions
        self._tables = tables
        self._producer = producer
        self.message = message
        self._on_commit = on_commit
        self.emitted: list[Envelope] = []
        self._outbox_rows: list[dict[str, Any]] = []
        self.session: Any  # the transaction: a DriverTransaction, or a session
        self.db: Db  # the transaction's statements, the fast way (cancelflow.sql)
        # SQLite has one writer: concurrent units of work queue here instead of in SQLite's sleeping
        # busy handler. Held until the first commit or checkpoint; what follows a checkpoint (after a
        # vendor/gateway/SMTP call) is short and relies on SQLite's own lock.
        self._write_lock = write_lock
        self._holding = False
        self._batched = False  # handling a batch of records in this one transaction
        self._inbox_rows: list[dict[str, Any]] = []
        # What this transaction wrote that a worker of the process waits for (OUTBOX, and whatever a
        # service names with `wrote`): handed to `on_commit`, so only those workers are woken.
        self._written: set[str] = set()

    async def __aenter__(self) -> UnitOfWork:
        if self._write_lock is not None:
            await self._write_lock.acquire()
            self._holding = True
        self.session = self._sessions()
        self.db = Db(self.session)
        try:
            await self.session.begin()
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        # Whatever was not committed explicitly is rolled back (including on exceptions).
        self._written.clear()
        try:
            await self.session.rollback()
            await self.session.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._holding and self._write_lock is not None:
            self._holding = False
            self._write_lock.release()

    async def already_processed(self, message_id: str) -> bool:
        return await self.db.first(self._tables.inbox_has, message_id=message_id) is not None

    def emit(self, payload: Payload, *, correlation_id: str | None = None, key: str | None = None,
             headers: dict[str, str] | None = None) -> Envelope:
        causation = self.message.event_id if self.message else None
        # CONTRACT.md section 1: what a request causes is correlated by its request id. Otherwise the
        # handled record's correlation goes on (an upstream record's own trace id stops at its request).
        request_id = getattr(payload, "request_id", None)
        correlation = (correlation_id or (str(request_id) if request_id else None)
                       or (self.message.envelope.correlation_id if self.message else None) or payload.record_key())
        envelope = envelope_for(payload, producer=self._producer, correlation_id=correlation,
                                causation_id=causation)
        self.emit_envelope(envelope, topic=payload.topic, key=key or payload.record_key(), headers=headers)
        return envelope

    def emit_envelope(self, envelope: Envelope, *, topic: str, key: str | None,
                      headers: dict[str, str] | None = None) -> None:
        self._outbox_rows.append({
            "topic": topic, "key": key, "value": encode(envelope), "headers": headers,
            "event_type": envelope.event_type, "created_at": utcnow(),
        })
        self.emitted.append(envelope)

    def wrote(self, what: str) -> None:
        """Say that this transaction wrote something a worker waits for (`on_commit` hears of it)."""
        self._written.add(what)

    async def _flush_outbox(self) -> None:
        if self._outbox_rows:
            await self.db.run_many(self._tables.add_outbox, self._outbox_rows)
            self._outbox_rows.clear()
            self._written.add(OUTBOX)

    def _committed(self) -> None:
        written = frozenset(self._written)
        self._written.clear()
        if self._on_commit:
            self._on_commit(written)

    # --- a batch of records in one transaction ------------------------------------------------------

    async def processed_among(self, message_ids: list[str]) -> set[str]:
        """Which of these ids the inbox already holds: one query for a poll's batch."""
        return {row["message_id"] for row in await self.db.among(self._tables.inbox_among, message_ids)}

    def begin_step(self, message: Message[Payload]) -> None:
        """Handle `message` inside the batch's transaction (what it emits joins the batch's outbox rows)."""
        self.message = message
        self._batched = True

    def end_step(self) -> None:
        """The message is done: its inbox row is written with the batch."""
        assert self.message is not None
        self.mark_processed_later(self.message)

    def mark_processed_later(self, message: Message[Payload]) -> None:
        """`message` is done: its inbox row is written with the next `commit_batch`."""
        self.message = message
        self._inbox_rows.append(self._inbox_row(message.event_id))

    def marks(self) -> tuple[int, int]:
        """Where the outbox rows and emitted events not yet flushed end (see `truncate`)."""
        return len(self._outbox_rows), len(self.emitted)

    def truncate(self, outbox_mark: int, emitted_mark: int) -> None:
        """Forget what was emitted since `marks()` returned these (its savepoint was rolled back)."""
        del self._outbox_rows[outbox_mark:]
        del self.emitted[emitted_mark:]

    async def commit_batch(self) -> None:
        """Write the batch's outbox and inbox rows (one statement each) and commit."""
        if self._inbox_rows:
            await self.db.run_many(self._tables.add_inbox, self._inbox_rows)
            self._inbox_rows = []
        self.message = None
        await self.commit()

    async def checkpoint(self) -> None:
        """Commit what is done so far (state and outbox), without marking the message processed."""
        if self._batched:
            raise RuntimeError("a handler that calls the outside world cannot run in a batch")
        await self._flush_outbox()
        await self.session.commit()
        self._release()
        # No explicit begin: the next statement starts a transaction, so none (and on SQLite no
        # write lock) is held while the handler waits on the vendor, the gateway or SMTP.
        self._committed()

    @contextlib.asynccontextmanager
    async def outside(self) -> AsyncIterator[None]:
        """For a call to the outside world (vendor, gateway): what is done so far (the intent) is
        committed first and no lock is held during the call; a new transaction begins after it."""
        await self.checkpoint()
        yield
        await self.resume()

    async def resume(self) -> None:
        """Begin the next transaction after a checkpoint, queueing for the write lock first."""
        if self._write_lock is not None and not self._holding:
            await self._write_lock.acquire()
            self._holding = True
        await self.session.begin()

    def _inbox_row(self, message_id: str) -> dict[str, Any]:
        msg = self.message
        return {"message_id": message_id, "topic": msg.topic if msg else "",
                "partition": msg.partition if msg else -1, "offset": msg.offset if msg else -1,
                "processed_at": utcnow()}

    async def _record_processed(self, message_id: str) -> None:
        await self.db.run(self._tables.add_inbox, **self._inbox_row(message_id))

    async def commit(self, *, mark_processed: str | None = None) -> None:
        await self._flush_outbox()
        if mark_processed is None and self.message is not None:
            mark_processed = self.message.event_id
        if mark_processed is not None:
            await self._record_processed(mark_processed)
        await self.session.commit()
        self._release()
        crash_point(f"{self._producer}.after_commit")
        self._committed()
