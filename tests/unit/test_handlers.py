"""Handlers with fakes and a real unit of work, on SQLite and on PostgreSQL (`store`): state, outbox and
inbox after each commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from types import ModuleType
from typing import Any

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import orm as billing_orm
from billing.bootstrap import routes as billing_routes
from billing.handlers import BillingHandlers
from billing.repository import BillingRepository
from billing.scheduler import EndOfTermScheduler
from cancelflow.contract import cancellation_refund_key as refund_key
from cancelflow.db import create_schema, make_engine, session_factory, transactions
from cancelflow.events import (
    CancellationRequested,
    CancellationScheduled,
    ChargeCaptured,
    Payload,
    PlatformCommitted,
    SubscriptionActivated,
    SubscriptionSnapshot,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
)
from cancelflow.messaging.codec import Message
from cancelflow.messaging.deadletter import TransientError
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.sql import Db
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.fakes.vendor import FakeVendorClient
from cancelflow_tools.testing.messages import handle, handle_in_rounds, message
from payment_gateway import orm as payment_orm
from payment_gateway.adapters.gateway import GatewayOutcome, RefundOutcome
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.ledger import Ledger
from provisioning import orm as provisioning_orm
from provisioning.adapters.vendor import VendorOutcome
from provisioning.bootstrap import routes as provisioning_routes
from provisioning.handlers import ProvisioningHandlers
from tests.factories import cancellation_requested

TODAY = date(2026, 11, 21)
OPERATOR = {"user_id": "op-1", "role": "operator", "channel": "bss"}
PERIOD_START = date(2026, 11, 1)
PERIOD_END = date(2026, 12, 1)  # 30 days; 10 of them unused on TODAY
SEED_VENDOR = ("Subscription failed to cancel due to Provisioning Error. "
               "Please try to cancel the subscription again.")
SEED_PLATFORM = ("The subscription cancellation process has encountered an error on our Platform. "
                 "Please contact your administrator")

Handle = Callable[..., Awaitable[bool]]  # cancelflow_tools.testing.messages.handle or handle_in_rounds


# --- plumbing -----------------------------------------------------------------------------------------


async def outbox(engine: AsyncEngine, orm: ModuleType) -> list[dict[str, Any]]:
    table = orm.messaging.outbox
    async with engine.connect() as conn:
        rows = (await conn.execute(select(table).order_by(table.c.id))).mappings().all()
    return [{"topic": r["topic"], "key": r["key"], "event_type": r["event_type"], **orjson.loads(r["value"])}
            for r in rows]


async def rows(engine: AsyncEngine, table: Any, *where: Any) -> list[dict[str, Any]]:
    query = select(table)
    for clause in where:
        query = query.where(clause)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings().all()]


async def new_engine(url: str, orm: ModuleType) -> AsyncEngine:
    engine = make_engine(url)
    await create_schema(engine, orm.metadata)
    return engine


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_type"] for e in events]


# --- billing ------------------------------------------------------------------------------------------


@pytest.fixture
async def billing_engine(store: Any) -> AsyncIterator[AsyncEngine]:
    engine = await new_engine(store("billing"), billing_orm)
    yield engine
    await engine.dispose()


def activated(**overrides: Any) -> SubscriptionActivated:
    values: dict[str, Any] = dict(
        subscription_id="sub-1", account_id="acc-1", customer={"email": "jane@example.com", "name": "Jane"},
        product_name="Acme CRM", vendor="acme", vendor_subscription_id="V-1", billing_period="monthly",
        unit_price="10.00", currency="USD", quantity=5, status="active", current_period_start=PERIOD_START,
        current_period_end=PERIOD_END, auto_renew=True,
    )
    values.update(overrides)
    return SubscriptionActivated.model_validate(values)


def requested(**overrides: Any) -> CancellationRequested:
    return cancellation_requested(**{"requested_by": OPERATOR, **overrides})


def provisioned(request_id: uuid.UUID, new_quantity: int = 0) -> VendorProvisioned:
    return VendorProvisioned(request_id=request_id, subscription_id="sub-1", vendor="acme",
                             vendor_subscription_id="V-1", new_quantity=new_quantity)


class FixedClock:
    def __init__(self, today: date) -> None:
        self._today = today

    def today(self) -> date:
        return self._today


class Billing:
    """One billing database and the handlers, driven as the consume loop would drive them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.handlers = BillingHandlers(FixedClock(TODAY))  # type: ignore[arg-type]
        self.routes = billing_routes(self.handlers)

    async def send(self, payload: Payload, msg: Message | None = None) -> list[dict[str, Any]]:
        """Handle one record; the outbox rows it added."""
        before = len(await outbox(self.engine, billing_orm))
        await handle(self.engine, billing_orm, self.routes, msg or message(payload))
        return (await outbox(self.engine, billing_orm))[before:]

    async def subscription(self) -> dict[str, Any]:
        found = await rows(self.engine, billing_orm.subscriptions)
        assert len(found) == 1
        return found[0]

    async def history(self) -> list[str]:
        table = billing_orm.history
        async with self.engine.connect() as conn:
            result = await conn.execute(select(table.c.message).order_by(table.c.id))
            return list(result.scalars())

    async def billings(self) -> list[str]:
        return [r["status"] for r in await rows(self.engine, billing_orm.scheduled_billings)]

    async def locked(self, request: CancellationRequested | None = None) -> CancellationRequested:
        """An active subscription with a cancellation waiting for the vendor."""
        await self.send(activated())
        request = request or requested()
        emitted = await self.send(request)
        assert types(emitted) == ["CancellationReceived", "VendorCancellationRequested"]
        return request


