"""The inbox on each of the consume loop's three paths (one by one, a batch in one transaction, rounds):
an event id handled once is dropped when it comes again, on SQLite and PostgreSQL. These go through
`ConsumeLoop` itself (cancelflow_tools.testing.messages calls its paths), so breaking a path's check fails here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import create_schema, make_engine
from cancelflow.events import ChargeCaptured
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext, Route
from cancelflow.messaging.rounds import Chain, Step
from cancelflow_tools.testing.messages import consume_loop, handle, handle_batch, handle_in_rounds, message
from payment_gateway import orm


@pytest.fixture
async def engine(store) -> AsyncIterator[AsyncEngine]:  # type: ignore[no-untyped-def]
    engine = make_engine(store("inbox"))
    await create_schema(engine, orm.metadata)
    yield engine
    await engine.dispose()


def charge(n: int) -> Message[ChargeCaptured]:
    return message(ChargeCaptured(
        charge_id=f"ch-{n}", account_id="acc-1", subscription_id="sub-1", amount="30.00", currency="USD",
        captured_at=datetime(2026, 11, 1, tzinfo=UTC), gateway_charge_id=f"gw-{n}",
        period_start=date(2026, 11, 1), period_end=date(2026, 12, 1)))


class Counting:
    def __init__(self) -> None:
        self.handled: list[str] = []

    async def __call__(self, msg: Message[ChargeCaptured], uow: HandlerContext) -> None:
        self.handled.append(msg.event_id)


async def test_one_by_one(engine: AsyncEngine) -> None:
    handler, first = Counting(), charge(1)
    assert await handle(engine, orm, handler, first) is True
    assert await handle(engine, orm, handler, first) is False
    assert handler.handled == [first.event_id]


async def test_in_a_batch(engine: AsyncEngine) -> None:
    handler, first, second = Counting(), charge(1), charge(2)
    assert await handle_batch(engine, orm, handler, [first, first]) == {first.event_id}
    assert await handle_batch(engine, orm, handler, [first, second]) == {first.event_id}
    assert handler.handled == [first.event_id, second.event_id]


async def test_in_rounds(engine: AsyncEngine) -> None:
    handler, first = Counting(), charge(1)
    route = Route(first.topic).on(ChargeCaptured, handler)
    twice = Chain([Step(0, first, route), Step(1, first, route)])  # the same record twice in one poll
    assert await consume_loop(engine, orm, [route]).handle_in_rounds([twice]) == set()
    assert await handle_in_rounds(engine, orm, handler, first) is False
    assert handler.handled == [first.event_id]
