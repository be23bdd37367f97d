"""How far a service has read its upstream facts topics (subscriptions, charges), so that a request naming
a subscription or charge it does not know yet can tell "unknown" from "not read yet".

After a restart a service meets a backlog: a request may come before the facts published ahead of it.
The consume loop handles a poll's facts first and notes here, per facts partition it holds, its position,
the partition's high-water mark and the time of the last fact it returned. A request's time is read up
to when every such partition is read to its end, or has returned a fact at least as recent.

A request that names facts not known yet waits in its service's database (a state of its own), and
`FactsWaiter` settles it: taken in when its facts come, rejected as unknown once the facts are read up to
its time, or after a bound whatever they say.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat


@dataclass(frozen=True)
class _Read:
    position: int
    highwater: int
    last_fact_ms: int | None


class FactsProgress:
    def __init__(self, topics: set[str] | None = None) -> None:
        self.topics: set[str] = set(topics or ())
        self._read: dict[TopicPartition, _Read | None] = {}  # None: not fetched yet
        # As of the poll before: its records are all handled and committed once the loop polls again.
        self._handled: dict[TopicPartition, _Read | None] = {}

    async def update(self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """After a poll (whose facts are handled before anything else of it): where each facts partition
        of the assignment stands."""
        if not self.topics:
            return
        read: dict[TopicPartition, _Read | None] = {}
        for tp in consumer.assignment():
            if tp.topic not in self.topics:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:  # no fetch answered for it yet: its position may still be unknown
                read[tp] = None
                continue
            before = self._read.get(tp)
            last = before.last_fact_ms if before else None
            if batch.get(tp):
                last = max(last or 0, max(r.timestamp for r in batch[tp]))
            read[tp] = _Read(await consumer.position(tp), highwater, last)
        self._handled, self._read = self._read, read

    def read_up_to(self, at: datetime) -> bool:
        """Every facts partition this member holds is read to its end or past `at` (False while it holds
        none, or one has not been fetched yet: then nobody can say; True when it reads no facts topic).
        For the handlers of a poll: its facts are handled before anything else of it."""
        return self._up_to(self._read, at)

    def handled_up_to(self, at: datetime) -> bool:
        """The same as of the last poll whose facts are all handled and committed: what a worker beside
        the consume loop (`FactsWaiter`) may trust. `read_up_to` may already count the facts of a poll
        still being handled, and a wait settled then would miss them. One poll behind at most."""
        return self._up_to(self._handled, at)

    def _up_to(self, read: dict[TopicPartition, _Read | None], at: datetime) -> bool:
        if not self.topics:
            return True
        if not read:
            return False
        at_ms = int(at.timestamp() * 1000)
        return all(r is not None and (r.position >= r.highwater or (r.last_fact_ms or -1) >= at_ms)
                   for r in read.values())


# How long a request naming a subscription or charge not known yet waits for the upstream facts at most.
FACTS_WAIT_S = 60.0

# A service's requests that wait for their facts, oldest first.
Waiting = Callable[[UnitOfWork], Awaitable[list[str]]]
# Settles one: True once it no longer waits (taken in or rejected; its work is in the unit of work).
Settle = Callable[[UnitOfWork, str], Awaitable[bool]]


class FactsWaiter:
    """Settles the requests that wait for their facts, every `interval_s` while any waits. A request
    usually leaves the wait when its facts are handled (in that transaction); this covers the rest.
    Durable: the wait is a row in the service's database, so a restart finds it again."""

    LOOK_EVERY_S = 10.0

    def __init__(self, new_uow: Callable[[], UnitOfWork], waiting: Waiting, settle: Settle, *,
                 interval_s: float = 0.5) -> None:
        self.new_uow = new_uow
        self.waiting = waiting
        self.settle = settle
        self.interval_s = interval_s
        self._maybe_waiting = True  # until a round finds none (a restart may find some)
        self._next_look = 0.0  # when a round looks even if nobody said a request waits
        self._wakeup = asyncio.Event()

    def notify(self) -> None:
        """A request started waiting (called after its commit)."""
        self._maybe_waiting = True
        self._wakeup.set()

    async def run(self) -> None:
        await repeat(self.settle_round, every_s=self.interval_s, wakeup=self._wakeup,
                     failed="waiting requests not settled")

    async def settle_round(self) -> int:
        """Settle what can be; the number of requests that still wait."""
        now = time.monotonic()
        if not self._maybe_waiting and now < self._next_look:
            return 0
        # Cleared before the read: a request that starts waiting from here on notifies again. And a look
        # every LOOK_EVERY_S even without one, so a wake-up lost any other way delays a wait, never keeps it.
        self._maybe_waiting = False
        self._next_look = now + self.LOOK_EVERY_S
        async with self.new_uow() as uow:
            waiting = await self.waiting(uow)
        left = 0
        for request_id in waiting:
            with structlog.contextvars.bound_contextvars(request_id=request_id, correlation_id=request_id):
                async with self.new_uow() as uow:
                    if await self.settle(uow, request_id):
                        await uow.commit(mark_processed=None)
                    else:
                        left += 1
        if left:
            self._maybe_waiting = True
        return left
