"""A lock never outlives its request (issue 24, item 4): a request set aside as stuck while it held the
subscription's lock (its vendor answer lost with the embedded broker, say) leaves the subscription
unlocked, with a history record that says what to do, so that it can be canceled again."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from billing import orm as billing_orm
from billing.domain import HISTORY_LATE_VENDOR, HISTORY_STUCK
from billing.locks import OverdueLocks
from cancelflow.db import transactions
from cancelflow.events import RequestStuck, utcnow
from cancelflow.messaging.uow import UnitOfWork
from cancelflow_tools.testing.messages import handle, message
from tests.unit.test_handlers import Billing, billing_engine, provisioned, requested, types

__all__ = ["billing_engine"]  # the fixture, used by name


def stuck(request_id: object, stage: str = "vendor") -> RequestStuck:
    return RequestStuck(request_id=request_id, stage=stage, since=utcnow() - timedelta(minutes=10),
                        stuck_for_seconds=600)


async def test_a_stuck_request_releases_the_lock_and_the_subscription_can_be_canceled_again(
        billing_engine: AsyncEngine) -> None:
    billing = Billing(billing_engine)
    request = await billing.locked()
    assert (await billing.subscription())["provisioning_status"] == "In Progress"

    await handle(billing_engine, billing_orm, billing.handlers.request_stuck, message(stuck(request.request_id)))
    subscription = await billing.subscription()
    assert (subscription["status"], subscription["provisioning_status"]) == ("active", "Synchronized")
    assert (await billing.history())[-1] == HISTORY_STUCK

    # Support (or the customer) cancels again: accepted, not `provisioning_in_progress`.
    emitted = await billing.send(requested())
    assert types(emitted) == ["CancellationReceived", "VendorCancellationRequested"]

    # The old request's vendor answer, should it come after all, commits nothing over the new request.
    before = await billing.history()
    emitted = await billing.send(provisioned(request.request_id))
    assert emitted == []
    assert await billing.history() == [*before, HISTORY_LATE_VENDOR]
    assert (await billing.subscription())["provisioning_status"] == "In Progress"  # the new request's lock


async def test_a_released_request_whose_vendor_answer_comes_after_all_still_completes(
        billing_engine: AsyncEngine) -> None:
    """Set aside as stuck (a slow provisioning backlog on Kafka, say), then the vendor's answer arrives and
    nothing touched the subscription meanwhile: the platform commits as it would have, and the refund
    follows (the status stays manual_review, with the steps in its history)."""
    billing = Billing(billing_engine)
    request = await billing.locked()
    await handle(billing_engine, billing_orm, billing.handlers.request_stuck, message(stuck(request.request_id)))
    emitted = await billing.send(provisioned(request.request_id))
    assert types(emitted) == ["PlatformCommitted"]
    subscription = await billing.subscription()
    assert (subscription["status"], subscription["provisioning_status"]) == ("canceled", "Synchronized")


async def test_a_stuck_request_that_holds_no_lock_changes_nothing(billing_engine: AsyncEngine) -> None:
    billing = Billing(billing_engine)
    request = await billing.locked()
    await billing.send(provisioned(request.request_id))  # committed: the lock is gone already
    committed = await billing.subscription()
    history = await billing.history()
    await handle(billing_engine, billing_orm, billing.handlers.request_stuck,
                 message(stuck(request.request_id, stage="payment")))
    assert await billing.subscription() == committed
    assert await billing.history() == history


async def test_a_lock_nobody_reports_stuck_is_released_once_overdue(billing_engine: AsyncEngine) -> None:
    """The request's every saga record was lost (kill -9 of the broker right after the lock): the status
    tracker never heard of it, so no RequestStuck comes. Billing releases the lock itself, after twice
    STUCK_AFTER_SECONDS."""
    billing = Billing(billing_engine)
    await billing.locked()

    def new_uow() -> UnitOfWork:
        return UnitOfWork(transactions(billing_engine), billing_orm.messaging, producer="test")

    locks = OverdueLocks(new_uow, billing.handlers.release_lock, stuck_after_s=0.1)
    assert await locks.release_overdue() == 0  # not overdue yet
    await asyncio.sleep(0.25)  # the bound itself is what is under test
    assert await locks.release_overdue() == 1
    assert (await billing.subscription())["provisioning_status"] == "Synchronized"
    assert (await billing.history())[-1] == HISTORY_STUCK
    assert await locks.release_overdue() == 0