@pytest.fixture
async def billing(billing_engine: AsyncEngine) -> Billing:
    return Billing(billing_engine)


async def test_billing_request_locks_the_subscription_and_asks_the_vendor(billing: Billing) -> None:
    await billing.send(activated())
    request = requested()
    # The upstream app's own trace id: everything the request causes is correlated by its request id
    # (CONTRACT.md section 1), not by what the record that brought it carried.
    msg = message(request, correlation_id="storefront-trace-77")
    emitted = await billing.send(request, msg)
    assert types(emitted) == ["CancellationReceived", "VendorCancellationRequested"]
    received, command = emitted
    rid = str(request.request_id)
    for event in emitted:
        assert event["topic"] == "cancellations.saga"
        assert event["key"] == rid
        assert event["correlation_id"] == rid
        assert event["causation_id"] == msg.event_id
        assert event["producer"] == "test"
    assert received["payload"]["subscription_id"] == "sub-1"
    vendor = command["payload"]
    assert vendor["request_id"] == rid
    assert vendor["vendor_subscription_id"] == "V-1"
    assert vendor["new_quantity"] == 0
    assert vendor["current_quantity"] == 5
    assert vendor["effective_date"] == TODAY.isoformat()
    assert vendor["snapshot"]["provisioning_status"] == "In Progress"
    sub = await billing.subscription()
    assert sub["provisioning_status"] == "In Progress"
    assert sub["status"] == "active"  # not canceled until the vendor said yes
    saga = (await rows(billing.engine, billing_orm.cancellations))[0]
    assert saga["state"] == "awaiting_vendor"
    assert saga["prior_status"] == "active" and saga["prior_provisioning_status"] == "Synchronized"
    inbox = await rows(billing.engine, billing_orm.messaging.inbox)
    assert msg.event_id in {r["message_id"] for r in inbox}


async def test_billing_second_request_while_in_progress_is_rejected(billing: Billing) -> None:
    await billing.locked()
    second = requested()
    emitted = await billing.send(second)
    assert types(emitted) == ["CancellationReceived", "Failed"]
    failed = emitted[1]["payload"]
    assert failed["request_id"] == str(second.request_id)
    assert failed["source"] == "validation"
    assert failed["code"] == "provisioning_in_progress"
    assert failed["retryable"] is True
    assert (await billing.subscription())["provisioning_status"] == "In Progress"
    states = {r["request_id"]: r["state"] for r in await rows(billing.engine, billing_orm.cancellations)}
    assert states[str(second.request_id)] == "rejected"


async def test_billing_repeated_request_id_has_no_new_effect(billing: Billing) -> None:
    first = await billing.locked()
    before = await billing.subscription()
    # The same request_id in a new record (a new event_id): nothing new happens.
    again = requested(request_id=first.request_id)
    assert await billing.send(again) == []
    after = await billing.subscription()
    assert after["provisioning_status"] == before["provisioning_status"] == "In Progress"
    assert len(await rows(billing.engine, billing_orm.cancellations)) == 1


async def test_billing_redelivered_record_is_skipped_by_the_inbox(billing: Billing) -> None:
    await billing.send(activated())
    msg = message(requested())
    await billing.send(msg.payload, msg)
    assert await handle(billing.engine, billing_orm, billing.handlers.cancellation_requested, msg) is False
    assert len(await outbox(billing.engine, billing_orm)) == 2


async def test_billing_not_owner_reveals_nothing(billing: Billing) -> None:
    await billing.send(activated())
    emitted = await billing.send(requested(account_id="acc-intruder"))
    assert types(emitted) == ["CancellationReceived", "Failed"]
    failed = emitted[1]["payload"]
    assert failed["code"] == "not_owner"
    assert failed["snapshot"] is None
    sub = await billing.subscription()
    assert (sub["status"], sub["provisioning_status"]) == ("active", "Synchronized")


async def test_billing_vendor_success_commits_the_platform(billing: Billing) -> None:
    request = await billing.locked()
    emitted = await billing.send(provisioned(request.request_id))
    assert types(emitted) == ["PlatformCommitted"]
    committed = emitted[0]["payload"]
    assert committed["full"] is True and committed["trial"] is False and committed["refund_due"] is True
    assert committed["effective_date"] == TODAY.isoformat()
    assert committed["period_start"] == PERIOD_START.isoformat()
    assert committed["period_end"] == PERIOD_END.isoformat()
    assert (committed["quantity_before"], committed["quantity_after"]) == (5, 0)
    assert committed["history"] == "Status is set to canceled with effective date 2026-11-21"
    assert committed["snapshot"]["subscription_status"] == "canceled"
    assert committed["snapshot"]["provisioning_status"] == "Synchronized"
    sub = await billing.subscription()
    assert sub["status"] == "canceled"
    assert sub["provisioning_status"] == "Synchronized"
    assert sub["effective_date"] == TODAY
    assert sub["auto_renew"] is False
    assert await billing.billings() == ["canceled"]
    assert await billing.history() == ["Status is set to canceled with effective date 2026-11-21"]
    # A second VendorProvisioned for the same request (new event id) commits nothing twice.
    assert await billing.send(provisioned(request.request_id)) == []
    assert await billing.history() == ["Status is set to canceled with effective date 2026-11-21"]


