"""A request for a subscription billing does not know yet (or a dispute of a charge the dispute service does
not know yet) waits for the upstream facts, within a bound (issue 24, item 5): after a restart a backlog may
bring it before the facts published ahead of it."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from billing import orm as billing_orm
from billing.handlers import AWAITING_FACTS
from billing.repository import BillingRepository
from cancelflow.db import transactions
from cancelflow.messaging.facts import FactsProgress, FactsWaiter
from cancelflow.messaging.uow import UnitOfWork
from dispute import orm as dispute_orm
from dispute.repository import DisputeRepository
from payment_gateway import orm as payment_orm
from tests.unit.test_dispute_handlers import World, dispute_of, kinds, new_engine
from tests.unit.test_handlers import Billing, activated, billing_engine, outbox, requested, rows, types

__all__ = ["billing_engine"]  # the fixture, used by name


class Facts(FactsProgress):
    """How far the facts are read, as the test says."""

    def __init__(self) -> None:
        super().__init__({"platform.subscriptions"})
        self.caught_up = False

    def read_up_to(self, at: datetime) -> bool:
        return self.caught_up

    handled_up_to = read_up_to


def billing_with(engine: AsyncEngine, facts: Facts, *, wait_s: float = 60.0) -> Billing:
    billing = Billing(engine)
    billing.handlers.facts = facts
    billing.handlers.facts_wait_s = wait_s
    return billing


def waiter(billing: Billing) -> FactsWaiter:
    def new_uow() -> UnitOfWork:
        return UnitOfWork(transactions(billing.engine), billing_orm.messaging, producer="test")

    return FactsWaiter(new_uow, lambda uow: BillingRepository(uow.db).awaiting_facts(),
                       billing.handlers.settle_waiting)


async def state_of(billing: Billing, request_id: Any) -> str:
    table = billing_orm.cancellations
    return (await rows(billing.engine, table, table.c.request_id == str(request_id)))[0]["state"]


async def outbox_types(billing: Billing) -> list[str]:
    return types(await outbox(billing.engine, billing_orm))


async def test_a_request_before_its_facts_waits_and_goes_on_when_they_come(billing_engine: AsyncEngine) -> None:
    facts = Facts()
    billing = billing_with(billing_engine, facts)
    request = requested()
    emitted = await billing.send(request)
    assert types(emitted) == ["CancellationReceived"]  # not rejected as unknown
    assert await state_of(billing, request.request_id) == AWAITING_FACTS
    assert await waiter(billing).settle_round() == 1  # still waits: the facts are not read yet

    # The facts arrive (handled first in their poll): the request goes on in the same transaction.
    emitted = await billing.send(activated())
    assert types(emitted) == ["VendorCancellationRequested"]
    assert emitted[0]["payload"]["request_id"] == str(request.request_id)
    assert (await billing.subscription())["provisioning_status"] == "In Progress"
    assert await state_of(billing, request.request_id) == "awaiting_vendor"


async def test_an_unknown_subscription_is_rejected_once_the_facts_are_read_up_to_the_request(
        billing_engine: AsyncEngine) -> None:
    facts = Facts()
    billing = billing_with(billing_engine, facts)
    request = requested(subscription_id="sub-nobody-knows")
    await billing.send(request)
    facts.caught_up = True  # the facts topic is read to the request's time: it is truly unknown
    assert await waiter(billing).settle_round() == 0
    rejected = (await outbox_types(billing))[-1]
    assert rejected == "Failed"
    assert await state_of(billing, request.request_id) == "rejected"

    # With the facts read, a request for an unknown subscription is rejected at once, as before.
    emitted = await billing.send(requested(subscription_id="sub-nobody-knows"))
    assert types(emitted) == ["CancellationReceived", "Failed"]
    assert emitted[1]["payload"]["code"] == "unknown_subscription"


async def test_an_unknown_subscription_is_rejected_after_the_bound_whatever_the_facts_say(
        billing_engine: AsyncEngine) -> None:
    facts = Facts()  # never read up to the request (their partition is stalled, say)
    billing = billing_with(billing_engine, facts, wait_s=0.3)
    request = requested(subscription_id="sub-nobody-knows")
    await billing.send(request)
    wait = waiter(billing)
    assert await wait.settle_round() == 1
    assert await state_of(billing, request.request_id) == AWAITING_FACTS
    await asyncio.sleep(0.35)  # the bound itself is what is under test
    assert await wait.settle_round() == 0
    failed = [e for e in await outbox(billing.engine, billing_orm) if e["event_type"] == "Failed"]
    assert [e["payload"]["code"] for e in failed] == ["unknown_subscription"]
    assert await state_of(billing, request.request_id) == "rejected"



# --- dispute: a charge it does not know yet -----------------------------------------------------------


async def test_a_dispute_before_its_charges_waits_and_goes_on_when_they_come(store) -> None:  # type: ignore[no-untyped-def]
    world = World(await new_engine(store("dispute"), dispute_orm), await new_engine(store("payment"), payment_orm))
    facts = Facts()
    world.dispute.facts = facts
    waiter = FactsWaiter(
        lambda: UnitOfWork(transactions(world.engines["dispute"]), dispute_orm.messaging, producer="test"),
        lambda uow: DisputeRepository(uow.db).awaiting_facts(), world.dispute.settle_waiting)
    try:
        await world.capture("a", 3)
        request = dispute_of("a", "b")  # b's capture is still behind in the backlog
        assert await world.deliver(request) == []  # waits: neither rejected nor examined
        assert await waiter.settle_round() == 1
        # b's facts arrive: the case is examined in that transaction, and goes on to the gateway check.
        await world.capture("b", 2)
        emitted = kinds(await world._new_outbox("dispute"))
        assert "ChargesVerificationRequested" in emitted and "Failed" not in emitted

        # A charge nobody ever captured: rejected `unknown_charge` once the facts are read up to the request.
        unknown = dispute_of("a", "nope")
        assert await world.deliver(unknown) == []
        assert await waiter.settle_round() == 1
        facts.caught_up = True
        assert await waiter.settle_round() == 0
        rejected = [e for e in await world._new_outbox("dispute") if e.event_type == "Failed"]
        assert [(str(e.request_id), e.code) for e in rejected] == [(str(unknown.request_id), "unknown_charge")]
    finally:
        for engine in world.engines.values():
            await engine.dispose()


async def test_a_decision_for_a_request_waiting_for_its_facts_is_kept_for_it(billing_engine: AsyncEngine) -> None:
    """An operator's approval can come while the request waits for its subscription's facts: it is kept
    and applied when the request is taken in (it was dropped, and the request then waited for approval)."""
    from cancelflow.events import CancellationApproved

    billing = billing_with(billing_engine, Facts())
    request = requested(requires_approval=True)
    await billing.send(request)
    assert await state_of(billing, request.request_id) == AWAITING_FACTS
    await billing.send(CancellationApproved(request_id=request.request_id, decided_by="alice", note="ok"))

    emitted = await billing.send(activated())
    assert "VendorCancellationRequested" in types(emitted)  # approved: on to the vendor, not waiting
    assert await state_of(billing, request.request_id) == "awaiting_vendor"


async def test_a_waiting_request_trusts_the_facts_only_once_their_poll_is_handled(
        billing_engine: AsyncEngine) -> None:
    """The waiter runs beside the consume loop: facts read to their end but still being written must not
    reject a waiting request as unknown (FactsProgress.handled_up_to)."""
    facts = Facts()
    billing = billing_with(billing_engine, facts)
    request = requested()
    await billing.send(request)
    facts.read_up_to = lambda at: True  # type: ignore[method-assign]  # the poll with its facts is being handled
    facts.handled_up_to = lambda at: False  # type: ignore[method-assign]
    assert await waiter(billing).settle_round() == 1
    assert await state_of(billing, request.request_id) == AWAITING_FACTS


async def test_a_waiter_that_missed_its_wake_up_still_looks_within_its_look_interval() -> None:
    """A wake-up lost (the round that cleared the flag read before the request's commit) delays the
    wait by at most LOOK_EVERY_S; it never keeps it waiting for good."""
    from cancelflow.messaging.facts import FactsWaiter

    waiting: list[str] = []
    settled: list[str] = []

    class NoUow:
        async def __aenter__(self) -> NoUow:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def commit(self, **_: object) -> None:
            return None

    async def read(_uow: object) -> list[str]:
        return list(waiting)

    async def settle(_uow: object, request_id: str) -> bool:
        settled.append(request_id)
        waiting.remove(request_id)
        return True

    waiter = FactsWaiter(NoUow, read, settle)  # type: ignore[arg-type]
    assert await waiter.settle_round() == 0  # found none: it stops looking until told
    waiting.append("r-1")  # committed, but its notify was lost
    assert await waiter.settle_round() == 0 and settled == []
    waiter._next_look = 0.0  # the look interval has passed
    assert await waiter.settle_round() == 0 and settled == ["r-1"]
