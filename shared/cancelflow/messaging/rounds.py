"""A poll's records whose handlers call the outside world (vendor, gateway), handled together in rounds.

One by one, such a record costs two transactions (its intent, committed before the call, then the
answer) and its call waits for nobody but holds a transaction slot of its own. In rounds, every
record's database work up to its call runs in one shared transaction, which commits (every intent
at once); then all the calls go out together; then every answer is recorded in the next shared
transaction, and so on until every handler has finished. Records of one key stay in order.

The database work of the records never overlaps: one handler at a time runs until it reaches a call
(`outside()`, or `checkpoint()`/`resume()`) or finishes, so they share one session safely. Each
record's statements of a round run in a savepoint: a handler that raises rolls back only its own
statements and emitted events, and its record (with the records behind it of the same key) is handed
back to be handled one by one, where it is retried and dead-lettered as usual. Intents committed
before the failure stay, exactly as they would one by one: every call is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cancelflow import metrics
from cancelflow.events import Envelope, Payload
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.sql import Savepoint

log = get_logger(__name__)

# One record's savepoint at a time (their database work never overlaps).
STEP = Savepoint("round_step")

Handler = Callable[[Message, Any], Awaitable[None]]


@dataclass
class Step:
    """One record to handle: its place among its key's records, its message and its handler."""

    index: int
    message: Message
    handler: Handler


@dataclass
class Chain:
    """One key's steps, handled in order by a task that runs only when the coordinator lets it."""

    steps: list[Step]
    failed_at: int | None = None  # the record index from which this key's records go one by one
    error: Exception | None = None  # what the handler of that record raised
    broken: Exception | None = None  # the round went wrong around a record (not in its handler)
    finished: bool = False
    calling: bool = False  # parked before a call: waits for the round's commit, then calls
    _go: asyncio.Event = field(default_factory=asyncio.Event)
    _parked: asyncio.Event = field(default_factory=asyncio.Event)

    async def advance(self) -> None:
        """Let the chain run until it parks again (at a call, after a call, or finished)."""
        self._parked.clear()
        self._go.set()
        await self._parked.wait()

    async def park(self) -> None:
        self._go.clear()
        self._parked.set()
        await self._go.wait()

    def stop(self) -> None:
        self.finished = True
        self._parked.set()


class RoundStep:
    """What a handler sees as its unit of work when it runs in rounds: the shared transaction's session
    and statements, and its own message, savepoint and emitted events."""

    def __init__(self, uow: UnitOfWork, chain: Chain, message: Message) -> None:
        self._uow = uow
        self._chain = chain
        self.message = message
        self._open = False  # this record's savepoint
        self._outbox_mark = 0
        self._emitted_mark = 0

    @property
    def db(self) -> Any:
        return self._uow.db

    def wrote(self, what: str) -> None:
        self._uow.wrote(what)  # heard after the round's commit (a spare wake-up if this record is undone)

    def emit(self, payload: Payload, **kwargs: Any) -> Envelope:
        self._uow.message = self.message  # the shared unit of work names this record as the cause
        return self._uow.emit(payload, **kwargs)

    async def open(self) -> None:
        await self._uow.db.run(STEP.begin)
        self._open = True
        self._outbox_mark, self._emitted_mark = self._uow.marks()

    async def close(self) -> None:
        self._open = False
        await self._uow.db.run(STEP.release)

    async def abandon(self) -> None:
        """Undo this record's statements and events of the current round (what an earlier round
        committed stays: it was the intent, committed before a call, as one by one)."""
        if self._open:
            self._open = False
            await self._uow.db.undo(STEP)
            self._uow.truncate(self._outbox_mark, self._emitted_mark)

    async def checkpoint(self) -> None:
        """The work so far is committed with the round (every record's at once) before this returns."""
        await self.close()
        self._chain.calling = True
        await self._chain.park()

    async def resume(self) -> None:
        """Back from the call: wait for this record's turn in the next round's transaction."""
        self._chain.calling = False
        await self._chain.park()
        await self.open()

    @contextlib.asynccontextmanager
    async def outside(self) -> AsyncIterator[None]:
        await self.checkpoint()
        yield
        await self.resume()


async def _run_chain(chain: Chain, uow: UnitOfWork, seen: set[str],
                     log_context: Callable[[Message], contextlib.AbstractContextManager[object]]) -> None:
    try:
        await chain.park()  # the first round's database turn
        for step in chain.steps:
            message = step.message
            if message.event_id in seen:
                metrics.INBOX_DUPLICATES.labels(message.topic).inc()
                continue
            seen.add(message.event_id)
            view = RoundStep(uow, chain, message)
            started = time.perf_counter()
            with log_context(message):
                try:
                    await view.open()
                    await step.handler(message, view)
                    await view.close()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    chain.failed_at, chain.error = step.index, exc
                    try:
                        await view.abandon()
                    except Exception as undo:
                        chain.broken = undo
                        return
                    log.info("record handed back to be handled one by one", error=repr(exc))
                    return
            uow.mark_processed_later(message)
            metrics.EVENTS_CONSUMED.labels(message.topic, message.event_type).inc()
            metrics.HANDLER_SECONDS.labels(message.event_type).observe(time.perf_counter() - started)
    except Exception as exc:  # not the handler's: the round cannot say what became of this record
        chain.broken = exc
    finally:
        chain.stop()


async def run_in_rounds(uow: UnitOfWork, chains: list[Chain], seen: set[str],
                        log_context: Callable[[Message], contextlib.AbstractContextManager[object]]) -> None:
    """Drive `chains` to the end in rounds on `uow` (a transaction is open). `seen` holds the event ids
    already processed; each chain's `failed_at` tells what is left to handle one by one."""
    tasks = [asyncio.create_task(_run_chain(chain, uow, seen, log_context)) for chain in chains]
    try:
        for chain in chains:  # every task starts and parks for its first turn
            await chain._parked.wait()
        live = chains
        while True:
            for chain in live:  # the database turns, one handler at a time
                await chain.advance()
                if chain.broken is not None:
                    raise chain.broken  # nothing of the round can be trusted: every record one by one
            calling = [chain for chain in live if chain.calling and not chain.finished]
            await uow.commit_batch()  # intents, answers, outbox and inbox rows of this round
            if not calling:
                return
            await asyncio.gather(*(chain.advance() for chain in calling))  # the calls, together
            for chain in calling:
                if chain.broken is not None:
                    raise chain.broken
            await uow.resume()
            live = [chain for chain in calling if not chain.finished]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