async def test_billing_partial_commit_reduces_the_quantity(billing: Billing) -> None:
    request = await billing.locked(requested(quantity=2))
    command = (await outbox(billing.engine, billing_orm))[-1]["payload"]
    assert command["new_quantity"] == 3
    emitted = await billing.send(provisioned(request.request_id, new_quantity=3))
    committed = emitted[0]["payload"]
    assert committed["full"] is False
    assert (committed["quantity_before"], committed["quantity_after"]) == (5, 3)
    sub = await billing.subscription()
    assert (sub["status"], sub["quantity"], sub["provisioning_status"]) == ("active", 3, "Synchronized")
    assert await billing.history() == ["Quantity is set to 3 with effective date 2026-11-21"]
    # The subscription goes on: its next renewal stays scheduled, for the 3 licenses left.
    renewals = await rows(billing.engine, billing_orm.scheduled_billings)
    assert [(r["status"], Decimal(str(r["amount"]))) for r in renewals] == [("scheduled", Decimal("30.00"))]


async def test_billing_platform_fault_reverts_and_disarms(billing: Billing) -> None:
    request = await billing.locked()
    async with session_factory(billing.engine)() as session, session.begin():
        await BillingRepository(Db(session)).arm_fault("sub-1", "commit")
    emitted = await billing.send(provisioned(request.request_id))
    assert types(emitted) == ["Failed"]
    failed = emitted[0]["payload"]
    assert failed["source"] == "platform"
    assert failed["history"] == SEED_PLATFORM
    assert failed["retryable"] is False
    assert failed["snapshot"] == {"subscription_status": "active", "provisioning_status": "Synchronized",
                                  "effective_date": None, "access_end_date": None}
    # Support gets what it needs to finish by hand.
    assert failed["details"]["vendor_subscription_id"] == "V-1"
    assert failed["details"]["subscription_id"] == "sub-1"
    sub = await billing.subscription()
    assert (sub["status"], sub["provisioning_status"]) == ("active", "Synchronized")
    assert sub["effective_date"] is None
    assert sub["auto_renew"] is True
    assert await billing.billings() == ["scheduled"]  # the commit's writes were undone
    assert await billing.history() == [SEED_PLATFORM]
    assert await rows(billing.engine, billing_orm.armed_faults) == []
    saga = (await rows(billing.engine, billing_orm.cancellations))[0]
    assert saga["state"] == "reverted_platform"
    # Disarmed: the next cancellation of the subscription commits normally.
    retry = requested()
    assert types(await billing.send(retry)) == ["CancellationReceived", "VendorCancellationRequested"]
    assert types(await billing.send(provisioned(retry.request_id))) == ["PlatformCommitted"]
    assert (await billing.subscription())["status"] == "canceled"


async def test_billing_vendor_failure_reverts(billing: Billing) -> None:
    request = await billing.locked()
    failure = VendorCancellationFailed(
        request_id=request.request_id, subscription_id="sub-1", vendor="acme", vendor_subscription_id="V-1",
        code="vendor_rejected", message="Subscription is locked by another operation", http_status=409,
        retryable=False)
    emitted = await billing.send(failure)
    assert types(emitted) == ["Failed"]
    failed = emitted[0]["payload"]
    assert failed["source"] == "vendor"
    assert failed["code"] == "vendor_rejected"
    assert failed["message"] == "Subscription is locked by another operation"
    assert failed["retryable"] is True
    assert failed["history"].startswith(SEED_VENDOR)
    assert "Subscription is locked by another operation" in failed["history"]
    sub = await billing.subscription()
    assert (sub["status"], sub["provisioning_status"]) == ("active", "Synchronized")
    assert await billing.billings() == ["scheduled"]
    history = await billing.history()
    assert len(history) == 1 and history[0].startswith(SEED_VENDOR)
    # The customer may simply retry with a new request_id.
    assert types(await billing.send(requested())) == ["CancellationReceived", "VendorCancellationRequested"]


async def test_billing_activation_during_a_cancellation_keeps_the_lock(billing: Billing) -> None:
    await billing.locked()
    await billing.send(activated(quantity=6, product_name="Acme CRM Plus"))
    sub = await billing.subscription()
    assert sub["provisioning_status"] == "In Progress"
    assert sub["product_name"] == "Acme CRM Plus"  # facts that change nothing the cancellation counts on
    assert sub["quantity"] == 5  # no billing change proceeds while the lock is held


async def test_billing_a_partial_refund_counts_the_licenses_the_vendor_was_asked_to_reduce(billing: Billing) -> None:
    """An upstream update of the quantity while the vendor works made the refund's share 5 of 8 instead
    of 2 of 5 (found by probing a running stack)."""
    request = await billing.locked(requested(quantity=2))
    await billing.send(activated(quantity=8))
    committed = (await billing.send(provisioned(request.request_id, new_quantity=3)))[0]["payload"]
    assert (committed["quantity_before"], committed["quantity_after"]) == (5, 3)
    assert (await billing.subscription())["quantity"] == 3


async def test_billing_a_canceled_subscription_stays_canceled_whatever_upstream_says(billing: Billing) -> None:
    """A refresh of the upstream platform brought a canceled subscription back to active, and a second
    cancellation then refunded again."""
    request = await billing.locked()
    await billing.send(provisioned(request.request_id))
    await billing.send(activated(quantity=2))  # newer than the cancellation
    sub = await billing.subscription()
    assert (sub["status"], sub["auto_renew"], sub["provisioning_status"]) == ("canceled", False, "Synchronized")
    assert "scheduled" not in await billing.billings()
    again = await billing.send(requested())
    assert types(again) == ["CancellationReceived", "Failed"]
    assert again[1]["payload"]["code"] == "not_active"


