"""Builds the payment-gateway service: the gateway client, the charges copy and the money step."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.events import (
    CancellationScheduled,
    ChargeCaptured,
    ChargesVerificationRequested,
    DuplicateRefundRequested,
    PlatformCommitted,
    RefundRetryRequested,
    Source,
)
from cancelflow.messaging.dispatch import Route
from cancelflow.messaging.facts import FactsWaiter
from cancelflow.service import ServiceRuntime
from cancelflow.sql import Db, Query
from payment_gateway import orm
from payment_gateway.adapters.gateway import GatewayClient
from payment_gateway.disputes import DisputeRefundHandlers
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.ledger import Ledger
from payment_gateway.retries import RefundRetryHandlers
from payment_gateway.settings import Settings
from payment_gateway.waits import AWAITING_FACTS, RefundWaits


def build() -> ServiceRuntime:
    settings = Settings()
    runtime = ServiceRuntime("payment_gateway", settings, orm.metadata, orm.messaging, failure_source=Source.payment)
    gateway = GatewayClient(settings.gateway_url, timeout=settings.gateway_timeout_s,
                            attempts=settings.gateway_attempts)
    handlers = PaymentHandlers(gateway, runtime.facts)
    waiter = FactsWaiter(runtime.new_uow, lambda uow: RefundWaits(uow.db).waiting(), handlers.settle_waiting)
    runtime.wake_on(AWAITING_FACTS, waiter.notify)
    runtime.tasks.append(waiter.run)
    runtime.routes += routes(handlers, DisputeRefundHandlers(gateway), RefundRetryHandlers(gateway))
    runtime.add_view("/charges/{charge_id}", _charge, missing="unknown charge")
    runtime.add_view("/subscriptions/{subscription_id}/charges", _subscription_charges, missing="unknown subscription")
    runtime.on_start.append(gateway.start)
    runtime.on_stop.append(gateway.close)
    return runtime


def routes(handlers: PaymentHandlers, disputes: DisputeRefundHandlers, retries: RefundRetryHandlers) -> list[Route]:
    """What the gateway service consumes, and the handler of each event (the consume loop's and the tests')."""
    return [
        Route(topics.PAYMENTS_CHARGES, dead_letter=True, batch=True, facts=True)
        .on(ChargeCaptured, handlers.charge_captured),
        Route(topics.SAGA, rounds=True)
        .on(PlatformCommitted, handlers.platform_committed)
        .on(CancellationScheduled, handlers.cancellation_scheduled)
        .on(ChargesVerificationRequested, disputes.charges_verification_requested)
        .on(DuplicateRefundRequested, disputes.duplicate_refund_requested)
        .on(RefundRetryRequested, retries.refund_retry_requested),
    ]


CHARGE = Query(select(orm.charges).where(orm.charges.c.charge_id == bindparam("charge_id")))
CHARGE_REFUNDS = Query(select(orm.refunds).where(orm.refunds.c.charge_id == bindparam("charge_id"))
                       .order_by(orm.refunds.c.created_at))


async def _charge(db: Db, charge_id: str) -> dict[str, Any] | None:
    """A charge with its refund guard balance and the refunds issued against it."""
    row = await db.first(CHARGE, charge_id=charge_id)
    if row is None:
        return None
    refunds = await db.all(CHARGE_REFUNDS, charge_id=charge_id)
    refundable = await Ledger(db).refundable(charge_id)  # the gateway charge's, however many records
    return {"charge": row, "refundable": str(refundable), "refunds": refunds}


SUBSCRIPTION_CHARGES = Query(select(orm.charges).where(orm.charges.c.subscription_id == bindparam("subscription_id"))
                             .order_by(orm.charges.c.captured_at))
SUBSCRIPTION_REFUNDS = Query(select(orm.refunds).where(orm.refunds.c.charge_id.in_(
    select(orm.charges.c.charge_id).where(orm.charges.c.subscription_id == bindparam("subscription_id"))))
    .order_by(orm.refunds.c.created_at))


async def _subscription_charges(db: Db, subscription_id: str) -> dict[str, Any]:
    """A subscription's charges with what each has left, and every refund against them."""
    charges = await db.all(SUBSCRIPTION_CHARGES, subscription_id=subscription_id)
    refunds = await db.all(SUBSCRIPTION_REFUNDS, subscription_id=subscription_id)
    ledger = Ledger(db)  # what a gateway charge has left, however many records name it
    charges = [{**c, "refundable": str(await ledger.refundable(c["charge_id"]))} for c in charges]
    return {"charges": charges, "refunds": refunds}
