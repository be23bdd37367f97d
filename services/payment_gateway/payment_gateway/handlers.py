"""The money step: stop auto-renew at the gateway, then refund the unused part of the period.

Every refund is recorded as `pending` with its idempotency key and reserved against the charge's
balance (the guard) before the gateway is called. A redelivery after a crash finds the same key and
asks the gateway again with it: the gateway returns the first result, so no refund happens twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import datetime
from decimal import Decimal
from typing import Any

from cancelflow import contract, metrics
from cancelflow.crashpoints import crash_point
from cancelflow.events import (
    AutoRenewStopped,
    CancellationScheduled,
    ChargeCaptured,
    Failed,
    PlatformCommitted,
    RefundIssued,
    RefundLine,
    Source,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.deadletter import TransientError
from cancelflow.messaging.dispatch import HandlerContext
from cancelflow.messaging.facts import FACTS_WAIT_S, FactsProgress
from payment_gateway import domain
from payment_gateway.adapters.gateway import AbstractGatewayClient, GatewayOutcome, RefundOutcome
from payment_gateway.ledger import Ledger
from payment_gateway.waits import AWAITING_FACTS, RefundWaits

log = get_logger(__name__)


def _stopped(outcome: GatewayOutcome) -> bool:
    """Whether the gateway stopped the recurring schedule. An error worth retrying (5xx, timeout) retries
    the record: stopping is idempotent at the gateway. A refusal (4xx) is final: False, and a person
    stops auto-renew (the request ends `manual_review`), instead of the record being retried for ever
    with every record behind it waiting."""
    if outcome.ok:
        return True
    if outcome.retryable:
        raise TransientError(f"gateway could not stop the recurring schedule: {outcome.message}")
    log.error("gateway refused to stop the recurring schedule", code=outcome.code, error=outcome.message)
    return False


def _foreign(charge: domain.ChargeBalance, currency: str) -> str:
    return (f"Charge {charge.charge_id} ({charge.gateway_charge_id}, {charge.captured:.2f} {charge.currency}) is not in "
            f"the subscription's currency ({currency}): not refunded automatically")


def _refusal(outcome: GatewayOutcome) -> str:
    return f"The gateway refused to stop auto-renew: {outcome.http_status} {outcome.code}: {outcome.message}"


class PaymentHandlers:
    def __init__(self, gateway: AbstractGatewayClient, facts: FactsProgress | None = None, *,
                 facts_wait_s: float = FACTS_WAIT_S) -> None:
        self.gateway = gateway
        self.facts = facts or FactsProgress()
        self.facts_wait_s = facts_wait_s

    async def charge_captured(self, msg: Message[ChargeCaptured], uow: HandlerContext) -> None:
        await Ledger(uow.db).record_charge(msg.payload)
        if await RefundWaits(uow.db).any():
            uow.wrote(AWAITING_FACTS)  # the waiter looks again once the charge is committed

    async def platform_committed(self, msg: Message[PlatformCommitted], uow: HandlerContext) -> None:
        event = msg.payload
        if not await self._waits_for_charges(uow, event, msg.envelope.occurred_at):
            await self._stop_and_refund(uow, event)

    async def _waits_for_charges(self, uow: HandlerContext, event: PlatformCommitted, occurred_at: datetime) -> bool:
        """Whether the refund waits (a row committed with the inbox): the period's charges known are short
        and the facts are not read up to the event, or an earlier refund of the subscription waits."""
        if not event.refund_due:
            return False
        waits = RefundWaits(uow.db)
        request_id = str(event.request_id)
        oldest = await waits.oldest(event.subscription_id)
        if oldest is not None and (oldest == request_id or await waits.get(request_id) is not None):
            return True  # waits already (the event again under a new id)
        if await Ledger(uow.db).refunds_for(request_id):
            return False  # planned before: a redelivery goes on with its keys
        if oldest is None and not await self._short_of_charges(uow, event, occurred_at):
            return False
        await waits.add(event, occurred_at)
        log.info("charges of the period not read up to the cancellation: its refund waits",
                 request_id=request_id, subscription_id=event.subscription_id)
        uow.wrote(AWAITING_FACTS)  # wakes the waiter once committed
        return True

    async def _short_of_charges(self, uow: HandlerContext, event: PlatformCommitted, occurred_at: datetime, *,
                                beside_the_loop: bool = False) -> bool:
        read = self.facts.handled_up_to if beside_the_loop else self.facts.read_up_to
        if read(occurred_at):
            return False  # every charge published before it is recorded: what is known is all there is
        charges = await Ledger(uow.db).period_charges(event.account_id, event.subscription_id, event.period_start)
        return domain.short_of_charges([c.quantity for c in charges], period_quantity=event.period_quantity,
                                       quantity_before=event.quantity_before)

    async def settle_waiting(self, uow: HandlerContext, request_id: str) -> bool:
        """A refund waiting for its charges: decided when they have come, once the facts are read up to
        its event, or after `facts_wait_s` whatever they say, and after any earlier refund of its
        subscription. False while it still waits (or waits no more)."""
        waits = RefundWaits(uow.db)
        wait = await waits.get(request_id)
        if wait is None or await waits.oldest(wait["subscription_id"]) != request_id:
            return False
        event = PlatformCommitted.model_validate(wait["event"])
        waited_s = (utcnow() - wait["created_at"]).total_seconds()
        if not await Ledger(uow.db).refunds_for(request_id) and await self._short_of_charges(
                uow, event, wait["occurred_at"], beside_the_loop=True):
            if waited_s < self.facts_wait_s:
                return False
            log.warning("charges of the period still short after waiting for their facts: refunding what is "
                        "known", request_id=request_id, waited_s=round(waited_s, 1))
        await self._stop_and_refund(uow, event)  # raises (the wait stays) until the gateway's answers are final
        await waits.drop(request_id)
        return True

    async def _stop_and_refund(self, uow: HandlerContext, event: PlatformCommitted) -> None:
        ledger = Ledger(uow.db)
        stop = event.full and not await ledger.schedule_stopped(event.subscription_id)
        records: list[dict] = []
        foreign: list[domain.ChargeBalance] = []
        if event.refund_due:
            charges = await ledger.period_charges(event.account_id, event.subscription_id, event.period_start)
            # A charge in another currency is not refunded automatically: a person looks at it.
            foreign = [c for c in charges if c.currency != event.currency]
            records = await ledger.refunds_for(str(event.request_id)) or await self._plan_refunds(
                ledger, event, [c for c in charges if c.currency == event.currency])
        outcomes, refused = await self._at_gateway(uow, event, stop,
                                                   [r for r in records if r["status"] == "pending"])
        if stop and refused is None:
            await self._record_schedule_stop(ledger, event)
        if not event.refund_due and refused is None:
            uow.emit(RefundIssued(request_id=event.request_id, subscription_id=event.subscription_id,
                                  amount=Decimal("0"), currency=event.currency, status="not_due",
                                  auto_renew_stopped=event.full))
            return
        lines = [await self._settle(ledger, record, outcomes.get(record["idempotency_key"])) for record in records
                 if record["status"] != "not_due"]
        self._conclude(uow, event, lines, event.full and refused is None, refused, foreign)

    async def _at_gateway(self, uow: HandlerContext, event: PlatformCommitted, stop: bool,
                          pending: list[dict]) -> tuple[dict[str, RefundOutcome], GatewayOutcome | None]:
        """Stop the recurring schedule (when `stop`) and issue the pending refunds together: one round
        trip to the gateway, not one after the other. What was planned (refund keys, reservations) is
        committed before any call. Unless every answer is final, this raises and nothing is recorded:
        the record is retried and asks again with the same keys (every call is idempotent there).
        Returns the refunds' outcomes, and the gateway's answer when it refused to stop the schedule."""
        if not stop and not pending:
            return {}, None
        async with uow.outside():
            calls: list[Awaitable[Any]] = [self._refund(record, event) for record in pending]
            if stop:
                calls.append(self.gateway.stop_schedule(event.subscription_id, request_id=str(event.request_id)))
            answers: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
            if pending:
                crash_point("payment_gateway.after_refund_call")
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        refused = None
        if stop:
            answer = answers.pop()
            refused = None if _stopped(answer) else answer
        outcomes: dict[str, RefundOutcome] = dict(zip((r["idempotency_key"] for r in pending), answers, strict=True))
        for key, outcome in outcomes.items():
            if outcome.status == "unknown":
                # The gateway may or may not have refunded: keep the reservation and the key, and
                # ask again later with the same key (it answers with the first result).
                raise TransientError(f"refund {key} outcome unknown: {outcome.message}")
        return outcomes, refused

    async def cancellation_scheduled(self, msg: Message[CancellationScheduled], uow: HandlerContext) -> None:
        """End of term: the recurring schedule stops now, the cancellation itself runs later. A partial
        one keeps the schedule: the subscription renews with the licenses that are left."""
        event = msg.payload
        if not event.full:
            return
        ledger = Ledger(uow.db)
        if not await ledger.schedule_stopped(event.subscription_id):
            async with uow.outside():
                outcome = await self.gateway.stop_schedule(event.subscription_id, request_id=str(event.request_id))
            if not _stopped(outcome):
                # Support stops it by hand; the cancellation itself still runs when the period ends.
                uow.emit(Failed(request_id=event.request_id, source=Source.payment, code="auto_renew_stop_failed",
                                message=_refusal(outcome), retryable=False,
                                details={"account_id": event.account_id, "subscription_id": event.subscription_id,
                                         "auto_renew_stopped": False, "scheduled": True}))
                return
            await self._record_schedule_stop(ledger, event)
        uow.emit(AutoRenewStopped(request_id=event.request_id, subscription_id=event.subscription_id))

    @staticmethod
    async def _record_schedule_stop(ledger: Ledger, event: PlatformCommitted | CancellationScheduled) -> None:
        # Another request for the subscription may have stopped it while we were at the gateway (the
        # call is idempotent there); record the stop once.
        if not await ledger.schedule_stopped(event.subscription_id):
            await ledger.record_schedule_stop(event.subscription_id, str(event.request_id))

    @staticmethod
    async def _plan_refunds(ledger: Ledger, event: PlatformCommitted, charges: list[domain.ChargeBalance]) -> list[dict]:
        """Each charge's fair share of what this request removes, within what its gateway charge has left."""
        request_id = str(event.request_id)
        removed = event.quantity_before - event.quantity_after
        for charge in charges:
            start, end = charge.period_start or event.period_start, charge.period_end or event.period_end
            earlier = await ledger.earlier_refunds(charge.gateway_charge_id, start, end)
            # Licenses paid: as upstream said for the charge, else as counted the first time, else the
            # subscription's quantity when the period began (billing's), else its quantity now.
            licenses_paid = (charge.quantity or earlier.licenses_paid or event.period_quantity
                             or event.quantity_before)
            terms = domain.ChargeTerms(charge.captured, licenses_paid, (end - start).days)
            share = domain.fair_share(terms, earlier, removed=removed,
                                      unused=domain.unused_days(start, end, event.effective_date))
            amount = min(share.amount, charge.refundable)
            if share.licenses == 0 and amount <= 0:
                continue
            if amount > 0 and not await ledger.reserve(charge.charge_id, amount):
                raise TransientError(f"charge {charge.charge_id} balance changed while planning; replanning")
            key = contract.cancellation_refund_key(request_id, charge.charge_id)
            await ledger.add_refund(key=key, request_id=request_id, charge=charge, amount=max(amount, domain.ZERO),
                                    licenses=share.licenses, licenses_paid=licenses_paid,
                                    effective_date=event.effective_date)
            if amount <= 0:
                # Nothing to send the gateway, but the licenses count: they were removed from the charge.
                await ledger.settle_refund(key, status="not_due")
        # `platform_committed` commits these (intent and reservation) before any gateway call: they
        # survive a crash.
        return await ledger.refunds_for(request_id)

    def _refund(self, record: dict, event: PlatformCommitted) -> Awaitable[RefundOutcome]:
        return self.gateway.refund(
            record["idempotency_key"], gateway_charge_id=record["gateway_charge_id"],
            amount=Decimal(record["amount"]), currency=record["currency"],
            reason="prorated refund of a cancellation", request_id=record["request_id"],
            subscription_id=event.subscription_id)

    @staticmethod
    async def _settle(ledger: Ledger, record: dict, outcome: RefundOutcome | None) -> RefundLine:
        """Record the gateway's final answer for a pending refund (`outcome`), or describe one settled
        before (a redelivery): the refund line of the result."""
        key = record["idempotency_key"]
        if outcome is not None:
            if outcome.status == "succeeded":
                await ledger.settle_refund(key, status="succeeded", kind=outcome.kind, refund_id=outcome.refund_id)
                metrics.REFUNDS.labels("succeeded").inc()
                metrics.REFUND_AMOUNT.labels(record["currency"]).inc(float(record["amount"]))
            else:
                await ledger.settle_refund(key, status="failed", error=f"{outcome.code}: {outcome.message}")
                await ledger.release(record["charge_id"], Decimal(record["amount"]))
                metrics.REFUNDS.labels("failed").inc()
            record = {**record, "status": outcome.status, "kind": outcome.kind, "refund_id": outcome.refund_id,
                      "error": None if outcome.status == "succeeded" else f"{outcome.code}: {outcome.message}"}
        return RefundLine(charge_id=record["charge_id"], gateway_charge_id=record["gateway_charge_id"],
                          amount=record["amount"], currency=record["currency"], idempotency_key=key,
                          kind=record.get("kind"), outcome=record["status"], refund_id=record.get("refund_id"),
                          error=record.get("error"))

    @staticmethod
    def _conclude(uow: HandlerContext, event: PlatformCommitted, lines: list[RefundLine], stopped: bool,
                  refused: GatewayOutcome | None = None, foreign: list[domain.ChargeBalance] | None = None) -> None:
        failed = [line for line in lines if line.outcome == "failed"]
        foreign = foreign or []
        if failed or refused is not None or foreign:
            # The cancellation stays committed; a person finishes the refund, stops auto-renew or
            # refunds a charge in another currency (state manual_review).
            said = [] if not failed else ["The gateway refused the refund: "
                                          + "; ".join(line.error or "" for line in failed)]
            said += [] if refused is None else [_refusal(refused)]
            said += [_foreign(charge, event.currency) for charge in foreign]
            code = "refund_failed" if failed else "auto_renew_stop_failed" if refused else "currency_mismatch"
            uow.emit(Failed(
                request_id=event.request_id, source=Source.payment, code=code, message=". ".join(said),
                retryable=False,
                details={"account_id": event.account_id, "subscription_id": event.subscription_id,
                         "refunds": [line.model_dump(mode="json") for line in lines],
                         "auto_renew_stopped": stopped,
                         "not_refunded": [{"charge_id": c.charge_id, "gateway_charge_id": c.gateway_charge_id,
                                           "amount": f"{c.captured:.2f}", "currency": c.currency}
                                          for c in foreign]},
            ))
            return
        total = sum((line.amount for line in lines), Decimal("0"))
        uow.emit(RefundIssued(request_id=event.request_id, subscription_id=event.subscription_id, amount=total,
                              currency=event.currency, status="succeeded" if total > 0 else "not_due",
                              lines=lines, auto_renew_stopped=stopped))