async def test_billing_facts_older_than_our_last_change_are_not_applied(billing: Billing) -> None:
    request = await billing.locked()
    await billing.send(provisioned(request.request_id))
    stale = message(activated(product_name="Old name"))
    stale = Message(stale.envelope.model_copy(update={"occurred_at": datetime(2026, 11, 1, tzinfo=UTC)}),
                    stale.payload, stale.topic, stale.partition, stale.offset, stale.key)
    assert await billing.send(stale.payload, stale) == []
    assert (await billing.subscription())["product_name"] == "Acme CRM"


async def test_billing_full_end_of_term_stops_auto_renew_now(billing: Billing) -> None:
    await billing.send(activated())
    emitted = await billing.send(requested(mode="end_of_term"))
    assert types(emitted) == ["CancellationReceived", "CancellationScheduled"]
    assert emitted[1]["payload"]["full"] is True
    sub = await billing.subscription()
    assert (sub["auto_renew"], sub["status"]) == (False, "active")
    assert await billing.billings() == ["canceled"]
    assert await billing.history() == ["Auto-renew is set to off; the subscription will be canceled with "
                                       "effective date 2026-12-01"]
    # An upstream refresh meanwhile does not turn it back on, nor bring a renewal back.
    await billing.send(activated(quantity=6))
    sub = await billing.subscription()
    assert (sub["auto_renew"], sub["quantity"]) == (False, 6)
    assert "scheduled" not in await billing.billings()


async def test_billing_partial_end_of_term_keeps_renewing_with_the_licenses_left(billing: Billing) -> None:
    await billing.send(activated())
    request = requested(mode="end_of_term", quantity=2)
    emitted = await billing.send(request)
    assert types(emitted) == ["CancellationReceived", "CancellationScheduled"]
    assert emitted[1]["payload"]["full"] is False
    sub = await billing.subscription()
    assert sub["auto_renew"] is True
    assert await billing.billings() == ["scheduled"]
    assert await billing.history() == ["Quantity will be set to 3 with effective date 2026-12-01"]
    # An upstream refresh keeps its auto-renew: only a full end-of-term cancellation holds it off.
    await billing.send(activated())
    assert (await billing.subscription())["auto_renew"] is True

    # The period ends: the vendor removes the licenses, and the renewal bills the 3 that are left.
    scheduler = EndOfTermScheduler(
        lambda: UnitOfWork(transactions(billing.engine), billing_orm.messaging, producer="test"),
        billing.handlers.start_scheduled, FixedClock(PERIOD_END))  # type: ignore[arg-type]
    assert await scheduler.run_due() == 1
    assert types((await outbox(billing.engine, billing_orm))[-1:]) == ["VendorCancellationRequested"]
    emitted = await billing.send(provisioned(request.request_id, new_quantity=3))
    assert emitted[0]["payload"]["full"] is False and emitted[0]["payload"]["refund_due"] is False
    sub = await billing.subscription()
    assert (sub["quantity"], sub["auto_renew"]) == (3, True)
    renewals = await rows(billing.engine, billing_orm.scheduled_billings)
    assert [(r["status"], Decimal(str(r["amount"]))) for r in renewals
            if r["status"] == "scheduled"] == [("scheduled", Decimal("30.00"))]


# --- provisioning -------------------------------------------------------------------------------------


@pytest.fixture(params=["one_by_one", "rounds"])
def handle_way(request: pytest.FixtureRequest) -> Handle:
    """The provisioning and payment routes run in rounds in the service (messaging/rounds.py) and one
    by one when a record is retried: their tests run both ways."""
    return handle_in_rounds if request.param == "rounds" else handle


@pytest.fixture
async def provisioning_engine(store: Any, handle_way: Handle) -> AsyncIterator[AsyncEngine]:
    engine = await new_engine(store("provisioning"), provisioning_orm)
    yield engine
    await engine.dispose()


def vendor_command(request_id: uuid.UUID | None = None, *, new_quantity: int = 0) -> VendorCancellationRequested:
    return VendorCancellationRequested(
        request_id=request_id or uuid.uuid4(), account_id="acc-1", subscription_id="sub-1", vendor="acme",
        vendor_subscription_id="V-1", effective_date=TODAY, current_quantity=5, new_quantity=new_quantity,
        snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="In Progress"))


async def provision(engine: AsyncEngine, vendor: Any, command: VendorCancellationRequested,
                    handle_way: Handle) -> list[dict[str, Any]]:
    before = len(await outbox(engine, provisioning_orm))
    await handle_way(engine, provisioning_orm, provisioning_routes(ProvisioningHandlers(vendor)), message(command))
    return (await outbox(engine, provisioning_orm))[before:]


async def test_provisioning_success(provisioning_engine: AsyncEngine, handle_way: Handle) -> None:
    vendor = FakeVendorClient()
    command = vendor_command()
    emitted = await provision(provisioning_engine, vendor, command, handle_way)
    assert types(emitted) == ["VendorProvisioned"]
    answer = emitted[0]["payload"]
    assert answer["request_id"] == str(command.request_id)
    assert answer["new_quantity"] == 0 and answer["already_applied"] is False
    assert [e["type"] for e in vendor.effects] == ["cancellation"]
    assert vendor.effects[0]["request_id"] == str(command.request_id)
    op = (await rows(provisioning_engine, provisioning_orm.vendor_operations))[0]
    assert (op["status"], op["operation"], op["attempts"]) == ("succeeded", "cancel", 1)
    # Redelivered under a new event id: answered already, the vendor is not called again.
    assert await provision(provisioning_engine, vendor, command, handle_way) == []
    assert len(vendor.calls) == 1


