"""Billing's Cancellation aggregate: each transition legal or not from each state, the events it records,
and random sequences of transitions; then its repository on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import domain, repository
from billing import orm as billing_orm
from billing.cancellation import LEGAL, Cancellation, IllegalTransition, State, Subscription
from billing.handlers import BillingHandlers
from billing.repository import BillingRepository
from cancelflow.db import create_schema, make_engine, transactions
from cancelflow.events import (
    CancellationRequested,
    Failed,
    Mode,
    PlatformCommitted,
    Source,
    SubscriptionActivated,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
)
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.sql import Db, Query
from cancelflow_tools.testing.messages import handle, message

TODAY = date(2026, 11, 21)
PERIOD_START, PERIOD_END = date(2026, 11, 1), date(2026, 12, 1)
LOADED_AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def request(**overrides: Any) -> CancellationRequested:
    values: dict[str, Any] = dict(
        request_id=uuid.uuid4(), account_id="acc-1", target="subscription", subscription_id="sub-1",
        requested_by={"user_id": "op-1", "role": "operator", "channel": "bss"}, mode="immediate")
    values.update(overrides)
    return CancellationRequested.model_validate(values)


def subscription(**overrides: Any) -> Subscription:
    values: dict[str, Any] = dict(
        subscription_id="sub-1", account_id="acc-1", vendor="acme", vendor_subscription_id="V-1",
        unit_price=Decimal("10.00"), currency="USD", quantity=5, period_quantity=5, status="active", trial=False,
        provisioning_status=domain.SYNCHRONIZED, current_period_start=PERIOD_START, current_period_end=PERIOD_END,
        auto_renew=True, effective_date=None, updated_at=LOADED_AT)
    values.update(overrides)
    return Subscription(**values)


def taken_in(req: CancellationRequested | None = None, sub: Subscription | None = None, *,
             retried: Cancellation | None = None) -> Cancellation:
    """A request taken in against `sub`, as the intake does (validated first)."""
    req = req or request()
    sub = sub or subscription()
    cancellation = Cancellation.receive(req)
    verdict = domain.validate(req, sub.facts(), TODAY, other_in_flight=False)
    cancellation.take_in(verdict, sub, today=TODAY, retried=retried)
    return cancellation


def stored(cancellation: Cancellation) -> Cancellation:
    """As if saved and loaded again: nothing pending, a stored timestamp."""
    cancellation.events.clear()
    cancellation.history.clear()
    cancellation.changes.clear()
    cancellation.created_at = cancellation.updated_at = LOADED_AT
    if cancellation.subscription is not None:
        cancellation.subscription.changes.clear()
    return cancellation


def event_types(cancellation: Cancellation) -> list[str]:
    return [event.event_type for event in cancellation.events]


# --- transitions, one by one ----------------------------------------------------------------------


def test_a_new_request_is_received_and_says_so() -> None:
    cancellation = Cancellation.receive(request())
    assert cancellation.state is State.RECEIVED and cancellation.is_new
    assert event_types(cancellation) == ["CancellationReceived"]


def test_an_immediate_request_locks_the_subscription_and_asks_the_vendor() -> None:
    cancellation = taken_in()
    assert cancellation.state is State.AWAITING_VENDOR
    assert event_types(cancellation) == ["CancellationReceived", "VendorCancellationRequested"]
    sub = cancellation.subscription
    assert sub is not None and sub.locked and sub.changes == {"provisioning_status": domain.IN_PROGRESS}
    assert (cancellation.prior_status, cancellation.prior_provisioning_status) == ("active", domain.SYNCHRONIZED)
    vendor = cancellation.events[1]
    assert isinstance(vendor, VendorCancellationRequested)
    assert (vendor.current_quantity, vendor.new_quantity, vendor.retry_of) == (5, 0, None)


def test_an_invalid_request_is_rejected_and_keeps_no_request() -> None:
    cancellation = taken_in(request(account_id="someone-else"))
    assert cancellation.state is State.REJECTED and cancellation.request is None
    failed = cancellation.events[-1]
    assert isinstance(failed, Failed) and failed.source is Source.validation
    assert failed.snapshot is None  # not the owner: reveals nothing
    with pytest.raises(IllegalTransition):
        cancellation.lock()


def test_a_charges_request_is_routed_to_dispute_and_goes_no_further() -> None:
    cancellation = Cancellation.receive(request(target="charges", subscription_id=None, charge_ids=["ch-1"]))
    cancellation.route_to_dispute()
    assert cancellation.state is State.ROUTED_TO_DISPUTE
    with pytest.raises(IllegalTransition):
        cancellation.take_in(domain.Rejection(domain.ValidationCode.unknown_subscription, "no"), None, today=TODAY)


def test_a_request_waiting_for_facts_is_taken_in_later() -> None:
    cancellation = Cancellation.receive(request())
    cancellation.await_facts()
    assert cancellation.state is State.AWAITING_FACTS
    sub = subscription()
    cancellation.take_in(domain.validate(cancellation.request, sub.facts(), TODAY, other_in_flight=False),  # type: ignore[arg-type]
                         sub, today=TODAY)
    assert cancellation.state is State.AWAITING_VENDOR


def test_approval_then_decline_or_approve() -> None:
    declined = taken_in(request(requires_approval=True))
    assert declined.state is State.PENDING_APPROVAL
    assert event_types(declined) == ["CancellationReceived", "ApprovalPending"]
    declined.decline("op-2", "no")
    assert declined.state is State.DECLINED and declined.decided_by == "op-2"
    assert event_types(declined)[-1] == "RequestDeclined"
    with pytest.raises(IllegalTransition):
        declined.decline("op-2", "twice")

    approved = stored(taken_in(request(requires_approval=True)))
    sub = approved.subscription
    assert sub is not None
    approved.approve("op-2", domain.validate(approved.request, sub.facts(), TODAY,  # type: ignore[arg-type]
                                             other_in_flight=False), sub, today=TODAY)
    assert approved.state is State.AWAITING_VENDOR and approved.decided_by == "op-2"
    assert event_types(approved) == ["VendorCancellationRequested"]


def test_an_approval_the_world_has_moved_past_is_rejected_but_keeps_its_request() -> None:
    cancellation = stored(taken_in(request(requires_approval=True)))
    cancellation.approve("op-2", domain.Rejection(domain.ValidationCode.provisioning_in_progress, "locked"),
                         cancellation.subscription, today=TODAY)
    assert cancellation.state is State.REJECTED and cancellation.request is not None
    failed = cancellation.events[-1]
    assert isinstance(failed, Failed) and failed.retryable


def test_a_request_pending_approval_does_not_reach_the_vendor_before_it_is_approved() -> None:
    cancellation = taken_in(request(requires_approval=True))
    with pytest.raises(IllegalTransition):
        cancellation.lock()
    assert cancellation.state is State.PENDING_APPROVAL


def test_decisions_are_illegal_unless_pending_approval() -> None:
    cancellation = taken_in()
    with pytest.raises(IllegalTransition):
        cancellation.decline("op-2", "late")
    with pytest.raises(IllegalTransition):
        cancellation.approve("op-2", domain.Rejection(domain.ValidationCode.unknown_subscription, "x"), None,
                             today=TODAY)


@pytest.mark.parametrize("new_quantity", [0, 2], ids=["full", "partial"])
def test_end_of_term_is_scheduled_then_locked_when_due(new_quantity: int) -> None:
    quantity = None if new_quantity == 0 else 5 - new_quantity
    cancellation = taken_in(request(mode="end_of_term", quantity=quantity))
    assert cancellation.state is State.SCHEDULED
    assert event_types(cancellation)[-1] == "CancellationScheduled"
    sub = cancellation.subscription
    assert sub is not None
    assert sub.auto_renew is (new_quantity != 0) and sub.renewals_canceled is (new_quantity == 0)
    assert len(cancellation.history) == 1
    with pytest.raises(IllegalTransition):
        cancellation.commit()
    stored(cancellation).lock()
    assert cancellation.state is State.AWAITING_VENDOR


def test_commit_full_cancels_and_builds_platform_committed() -> None:
    cancellation = stored(taken_in())
    cancellation.commit()
    sub = cancellation.subscription
    assert sub is not None and cancellation.state is State.COMMITTED
    assert (sub.status, sub.provisioning_status, sub.auto_renew, sub.effective_date) == (
        domain.CANCELED, domain.SYNCHRONIZED, False, TODAY)
    assert sub.renewals_canceled
    (committed,) = cancellation.events
    assert isinstance(committed, PlatformCommitted)
    assert (committed.full, committed.quantity_before, committed.quantity_after, committed.refund_due) == (
        True, 5, 0, True)
    assert committed.mode is Mode.immediate and committed.period_quantity == 5
    with pytest.raises(IllegalTransition):
        cancellation.commit()


def test_commit_partial_reprices_the_renewals() -> None:
    cancellation = stored(taken_in(request(quantity=2)))
    cancellation.commit()
    sub = cancellation.subscription
    assert sub is not None and sub.quantity == 3 and sub.renewals_repriced == Decimal("30.00")
    committed = cancellation.events[0]
    assert isinstance(committed, PlatformCommitted)
    assert (committed.full, committed.quantity_before, committed.quantity_after) == (False, 5, 3)


def test_reverts_restore_the_statuses_before_the_lock() -> None:
    vendor = stored(taken_in())
    vendor.revert_vendor(VendorCancellationFailed(
        request_id=uuid.UUID(vendor.request_id), subscription_id="sub-1", vendor="acme",
        vendor_subscription_id="V-1", code="vendor_rejected", message="no", retryable=True))
    assert vendor.state is State.REVERTED_VENDOR and vendor.subscription is not None
    assert not vendor.subscription.locked
    assert isinstance(vendor.events[0], Failed) and vendor.events[0].source is Source.vendor

    platform = stored(taken_in())
    platform.revert_platform(RuntimeError("db away"))
    assert platform.state is State.REVERTED_PLATFORM
    failed = platform.events[0]
    assert isinstance(failed, Failed) and failed.details["platform_error"] == "db away"
    for illegal in (platform.commit, platform.release):
        with pytest.raises(IllegalTransition):
            illegal()


def test_a_commit_tried_on_a_copy_leaves_the_cancellation_to_revert_as_it_was() -> None:
    cancellation = stored(taken_in())
    attempt = cancellation.copy()
    attempt.commit()
    assert cancellation.state is State.AWAITING_VENDOR and cancellation.events == cancellation.history == []
    assert cancellation.subscription is not None and cancellation.subscription.changes == {}
    assert not cancellation.subscription.renewals_canceled and cancellation.subscription.status == "active"
    cancellation.revert_platform(RuntimeError("savepoint undone"))
    assert cancellation.state is State.REVERTED_PLATFORM


def test_a_released_lock_commits_after_all_unless_the_subscription_changed_since() -> None:
    untouched = stored(taken_in())
    untouched.release()
    assert untouched.state is State.RELEASED_STUCK and untouched.events == []
    assert untouched.history == [domain.HISTORY_STUCK]
    stored(untouched).commit()
    assert untouched.state is State.COMMITTED

    changed = stored(taken_in())
    changed.release()
    stored(changed)
    assert changed.subscription is not None
    changed.subscription.updated_at = LOADED_AT + timedelta(minutes=1)  # another request took it since
    with pytest.raises(IllegalTransition):
        changed.commit()
    changed.note_late_vendor()
    assert changed.state is State.RELEASED_STUCK and changed.history == [domain.HISTORY_LATE_VENDOR]


def test_a_retry_names_its_earlier_request_only_after_a_platform_failure() -> None:
    earlier = stored(taken_in())
    earlier.revert_platform(RuntimeError("x"))
    retry = request(retry_of=uuid.UUID(earlier.request_id))
    vendor = taken_in(retry, retried=earlier).events[-1]
    assert isinstance(vendor, VendorCancellationRequested) and vendor.retry_of == retry.retry_of

    vendor_failed = stored(taken_in())
    vendor_failed.release()
    again = taken_in(request(retry_of=uuid.UUID(vendor_failed.request_id)), retried=vendor_failed).events[-1]
    assert isinstance(again, VendorCancellationRequested) and again.retry_of is None


# --- random sequences of transitions -------------------------------------------------------------

# What a transition that reaches each state records (besides CancellationReceived on receipt).
EVENT_OF: dict[State, list[str]] = {
    State.REJECTED: ["Failed"], State.PENDING_APPROVAL: ["ApprovalPending"],
    State.SCHEDULED: ["CancellationScheduled"], State.AWAITING_VENDOR: ["VendorCancellationRequested"],
    State.COMMITTED: ["PlatformCommitted"], State.REVERTED_VENDOR: ["Failed"],
    State.REVERTED_PLATFORM: ["Failed"], State.DECLINED: ["RequestDeclined"],
    State.RELEASED_STUCK: [], State.ROUTED_TO_DISPUTE: [], State.AWAITING_FACTS: [],
}
OPERATIONS = ["route_to_dispute", "await_facts", "take_in", "approve", "decline", "lock", "schedule", "commit",
              "revert_vendor", "revert_platform", "release", "note_late_vendor", "touch_subscription"]


def _apply(cancellation: Cancellation, operation: str, sub: Subscription, in_flight: bool) -> None:
    req = cancellation.request
    verdict = domain.validate(req, sub.facts(), TODAY, other_in_flight=in_flight) if req else None
    if operation == "take_in":
        cancellation.take_in(verdict or domain.Rejection(domain.ValidationCode.unknown_subscription, "gone"), sub,
                             today=TODAY)
    elif operation == "approve":
        cancellation.approve("op-2", verdict or domain.Rejection(domain.ValidationCode.unknown_subscription, "x"),
                             sub, today=TODAY)
    elif operation == "decline":
        cancellation.decline("op-2", "no")
    elif operation == "revert_vendor":
        cancellation.revert_vendor(VendorCancellationFailed(
            request_id=uuid.UUID(cancellation.request_id), subscription_id="sub-1", vendor="acme",
            vendor_subscription_id="V-1", code="vendor_rejected", message="no", retryable=True))
    elif operation == "revert_platform":
        cancellation.revert_platform(RuntimeError("db away"))
    elif operation == "touch_subscription":
        sub.updated_at += timedelta(minutes=1)  # a change by someone else: not a transition
    else:
        getattr(cancellation, operation)()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["immediate", "end_of_term"]), approval=st.booleans(),
       quantity=st.sampled_from([None, 2]), in_flight=st.booleans(),
       operations=st.lists(st.sampled_from(OPERATIONS), max_size=14))
def test_random_transitions_stay_legal_and_record_their_events(
        mode: str, approval: bool, quantity: int | None, in_flight: bool, operations: list[str]) -> None:
    sub = subscription()
    cancellation = Cancellation.receive(request(mode=mode, requires_approval=approval, quantity=quantity))
    for operation in operations:
        before = copy.deepcopy(cancellation)
        try:
            _apply(cancellation, operation, sub, in_flight)
        except IllegalTransition:
            # Refused: nothing changed (the subscription it would have changed included).
            assert cancellation == before
            continue
        if operation == "touch_subscription":
            continue
        new_events = [event.event_type for event in cancellation.events[len(before.events):]]
        if operation == "note_late_vendor":
            assert cancellation.state is before.state and new_events == []
            continue
        # A legal move, or two (take_in/approve pass through the plan to schedule or lock).
        assert cancellation.state in LEGAL[before.state]
        assert new_events == EVENT_OF[cancellation.state]
        attached = cancellation.subscription
        if attached is not None:
            # The lock is held exactly while the cancellation waits for the vendor.
            assert attached.locked is (cancellation.state is State.AWAITING_VENDOR)
        if cancellation.state is State.COMMITTED and cancellation.full:
            assert attached is not None and attached.status == domain.CANCELED
    assert cancellation.events[0].event_type == "CancellationReceived"


# --- the repository, on SQLite and PostgreSQL ----------------------------------------------------


def activated() -> SubscriptionActivated:
    return SubscriptionActivated.model_validate(dict(
        subscription_id="sub-1", account_id="acc-1", customer={"email": "jane@example.com", "name": "Jane"},
        product_name="Acme CRM", vendor="acme", vendor_subscription_id="V-1", billing_period="monthly",
        unit_price="10.00", currency="USD", quantity=5, status="active", current_period_start=PERIOD_START,
        current_period_end=PERIOD_END, auto_renew=True))


class FixedClock:
    def today(self) -> date:
        return TODAY


@pytest.fixture
async def engine(store: Any) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(store("billing"))
    await create_schema(engine, billing_orm.metadata)
    yield engine
    await engine.dispose()


@pytest.fixture
async def handlers(engine: AsyncEngine) -> BillingHandlers:
    handlers = BillingHandlers(FixedClock())  # type: ignore[arg-type]
    await handle(engine, billing_orm, handlers.subscription_activated, message(activated()))
    return handlers


async def test_a_saved_cancellation_loads_as_it_was(engine: AsyncEngine, handlers: BillingHandlers) -> None:
    req = request(mode="end_of_term", quantity=2, requires_approval=True)
    async with UnitOfWork(transactions(engine), billing_orm.messaging, producer="test") as uow:
        repo = BillingRepository(uow.db)
        sub = await repo.load_subscription("sub-1")
        cancellation = Cancellation.receive(req)
        cancellation.take_in(domain.validate(req, sub.facts() if sub else None, TODAY, other_in_flight=False),
                             sub, today=TODAY)
        await repo.save(cancellation)
        await uow.commit(mark_processed=None)
    async with UnitOfWork(transactions(engine), billing_orm.messaging, producer="test") as uow:
        loaded = await BillingRepository(uow.db).load(cancellation.request_id)
    assert loaded is not None and loaded.state is State.PENDING_APPROVAL
    assert (loaded.request, loaded.plan, loaded.mode) == (req, cancellation.plan, Mode.end_of_term)
    assert loaded.subscription is not None and loaded.subscription.facts() == sub.facts()  # type: ignore[union-attr]
    assert (loaded.events, loaded.history, loaded.changes) == ([], [], set())


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[Query]:
    """Every statement billing runs from here on, in order."""
    ran: list[Query] = []
    for name in ("first", "all", "run", "run_many"):
        method = getattr(Db, name)

        async def counted(self: Db, query: Query, *args: Any, _method: Any = method, **params: Any) -> Any:
            ran.append(query)
            return await _method(self, query, *args, **params)

        monkeypatch.setattr(Db, name, counted)
    return ran


async def test_a_request_reads_its_subscription_once_and_writes_its_row_once(
        engine: AsyncEngine, handlers: BillingHandlers, statements: list[Query]) -> None:
    req = request()
    await handle(engine, billing_orm, handlers.cancellation_requested, message(req))
    # Before the aggregate: 8 statements of billing's own (the row written, read back, written twice more).
    assert statements.count(repository.SUBSCRIPTION) == 1
    assert statements.count(repository.ADD_CANCELLATION) == 1
    assert repository.CANCELLATION not in statements and repository.SET_CANCELLATION not in statements
    billing_own = [query for query in statements if not {"inbox", "outbox"} & set(str(query.construct).split())]
    assert len(billing_own) == 5, billing_own

    statements.clear()
    await handle(engine, billing_orm, handlers.vendor_provisioned, message(VendorProvisioned(
        request_id=req.request_id, subscription_id="sub-1", vendor="acme", vendor_subscription_id="V-1",
        new_quantity=0)))
    # The cancellation and its subscription in one read, the cancellation written once.
    assert statements.count(repository.CANCELLATION_AND_SUBSCRIPTION) == 1
    assert repository.SUBSCRIPTION not in statements and repository.CANCELLATION not in statements
    assert statements.count(repository.SET_CANCELLATION) == 1
