"""Builds the payment-gateway service: the gateway client, the charges copy and the money step."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.events import Source
from cancelflow.messaging.consumer import Route
from cancelflow.messaging.facts import FactsWaiter
from cancelflow.service import ServiceRuntime, json_response
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
    disputes = DisputeRefundHandlers(gateway)
    retries = RefundRetryHandlers(gateway)
    runtime.add_route(Route(topics.PAYMENTS_CHARGES, {"ChargeCaptured": handlers.charge_captured},
                            dead_letter=True, batch=True, facts=True))
    runtime.add_route(Route(topics.SAGA, {
        "PlatformCommitted": handlers.platform_committed,
        "CancellationScheduled": handlers.cancellation_scheduled,
        "ChargesVerificationRequested": disputes.charges_verification_requested,
        "DuplicateRefundRequested": disputes.duplicate_refund_requested,
        "RefundRetryRequested": retries.refund_retry_requested,
    }, rounds=True))
    runtime.http.router.add_get("/charges/{charge_id}", _charge_view(runtime))
    runtime.http.router.add_get("/subscriptions/{subscription_id}/charges", _subscription_charges(runtime))
    runtime.on_start.append(gateway.start)
    runtime.on_stop.append(gateway.close)
    return runtime


CHARGE = Query(select(orm.charges).where(orm.charges.c.charge_id == bindparam("charge_id")))
CHARGE_REFUNDS = Query(select(orm.refunds).where(orm.refunds.c.charge_id == bindparam("charge_id"))
                       .order_by(orm.refunds.c.created_at))


def _charge_view(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    """Read-only: a charge with its refund guard balance and the refunds issued against it."""

    async def view(request: web.Request) -> web.Response:
        charge_id = request.match_info["charge_id"]
        async with runtime.sessions() as session:
            db = Db(session)
            row = await db.first(CHARGE, charge_id=charge_id)
            if row is None:
                return web.json_response({"error": "unknown charge"}, status=404)
            refunds = await db.all(CHARGE_REFUNDS, charge_id=charge_id)
            refundable = await Ledger(db).refundable(charge_id)  # the gateway charge's, however many records
        body = {"charge": dict(row), "refundable": str(refundable), "refunds": [dict(r) for r in refunds]}
        return json_response(body)

    return view


SUBSCRIPTION_CHARGES = Query(select(orm.charges).where(orm.charges.c.subscription_id == bindparam("subscription_id"))
                             .order_by(orm.charges.c.captured_at))
SUBSCRIPTION_REFUNDS = Query(select(orm.refunds).where(orm.refunds.c.charge_id.in_(
    select(orm.charges.c.charge_id).where(orm.charges.c.subscription_id == bindparam("subscription_id"))))
    .order_by(orm.refunds.c.created_at))


def _subscription_charges(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    """Read-only: a subscription's charges with what each has left, and every refund against them."""

    async def view(request: web.Request) -> web.Response:
        subscription_id = request.match_info["subscription_id"]
        async with runtime.sessions() as session:
            db = Db(session)
            charges = await db.all(SUBSCRIPTION_CHARGES, subscription_id=subscription_id)
            refunds = await db.all(SUBSCRIPTION_REFUNDS, subscription_id=subscription_id)
            ledger = Ledger(db)  # what a gateway charge has left, however many records name it
            charges = [{**c, "refundable": str(await ledger.refundable(c["charge_id"]))} for c in charges]
        body = {"charges": charges, "refunds": refunds}
        return json_response(body)

    return view