async def test_provisioning_partial_sets_the_quantity(provisioning_engine: AsyncEngine, handle_way: Handle) -> None:
    vendor = FakeVendorClient()
    emitted = await provision(provisioning_engine, vendor, vendor_command(new_quantity=3), handle_way)
    assert types(emitted) == ["VendorProvisioned"]
    assert [(e["type"], e["from"], e["to"]) for e in vendor.effects] == [("quantity_change", 5, 3)]


async def test_provisioning_vendor_failure(provisioning_engine: AsyncEngine, handle_way: Handle) -> None:
    vendor = FakeVendorClient()
    vendor.script(VendorOutcome.failed("vendor_rejected", "Subscription is locked by another operation",
                                       retryable=False, http_status=409, attempts=1))
    emitted = await provision(provisioning_engine, vendor, vendor_command(), handle_way)
    assert types(emitted) == ["VendorCancellationFailed"]
    answer = emitted[0]["payload"]
    assert answer["code"] == "vendor_rejected"
    assert answer["message"] == "Subscription is locked by another operation"
    assert answer["http_status"] == 409
    assert answer["retryable"] is False
    assert vendor.effects == []
    op = (await rows(provisioning_engine, provisioning_orm.vendor_operations))[0]
    assert (op["status"], op["code"]) == ("failed", "vendor_rejected")


class CrashingVendor(FakeVendorClient):
    """The vendor applies the cancellation, then our process dies before it hears the answer."""

    def __init__(self, *, crash_before_call: bool = False) -> None:
        super().__init__()
        self.crashes_left = 1
        self.crash_before_call = crash_before_call

    async def cancel(self, *args: Any, **kwargs: Any) -> VendorOutcome:
        if self.crashes_left and self.crash_before_call:
            self.crashes_left -= 1
            raise RuntimeError("crash before the vendor call")
        outcome = await super().cancel(*args, **kwargs)
        if self.crashes_left:
            self.crashes_left -= 1
            raise RuntimeError("crash after the vendor call")
        return outcome


@pytest.mark.parametrize("crash_before_call", [False, True], ids=["after_call", "before_call"])
async def test_provisioning_crash_leaves_a_pending_row_and_one_effect(
        provisioning_engine: AsyncEngine, crash_before_call: bool, handle_way: Handle) -> None:
    vendor = CrashingVendor(crash_before_call=crash_before_call)
    command = vendor_command()
    msg = message(command)
    handlers = ProvisioningHandlers(vendor)
    with pytest.raises(RuntimeError, match="crash"):
        await handle_way(provisioning_engine, provisioning_orm, provisioning_routes(handlers), msg)
    ops = await rows(provisioning_engine, provisioning_orm.vendor_operations)
    assert [op["status"] for op in ops] == ["pending"]  # the intent was checkpointed before the call
    assert await outbox(provisioning_engine, provisioning_orm) == []
    # Redelivery of the same record (it was never marked processed).
    assert await handle_way(provisioning_engine, provisioning_orm, provisioning_routes(handlers), msg)
    assert [e["type"] for e in vendor.effects] == ["cancellation"]
    emitted = await outbox(provisioning_engine, provisioning_orm)
    assert types(emitted) == ["VendorProvisioned"]
    assert emitted[0]["payload"]["already_applied"] is (not crash_before_call)
    ops = await rows(provisioning_engine, provisioning_orm.vendor_operations)
    assert [op["status"] for op in ops] == ["succeeded"]


# --- payment ------------------------------------------------------------------------------------------


@pytest.fixture
async def payment_engine(store: Any, handle_way: Handle) -> AsyncIterator[AsyncEngine]:
    engine = await new_engine(store("payment"), payment_orm)
    yield engine
    await engine.dispose()


def platform_committed(request_id: uuid.UUID | None = None, **overrides: Any) -> PlatformCommitted:
    values: dict[str, Any] = dict(
        request_id=request_id or uuid.uuid4(), account_id="acc-1", subscription_id="sub-1", mode="immediate",
        full=True, trial=False, effective_date=TODAY, access_end_date=TODAY, period_start=PERIOD_START,
        period_end=PERIOD_END, quantity_before=1, quantity_after=0, currency="USD", refund_due=True,
        history="Status is set to canceled with effective date 2026-11-21",
        snapshot=SubscriptionSnapshot(subscription_status="canceled", provisioning_status="Synchronized"),
    )
    values.update(overrides)
    return PlatformCommitted.model_validate(values)


class Payments:
    def __init__(self, engine: AsyncEngine, handle_way: Handle) -> None:
        self.engine = engine
        self.handle = handle_way
        self.gateway = FakeGatewayClient()
        self.handlers = PaymentHandlers(self.gateway)

    async def charge(self, charge_id: str = "c1", amount: str = "30.00") -> None:
        captured_at = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
        gateway_charge_id = f"gw-{charge_id}"
        await self.gateway.capture(amount=Decimal(amount), currency="USD", account_id="acc-1",
                                   subscription_id="sub-1", captured_at=captured_at,
                                   gateway_charge_id=gateway_charge_id)
        event = ChargeCaptured(charge_id=charge_id, account_id="acc-1", subscription_id="sub-1", amount=amount,
                               currency="USD", captured_at=captured_at, gateway_charge_id=gateway_charge_id,
                               period_start=PERIOD_START, period_end=PERIOD_END)
        await self.handle(self.engine, payment_orm, self.handlers.charge_captured, message(event))

    async def commit(self, event: PlatformCommitted) -> list[dict[str, Any]]:
        before = len(await outbox(self.engine, payment_orm))
        await self.handle(self.engine, payment_orm, self.handlers.platform_committed, message(event))
        return (await outbox(self.engine, payment_orm))[before:]

    def refund_effects(self) -> list[dict[str, Any]]:
        return [e for e in self.gateway.effects if e["type"] in ("refund", "reversal")]

    async def refunded_amount(self, charge_id: str = "c1") -> Decimal:
        found = await rows(self.engine, payment_orm.charges, payment_orm.charges.c.charge_id == charge_id)
        return Decimal(str(found[0]["refunded_amount"])).quantize(Decimal("0.01"))


