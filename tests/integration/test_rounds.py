"""Handlers that call the outside world, a poll's records in rounds (cancelflow.messaging.rounds), on
SQLite and PostgreSQL: the intents commit together before the calls, the calls are in flight
together, each round is one transaction, and a handler that raises loses only its own round's work."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import orjson
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, func, insert, select

from cancelflow import topics
from cancelflow.db import create_schema, make_engine, session_factory, transactions
from cancelflow.events import CancellationReceived, CancellationRequested, Payload, RequestedBy, utcnow
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import EventHandler, HandlerContext, Route
from cancelflow.messaging.rounds import Chain, Step, run_in_rounds
from cancelflow.messaging.store import messaging_tables
from cancelflow.messaging.uow import OUTBOX, UnitOfWork
from cancelflow.sql import Query
from cancelflow_tools.testing.messages import message

pytestmark = pytest.mark.timeout(60)

METADATA = MetaData()
MESSAGING = messaging_tables(METADATA)
EFFECTS = Table(
    "effects", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("phase", String(20), nullable=False),
    UniqueConstraint("request_id", "phase"),
)
ADD_EFFECT = Query(insert(EFFECTS))


def a_request(subscription_id: str = "sub-r", *, reason: str = "") -> Message[CancellationRequested]:
    return message(CancellationRequested(
        request_id=str(uuid.uuid4()), account_id="acct-r", target="subscription", subscription_id=subscription_id,
        requested_by=RequestedBy(user_id="u-1", role="customer", channel="storefront"), reason=reason))


def route_to(handler: EventHandler[CancellationRequested]) -> Route:
    return Route(topics.REQUESTED).on(CancellationRequested, handler)


class Outside:
    """A handler that records an intent, calls out (`calls` in flight together must meet at
    `barrier`), then records the answer and emits; with reason "explode" it then records the answer
    again, which the database refuses."""

    def __init__(self, sessions: Any, in_flight_together: int) -> None:
        self.sessions = sessions
        self.barrier = asyncio.Barrier(in_flight_together)
        self.intents_seen_during_calls: list[int] = []

    async def handle(self, msg: Message[CancellationRequested], uow: HandlerContext) -> None:
        request = msg.payload
        request_id = str(request.request_id)
        await uow.db.run(ADD_EFFECT, request_id=request_id, phase="intent")
        async with uow.outside():
            await asyncio.wait_for(self.barrier.wait(), 5)  # one call after another would time out
            async with self.sessions() as other:  # the intents were committed before the calls
                count = select(func.count()).select_from(EFFECTS).where(EFFECTS.c.phase == "intent")
                self.intents_seen_during_calls.append((await other.execute(count)).scalar_one())
        await uow.db.run(ADD_EFFECT, request_id=request_id, phase="answer")
        uow.emit(CancellationReceived(
            request_id=request.request_id, account_id=request.account_id, target=request.target,
            subscription_id=request.subscription_id, mode=request.mode, requested_by=request.requested_by))
        if request.reason == "explode":  # a statement fails (on PostgreSQL the transaction is then aborted)
            await uow.db.run(ADD_EFFECT, request_id=request_id, phase="answer")


@pytest.fixture
async def sessions(store):  # type: ignore[no-untyped-def]
    engine = make_engine(store("rounds"))
    await create_schema(engine, METADATA)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


def units(sessions: Any) -> Any:
    """What the services' units of work open their transactions with on this store (driver
    transactions on SQLite), for the engine `sessions` is bound to."""
    return transactions(sessions.kw["bind"])


async def _rounds(sessions: Any, chains: list[Chain], seen: set[str] | None = None) -> int:
    """Run the chains in rounds; the number of commits."""
    commits = 0

    def committed(_written: frozenset[str]) -> None:
        nonlocal commits
        commits += 1

    async with UnitOfWork(units(sessions), MESSAGING, producer="test", on_commit=committed) as uow:
        await run_in_rounds(uow, chains, set() if seen is None else seen, lambda _: contextlib.nullcontext())
    return commits


async def _phases(sessions: Any, msg: Message[CancellationRequested]) -> list[str]:
    async with sessions() as session:
        rows = await session.execute(select(EFFECTS.c.phase).where(
            EFFECTS.c.request_id == str(msg.payload.request_id)).order_by(EFFECTS.c.id))
        return [row[0] for row in rows]


async def _outbox_causes(sessions: Any) -> list[str]:
    async with sessions() as session:
        rows = await session.execute(select(MESSAGING.outbox.c.value).order_by(MESSAGING.outbox.c.id))
        return [orjson.loads(row[0])["causation_id"] for row in rows]


async def _inbox(sessions: Any) -> set[str]:
    async with sessions() as session:
        return {row[0] for row in await session.execute(select(MESSAGING.inbox.c.message_id))}


async def test_a_round_commits_every_intent_then_calls_together_then_records_every_answer(sessions) -> None:  # type: ignore[no-untyped-def]
    handler = Outside(sessions, in_flight_together=3)
    msgs = [a_request(f"sub-{i}") for i in range(3)]
    chains = [Chain([Step(0, m, route_to(handler.handle))]) for m in msgs]

    commits = await _rounds(sessions, chains)

    assert commits == 2  # the intents' round and the answers' round, for three records
    assert handler.intents_seen_during_calls == [3, 3, 3]
    for m in msgs:
        assert await _phases(sessions, m) == ["intent", "answer"]
    # Each event names its own record as its cause, although the records shared the transactions.
    assert sorted(await _outbox_causes(sessions)) == sorted(m.event_id for m in msgs)
    assert await _inbox(sessions) == {m.event_id for m in msgs}
    assert all(chain.failed_at is None for chain in chains)


async def test_a_handler_that_raises_loses_only_its_own_round(sessions) -> None:  # type: ignore[no-untyped-def]
    handler = Outside(sessions, in_flight_together=3)
    good_a, bad, good_b = a_request("sub-a"), a_request("sub-b", reason="explode"), a_request("sub-c")
    chains = [Chain([Step(0, m, route_to(handler.handle))]) for m in (good_a, bad, good_b)]

    await _rounds(sessions, chains)

    assert [chain.failed_at for chain in chains] == [None, 0, None]  # handed back to go one by one
    assert await _phases(sessions, good_a) == ["intent", "answer"]
    assert await _phases(sessions, good_b) == ["intent", "answer"]
    assert await _phases(sessions, bad) == ["intent"]  # the intent was committed before the call; the answer undone
    assert sorted(await _outbox_causes(sessions)) == sorted([good_a.event_id, good_b.event_id])
    assert await _inbox(sessions) == {good_a.event_id, good_b.event_id}


async def test_a_keys_records_run_in_order_and_duplicates_are_skipped(sessions) -> None:  # type: ignore[no-untyped-def]
    order: list[str] = []

    async def handle(msg: Message[CancellationRequested], uow: HandlerContext) -> None:
        request_id = str(msg.payload.request_id)
        order.append(f"{request_id}:start")
        async with uow.outside():
            await asyncio.sleep(0)
        order.append(f"{request_id}:end")
        await uow.db.run(ADD_EFFECT, request_id=request_id, phase="answer")

    first, second, done_before = a_request(), a_request(), a_request()
    route = route_to(handle)
    chain = Chain([Step(0, first, route), Step(1, done_before, route), Step(2, second, route)])

    commits = await _rounds(sessions, [chain], seen={done_before.event_id})

    one, two = str(first.payload.request_id), str(second.payload.request_id)
    assert order == [f"{one}:start", f"{one}:end", f"{two}:start", f"{two}:end"]
    assert commits == 3  # first's intent; first's answer with second's intent; second's answer
    assert await _phases(sessions, done_before) == []
    assert await _inbox(sessions) == {first.event_id, second.event_id}


async def test_a_failure_around_a_handler_fails_the_rounds_so_no_record_is_lost(sessions, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Not a handler's error (its record would go one by one) but the rounds' own: the caller gets it
    and hands every record to the one-by-one way, instead of committing offsets past a record that
    was neither done nor handed back."""
    handler = Outside(sessions, in_flight_together=1)

    def broken(self: UnitOfWork, message: Message[Payload]) -> None:
        raise RuntimeError("the inbox row could not be kept")

    monkeypatch.setattr(UnitOfWork, "mark_processed_later", broken)
    with pytest.raises(RuntimeError, match="inbox row"):
        await _rounds(sessions, [Chain([Step(0, a_request(), route_to(handler.handle))])])


