"""A cancellation's refund met before the charges that paid for its period (a backlog after a restart):
it waits for them (durably, in payment-gateway's database) instead of ending `not_due`, within a bound.
On SQLite and PostgreSQL, through the consume loop's inbox paths."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow import topics
from cancelflow.db import transactions
from cancelflow.events import PlatformCommitted
from cancelflow.messaging.dispatch import Route
from cancelflow.messaging.facts import FactsProgress, FactsWaiter
from cancelflow.messaging.rounds import Chain, Step
from cancelflow.messaging.uow import UnitOfWork
from cancelflow_tools.testing.messages import consume_loop, handle, message
from payment_gateway import orm
from payment_gateway.waits import AWAITING_FACTS, RefundWaits
from tests.unit.test_handlers import outbox, types
from tests.unit.test_refund_per_charge import Payments, committed, engine

__all__ = ["engine"]  # the fixture, used by name


class Facts(FactsProgress):
    """How far the charges are read, as the test says."""

    def __init__(self) -> None:
        super().__init__({"payments.charges"})
        self.caught_up = False

    def read_up_to(self, at: datetime) -> bool:
        return self.caught_up

    handled_up_to = read_up_to


class Waiting(Payments):
    """Payments whose charges facts are behind, with the waiter the service runs."""

    def __init__(self, engine: AsyncEngine, *, wait_s: float = 60.0) -> None:
        super().__init__(engine)
        self.facts = Facts()
        self.handlers.facts = self.facts
        self.handlers.facts_wait_s = wait_s
        self.woken: list[str] = []
        self.waiter = FactsWaiter(
            lambda: UnitOfWork(transactions(engine), orm.messaging, producer="test"),
            lambda uow: RefundWaits(uow.db).waiting(), self.handlers.settle_waiting)

    async def deliver(self, msg: Any, handler: Any) -> bool:
        return await handle(self.engine, orm, handler, msg, on_commit=lambda written: self.woken.extend(written))

    async def emitted(self) -> list[dict[str, Any]]:
        return await outbox(self.engine, orm)

    async def waits(self) -> list[str]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(select(orm.refund_waits.c.request_id))).scalars())


async def test_a_refund_before_its_charge_waits_and_refunds_when_the_charge_comes(engine: AsyncEngine) -> None:
    payments = Waiting(engine)
    event = committed()  # one license, a third of the period used: 20.00 of 30.00 owed
    first = message(event)
    assert await payments.deliver(first, payments.handlers.platform_committed)
    assert await payments.emitted() == []  # was RefundIssued "not_due", 0.00: the customer never refunded
    assert await payments.waits() == [str(event.request_id)]
    assert AWAITING_FACTS in payments.woken
    assert await payments.waiter.settle_round() == 1  # still waits: the charge is not read yet

    # A redelivery of the same record is dropped by the inbox, as before.
    assert not await payments.deliver(first, payments.handlers.platform_committed)

    payments.woken.clear()
    await payments.charge("30.00")  # the charge's facts arrive: their commit wakes the waiter
    await payments.deliver(message(event), payments.handlers.platform_committed)  # even under a new event id
    assert types(await payments.emitted()) == []
    await payments.charge("30.00", charge_id="c1")  # a redelivered charge (recorded once)
    assert await payments.waiter.settle_round() == 0
    [issued] = await payments.emitted()
    assert issued["event_type"] == "RefundIssued"
    assert (issued["payload"]["status"], issued["payload"]["amount"]) == ("succeeded", "20.00")
    assert payments.refunded() == Decimal("20.00")
    assert await payments.waits() == []

    # Once decided, another delivery of the event asks again with the same key: nothing refunded twice.
    await payments.deliver(message(event), payments.handlers.platform_committed)
    assert await payments.waiter.settle_round() == 0
    assert payments.refunded() == Decimal("20.00")


async def test_with_the_charges_read_up_to_it_no_charge_is_not_due_at_once(engine: AsyncEngine) -> None:
    payments = Waiting(engine)
    payments.facts.caught_up = True  # every charge published before the event is recorded: there is none
    assert await payments.deliver(message(committed()), payments.handlers.platform_committed)
    [issued] = await payments.emitted()
    assert (issued["event_type"], issued["payload"]["status"], issued["payload"]["amount"]) == (
        "RefundIssued", "not_due", "0.00")
    assert await payments.waits() == []


async def test_a_waiting_refund_is_decided_once_the_charges_are_read_up_to_it(engine: AsyncEngine) -> None:
    payments = Waiting(engine)
    await payments.deliver(message(committed()), payments.handlers.platform_committed)
    assert await payments.waiter.settle_round() == 1
    payments.facts.caught_up = True
    assert await payments.waiter.settle_round() == 0
    assert [(e["event_type"], e["payload"]["status"]) for e in await payments.emitted()] == [
        ("RefundIssued", "not_due")]


async def test_a_waiting_refund_is_decided_after_the_bound_whatever_the_facts_say(engine: AsyncEngine) -> None:
    payments = Waiting(engine, wait_s=0.3)  # the charges' partition never read up to it (stalled, say)
    await payments.deliver(message(committed()), payments.handlers.platform_committed)
    assert await payments.waiter.settle_round() == 1
    await asyncio.sleep(0.35)  # the bound itself is what is under test
    assert await payments.waiter.settle_round() == 0
    assert [e["payload"]["status"] for e in await payments.emitted()] == ["not_due"]


async def test_a_charge_known_with_the_licenses_of_the_period_does_not_wait(engine: AsyncEngine) -> None:
    payments = Waiting(engine)  # facts behind, but the charge that paid for the period is known
    await payments.charge("30.00")
    await payments.deliver(message(committed()), payments.handlers.platform_committed)
    assert [e["payload"]["amount"] for e in await payments.emitted()] == ["20.00"]


async def test_a_period_paid_by_several_charges_waits_for_all_of_them(engine: AsyncEngine) -> None:
    payments = Waiting(engine)
    await payments.charge("30.00", charge_id="c1", quantity=2)  # 2 of the 3 licenses; c2 is still unread
    event = committed(quantity_before=3, quantity_after=0)
    await payments.deliver(message(event), payments.handlers.platform_committed)
    assert await payments.emitted() == []
    await payments.charge("15.00", charge_id="c2", quantity=1)
    assert await payments.waiter.settle_round() == 0
    [issued] = await payments.emitted()
    assert issued["payload"]["amount"] == "30.00"  # 20.00 of c1 and 10.00 of c2
    assert sorted(line["charge_id"] for line in issued["payload"]["lines"]) == ["c1", "c2"]


async def test_a_later_refund_of_the_subscription_waits_behind_a_waiting_one(engine: AsyncEngine) -> None:
    """Refunds of a subscription are decided in the order they came (the licenses-paid cap and the
    carried rounding depend on it), however the charges and the waiter's rounds fall."""
    payments = Waiting(engine)
    first, second = committed(quantity_before=5, quantity_after=3), committed(quantity_before=3, quantity_after=0)
    await payments.deliver(message(first), payments.handlers.platform_committed)
    await payments.charge("150.00", quantity=5)
    payments.facts.caught_up = True  # the second finds its charge and the facts read: it would not wait alone
    await payments.deliver(message(second), payments.handlers.platform_committed)
    assert await payments.emitted() == []
    assert sorted(await payments.waits()) == sorted([str(first.request_id), str(second.request_id)])
    assert await payments.waiter.settle_round() == 0
    issued = [e["payload"] for e in await payments.emitted()]
    assert [p["request_id"] for p in issued] == [str(first.request_id), str(second.request_id)]
    assert payments.refunded() == Decimal("100.00")


async def test_a_refund_handled_in_rounds_waits_the_same(engine: AsyncEngine) -> None:
    """The saga route runs in rounds (messaging/rounds.py): the wait and its wake-up come through them."""
    payments = Waiting(engine)
    event = committed()
    msg = message(event)
    saga = Route(topics.SAGA, rounds=True).on(PlatformCommitted, payments.handlers.platform_committed)
    chain = Chain([Step(0, msg, saga)])
    loop = consume_loop(engine, orm, on_commit=lambda written: payments.woken.extend(written))
    assert await loop.handle_in_rounds([chain]) == set() and chain.error is None
    assert await payments.waits() == [str(event.request_id)]
    assert AWAITING_FACTS in payments.woken
    await payments.charge("30.00")
    assert await payments.waiter.settle_round() == 0
    assert payments.refunded() == Decimal("20.00")