@pytest.fixture
async def payments(payment_engine: AsyncEngine, handle_way: Handle) -> Payments:
    return Payments(payment_engine, handle_way)


async def test_payment_refunds_the_prorated_amount(payments: Payments) -> None:
    await payments.charge()
    event = platform_committed()
    emitted = await payments.commit(event)
    assert types(emitted) == ["RefundIssued"]
    issued = emitted[0]["payload"]
    key = refund_key(str(event.request_id), "c1")
    # 30.00 * 10 unused of 30 days
    assert (issued["amount"], issued["currency"], issued["status"]) == ("10.00", "USD", "succeeded")
    assert issued["auto_renew_stopped"] is True
    assert [(line["charge_id"], line["amount"], line["idempotency_key"], line["outcome"])
            for line in issued["lines"]] == [("c1", "10.00", key, "succeeded")]
    assert [(e["idempotency_key"], e["amount"]) for e in payments.refund_effects()] == [(key, "10.00")]
    assert [e["type"] for e in payments.gateway.effects if e["type"] == "schedule_stopped"] == ["schedule_stopped"]
    assert await payments.refunded_amount() == Decimal("10.00")
    refund = (await rows(payments.engine, payment_orm.refunds))[0]
    assert (refund["idempotency_key"], refund["status"]) == (key, "succeeded")


async def test_payment_partial_refund_uses_the_license_share(payments: Payments) -> None:
    await payments.charge(amount="40.00")
    emitted = await payments.commit(platform_committed(full=False, quantity_before=4, quantity_after=3))
    # 40.00 * 10/30 * 1/4 = 3.333... -> 3.33
    assert emitted[0]["payload"]["amount"] == "3.33"
    assert emitted[0]["payload"]["auto_renew_stopped"] is False
    assert [e for e in payments.gateway.effects if e["type"] == "schedule_stopped"] == []


async def test_payment_refund_split_over_two_charges(payments: Payments) -> None:
    await payments.charge("c1", "6.00")
    await payments.charge("c2", "24.00")
    emitted = await payments.commit(platform_committed())
    issued = emitted[0]["payload"]
    assert issued["amount"] == "10.00"
    assert sum(Decimal(line["amount"]) for line in issued["lines"]) == Decimal("10.00")
    for charge_id, paid in (("c1", "6.00"), ("c2", "24.00")):
        assert await payments.refunded_amount(charge_id) <= Decimal(paid)
    assert sum(Decimal(e["amount"]) for e in payments.refund_effects()) == Decimal("10.00")


async def test_payment_second_partial_refund_can_take_the_exact_rest(payments: Payments) -> None:
    # 0.30 - 0.10 >= 0.20 is false in binary floating point (how SQLite stores NUMERIC): the guard must
    # still let the last 0.20 of the charge be refunded, not retry forever.
    await payments.charge(amount="0.30")
    first = await payments.commit(platform_committed(effective_date=PERIOD_START, full=False,
                                                     quantity_before=3, quantity_after=2))
    assert first[0]["payload"]["amount"] == "0.10"
    second = await payments.commit(platform_committed(effective_date=PERIOD_START, quantity_before=2,
                                                      quantity_after=0))
    assert types(second) == ["RefundIssued"]
    assert second[0]["payload"]["amount"] == "0.20"
    assert await payments.refunded_amount() == Decimal("0.30")
    assert [e["amount"] for e in payments.refund_effects()] == ["0.10", "0.20"]
    # Nothing is left: a third request has nothing to refund and the guard refuses any more.
    third = await payments.commit(platform_committed(effective_date=PERIOD_START))
    assert third[0]["payload"]["amount"] == "0.00"
    assert len(payments.refund_effects()) == 2
    async with session_factory(payments.engine)() as session, session.begin():
        assert await Ledger(Db(session)).reserve("c1", Decimal("0.01")) is False


async def test_payment_trial_owes_no_refund(payments: Payments) -> None:
    await payments.charge()
    emitted = await payments.commit(platform_committed(trial=True, refund_due=False))
    assert types(emitted) == ["RefundIssued"]
    issued = emitted[0]["payload"]
    assert (issued["status"], issued["amount"], issued["lines"]) == ("not_due", "0.00", [])
    assert payments.refund_effects() == []
    assert [c for c in payments.gateway.calls if c["call"] == "refund"] == []
    assert await payments.refunded_amount() == Decimal("0.00")
    assert await rows(payments.engine, payment_orm.refunds) == []


async def test_payment_gateway_refusal_is_failed_payment_and_releases_the_reservation(payments: Payments) -> None:
    await payments.charge()
    payments.gateway.force_state("gw-c1", "disputed")  # the gateway answers 409 charge_disputed
    event = platform_committed()
    emitted = await payments.commit(event)
    assert types(emitted) == ["Failed"]
    failed = emitted[0]["payload"]
    assert failed["source"] == "payment"
    assert failed["code"] == "refund_failed"
    assert "charge_disputed" in failed["message"]
    assert failed["details"]["refunds"][0]["outcome"] == "failed"
    assert payments.refund_effects() == []
    assert await payments.refunded_amount() == Decimal("0.00")
    refund = (await rows(payments.engine, payment_orm.refunds))[0]
    assert refund["status"] == "failed"
    assert refund["idempotency_key"] == refund_key(str(event.request_id), "c1")