@pytest.mark.parametrize("asked", [1, 3, 64, 256, 300])
async def test_the_inbox_tells_which_of_a_polls_ids_it_holds(sessions, asked) -> None:  # type: ignore[no-untyped-def]
    """One statement per 256 ids, padded to a power of two: the answer is the same for any count."""
    held = [f"evt-{i}" for i in range(0, 600, 2)]
    async with UnitOfWork(units(sessions), MESSAGING, producer="test") as uow:
        await uow.db.run_many(MESSAGING.add_inbox, [
            {"message_id": m, "topic": "t", "partition": 0, "offset": i, "processed_at": utcnow()}
            for i, m in enumerate(held)])
        await uow.commit()
    ids = [f"evt-{i}" for i in range(asked)] + ["evt-0"]  # a repeated id, as a redelivery within a poll
    async with UnitOfWork(units(sessions), MESSAGING, producer="test") as uow:
        assert await uow.processed_among(ids) == {m for m in ids if m in set(held)}
        assert await uow.processed_among(["evt-1"]) == set()


async def test_a_commit_tells_what_it_wrote_so_only_those_workers_wake(sessions) -> None:  # type: ignore[no-untyped-def]
    """The relay is woken by a commit that added outbox rows, the email sender by one that made an email
    due (`wrote`); a commit of neither wakes no one, and what was rolled back was never written."""
    heard: list[frozenset[str]] = []
    request: CancellationRequested = a_request().payload  # type: ignore[assignment]
    received = CancellationReceived(request_id=request.request_id, account_id=request.account_id,
                                    target=request.target, subscription_id=request.subscription_id,
                                    mode=request.mode, requested_by=request.requested_by)

    def uow() -> UnitOfWork:
        return UnitOfWork(units(sessions), MESSAGING, producer="test", on_commit=heard.append)

    async with uow() as plain:
        await plain.db.run(ADD_EFFECT, request_id="w-1", phase="intent")
        await plain.commit(mark_processed="evt-w-1")
    async with uow() as emitting:
        emitting.emit(received)
        emitting.wrote("emails")
        await emitting.checkpoint()  # an intent before a call: committed, so heard
        await emitting.resume()
        await emitting.commit(mark_processed="evt-w-2")  # nothing new since the checkpoint
    async with uow() as rolled_back:
        rolled_back.emit(received)
        rolled_back.wrote("emails")
        await rolled_back.db.run(ADD_EFFECT, request_id="w-3", phase="intent")
    assert heard == [frozenset(), frozenset({OUTBOX, "emails"}), frozenset()]