async def test_payment_scripted_4xx(payments: Payments) -> None:
    await payments.charge()
    event = platform_committed()
    key = refund_key(str(event.request_id), "c1")
    payments.gateway.script_refund(RefundOutcome("failed", key, "card_expired", "The card has expired", 422))
    emitted = await payments.commit(event)
    assert types(emitted) == ["Failed"]
    assert "card_expired" in emitted[0]["payload"]["message"]
    assert await payments.refunded_amount() == Decimal("0.00")


async def test_payment_redelivery_refunds_once(payments: Payments) -> None:
    await payments.charge()
    event = platform_committed()
    first = await payments.commit(event)
    second = await payments.commit(event)  # the same event again, under a new event id
    assert types(first) == ["RefundIssued"]
    assert len(payments.refund_effects()) == 1
    assert len([c for c in payments.gateway.calls if c["call"] == "refund"]) == 1
    assert len([c for c in payments.gateway.calls if c["call"] == "stop_schedule"]) == 1
    assert await payments.refunded_amount() == Decimal("10.00")
    assert len(await rows(payments.engine, payment_orm.refunds)) == 1
    # The redelivery may repeat the outcome (the same lines), never a new refund.
    assert types(second) in ([], ["RefundIssued"])
    for emitted in second:
        assert emitted["payload"]["lines"] == first[0]["payload"]["lines"]


class MeetingGateway(FakeGatewayClient):
    """A gateway whose schedule stop and refund each wait until the other one has been asked."""

    def __init__(self) -> None:
        super().__init__()
        self.both_asked = asyncio.Barrier(2)

    async def refund(self, key: str, **kwargs: Any) -> RefundOutcome:
        await asyncio.wait_for(self.both_asked.wait(), 5)
        return await super().refund(key, **kwargs)

    async def stop_schedule(self, subscription_id: str, *, request_id: str) -> GatewayOutcome:
        await asyncio.wait_for(self.both_asked.wait(), 5)
        return await super().stop_schedule(subscription_id, request_id=request_id)


async def test_payment_stops_the_schedule_and_refunds_in_one_round_trip(payment_engine: AsyncEngine,
                                                                       handle_way: Handle) -> None:
    payments = Payments(payment_engine, handle_way)
    payments.gateway = MeetingGateway()  # one after the other, the first call would time out waiting
    payments.handlers = PaymentHandlers(payments.gateway)
    await payments.charge()
    emitted = await payments.commit(platform_committed())
    assert types(emitted) == ["RefundIssued"]
    assert emitted[0]["payload"]["auto_renew_stopped"] is True
    assert sorted(c["call"] for c in payments.gateway.calls) == ["refund", "stop_schedule"]


async def test_payment_schedule_stop_failure_keeps_the_refund_pending_for_the_retry(payments: Payments) -> None:
    await payments.charge()
    event = platform_committed()
    msg = message(event)
    failing = GatewayOutcome(False, False, 503, "unavailable", "try later", True)
    real_stop = payments.gateway.stop_schedule
    payments.gateway.stop_schedule = lambda *a, **k: asyncio.sleep(0, failing)  # type: ignore[method-assign]
    with pytest.raises(TransientError, match="recurring schedule"):
        await payments.handle(payments.engine, payment_orm, payments.handlers.platform_committed, msg)
    # The refund went out with the stop, but nothing of the answers is recorded: the key stays pending.
    assert [r["status"] for r in await rows(payments.engine, payment_orm.refunds)] == ["pending"]
    payments.gateway.stop_schedule = real_stop  # type: ignore[method-assign]
    assert await payments.handle(payments.engine, payment_orm, payments.handlers.platform_committed, msg)
    key = refund_key(str(event.request_id), "c1")
    assert [c["idempotency_key"] for c in payments.gateway.calls if c["call"] == "refund"] == [key, key]
    assert len(payments.refund_effects()) == 1  # the gateway answered the second ask with the first refund
    assert [r["status"] for r in await rows(payments.engine, payment_orm.refunds)] == ["succeeded"]
    assert await payments.refunded_amount() == Decimal("10.00")
    assert types(await outbox(payments.engine, payment_orm)) == ["RefundIssued"]


async def test_payment_a_refused_schedule_stop_is_manual_review_not_a_retry_for_ever(payments: Payments) -> None:
    """A 4xx from the gateway is final: retrying the record for ever held every record behind it."""
    await payments.charge()
    refused = GatewayOutcome(False, False, 409, "schedule_locked", "The schedule is locked by a dispute", False)
    payments.gateway.stop_schedule = lambda *a, **k: asyncio.sleep(0, refused)  # type: ignore[method-assign]
    emitted = await payments.commit(platform_committed())
    assert types(emitted) == ["Failed"]
    failed = emitted[0]["payload"]
    assert (failed["source"], failed["code"], failed["retryable"]) == ("payment", "auto_renew_stop_failed", False)
    assert failed["message"] == ("The gateway refused to stop auto-renew: 409 schedule_locked: "
                                 "The schedule is locked by a dispute")
    # the refund went out in the same round and is recorded as issued; the schedule is not recorded stopped
    assert [line["outcome"] for line in failed["details"]["refunds"]] == ["succeeded"]
    assert failed["details"]["auto_renew_stopped"] is False
    assert [r["status"] for r in await rows(payments.engine, payment_orm.refunds)] == ["succeeded"]
    assert not await rows(payments.engine, payment_orm.schedule_stops)


async def test_payment_a_refused_schedule_stop_at_the_end_of_term_is_manual_review(payments: Payments) -> None:
    refused = GatewayOutcome(False, False, 404, "no_schedule", "No schedule for this subscription", False)
    payments.gateway.stop_schedule = lambda *a, **k: asyncio.sleep(0, refused)  # type: ignore[method-assign]
    scheduled = CancellationScheduled(
        request_id=uuid.uuid4(), account_id="acc-1", subscription_id="sub-1", run_on=PERIOD_END, history="(scheduled)",
        snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="Synchronized"))
    await payments.handle(payments.engine, payment_orm, payments.handlers.cancellation_scheduled, message(scheduled))
    emitted = await outbox(payments.engine, payment_orm)
    assert types(emitted) == ["Failed"]
    assert emitted[0]["payload"]["code"] == "auto_renew_stop_failed"
    assert emitted[0]["payload"]["details"]["scheduled"] is True


@pytest.mark.parametrize("full", [True, False], ids=["full", "partial"])
async def test_payment_end_of_term_stops_the_schedule_only_for_a_full_cancellation(payments: Payments,
                                                                                  full: bool) -> None:
    scheduled = CancellationScheduled(
        request_id=uuid.uuid4(), account_id="acc-1", subscription_id="sub-1", run_on=PERIOD_END,
        history="(scheduled)", full=full,
        snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="Synchronized"))
    await payments.handle(payments.engine, payment_orm, payments.handlers.cancellation_scheduled, message(scheduled))
    stops = [call for call in payments.gateway.calls if call["call"] == "stop_schedule"]
    emitted = await outbox(payments.engine, payment_orm)
    if full:
        assert len(stops) == 1 and types(emitted) == ["AutoRenewStopped"]
    else:  # the subscription renews with the licenses that are left
        assert stops == [] and emitted == []


async def test_payment_unknown_outcome_is_retried_with_the_same_key(payments: Payments) -> None:
    await payments.charge()
    event = platform_committed()
    key = refund_key(str(event.request_id), "c1")
    payments.gateway.script_refund(RefundOutcome("unknown", key, "gateway_timeout", "no answer"))
    msg = message(event)
    with pytest.raises(TransientError):
        await payments.handle(payments.engine, payment_orm, payments.handlers.platform_committed, msg)
    # The reservation and the pending key survived; the retry reuses them.
    assert await payments.refunded_amount() == Decimal("10.00")
    assert [r["status"] for r in await rows(payments.engine, payment_orm.refunds)] == ["pending"]
    assert await payments.handle(payments.engine, payment_orm, payments.handlers.platform_committed, msg)
    refund_calls = [c for c in payments.gateway.calls if c["call"] == "refund"]
    assert [c["idempotency_key"] for c in refund_calls] == [key, key]
    assert len(payments.refund_effects()) == 1
    assert await payments.refunded_amount() == Decimal("10.00")
    assert types(await outbox(payments.engine, payment_orm)) == ["RefundIssued"]


async def test_an_operators_retry_after_a_platform_failure_does_not_call_the_vendor_again(
        provisioning_engine: AsyncEngine, handle_way: Handle) -> None:
    vendor = FakeVendorClient()
    first = vendor_command(new_quantity=3)
    await provision(provisioning_engine, vendor, first, handle_way)
    retry = vendor_command(new_quantity=3).model_copy(update={"retry_of": first.request_id})
    emitted = await provision(provisioning_engine, vendor, retry, handle_way)
    assert types(emitted) == ["VendorProvisioned"] and emitted[0]["payload"]["already_applied"] is True
    assert len(vendor.calls) == 1
    # A retry of a retry finds it on record too; a different change (another quantity) is asked for.
    again = vendor_command(new_quantity=3).model_copy(update={"retry_of": retry.request_id})
    assert types(await provision(provisioning_engine, vendor, again, handle_way)) == ["VendorProvisioned"]
    other = vendor_command(new_quantity=2).model_copy(update={"retry_of": again.request_id})
    await provision(provisioning_engine, vendor, other, handle_way)
    assert len(vendor.calls) == 2


async def test_billing_tells_provisioning_of_a_retry_only_after_a_platform_failure(billing: Billing) -> None:
    """An operator's retry of a request the platform failed says so to provisioning (the vendor is not
    asked again); a retry of anything else, or a request merely claiming retry_of, is asked as usual."""
    vendor_failed = await billing.locked()
    await billing.send(VendorCancellationFailed(
        request_id=vendor_failed.request_id, subscription_id="sub-1", vendor="acme", vendor_subscription_id="V-1",
        code="vendor_rejected", message="locked", http_status=409, retryable=False))
    after_vendor = await billing.send(requested(retry_of=vendor_failed.request_id))
    assert after_vendor[-1]["payload"]["retry_of"] is None
    async with session_factory(billing.engine)() as session, session.begin():
        await BillingRepository(Db(session)).arm_fault("sub-1", "commit")
    platform_failed = uuid.UUID(after_vendor[-1]["payload"]["request_id"])
    assert types(await billing.send(provisioned(platform_failed))) == ["Failed"]
    retry = await billing.send(requested(retry_of=platform_failed))
    assert types(retry) == ["CancellationReceived", "VendorCancellationRequested"]
    assert retry[-1]["payload"]["retry_of"] == str(platform_failed)
