"""An operator's `retry_refund` (CONTRACT.md section 11): the refused refunds of a `manual_review`
request, tried again as a request of their own, through the same refund guard.

Each refused line is tried once more under a new key derived from the refused request and the charge
(`retry_refund_key`): whichever retry request names it, a line can be retried only once (the key is
the refund row's primary key), and what a retry reserves never exceeds what the charge has left. The
intent (key, reservation) commits before the gateway is called, as for every refund; a redelivery
finds the same rows and asks again with the same keys.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from cancelflow.contract import retry_refund_key
from cancelflow.events import Failed, RefundIssued, RefundLine, RefundRetryRequested, Source
from cancelflow.messaging.codec import Message
from cancelflow.messaging.deadletter import TransientError
from cancelflow.messaging.dispatch import HandlerContext
from payment_gateway.adapters.gateway import AbstractGatewayClient, RefundOutcome
from payment_gateway.domain import ChargeBalance
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.ledger import Ledger


class RefundRetryHandlers:
    def __init__(self, gateway: AbstractGatewayClient) -> None:
        self.gateway = gateway

    async def refund_retry_requested(self, msg: Message[RefundRetryRequested], uow: HandlerContext) -> None:
        event = msg.payload
        ledger = Ledger(uow.db)
        request_id = str(event.request_id)
        records = await ledger.refunds_for(request_id) or await self._plan(ledger, event)
        pending = [r for r in records if r["status"] == "pending"]
        outcomes: dict[str, RefundOutcome] = {}
        if pending:
            async with uow.outside():  # the keys and reservations are committed first
                answers: list[Any] = await asyncio.gather(*(self._refund(r, event) for r in pending),
                                                          return_exceptions=True)
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
            outcomes = dict(zip((r["idempotency_key"] for r in pending), answers, strict=True))
            for key, outcome in outcomes.items():
                if outcome.status == "unknown":  # asked again later with the same key
                    raise TransientError(f"refund {key} outcome unknown: {outcome.message}")
        lines = [await PaymentHandlers._settle(ledger, r, outcomes.get(r["idempotency_key"])) for r in records]
        uow.emit(_outcome(event, lines))

    @staticmethod
    async def _plan(ledger: Ledger, event: RefundRetryRequested) -> list[dict]:
        request_id, refused_id = str(event.request_id), str(event.retry_of)
        for refused in await ledger.refunds_for(refused_id):
            if refused["status"] != "failed":
                continue
            key = retry_refund_key(refused_id, refused["charge_id"])
            if await ledger.refund_record(key) is not None:
                continue  # this refused line was retried already (by another retry request)
            charge = await ledger.charge_row(refused["charge_id"])
            if charge is None:
                continue
            left = await ledger.refundable(refused["charge_id"]) or Decimal("0.00")  # the gateway charge's, all records
            amount = min(Decimal(refused["amount"]), left)
            if amount <= 0 or not await ledger.reserve(refused["charge_id"], amount):
                continue  # refunded since by something else: nothing left to give back
            balance = ChargeBalance(refused["charge_id"], refused["gateway_charge_id"], left, refused["currency"])
            # The refused line's basis goes with it: later cancellations count these licenses as refunded.
            await ledger.add_refund(key=key, request_id=request_id, charge=balance, amount=amount,
                                    licenses=refused["licenses"], licenses_paid=refused["licenses_paid"],
                                    effective_date=refused["effective_date"])
        return await ledger.refunds_for(request_id)

    def _refund(self, record: dict, event: RefundRetryRequested) -> Any:
        return self.gateway.refund(
            record["idempotency_key"], gateway_charge_id=record["gateway_charge_id"],
            amount=Decimal(record["amount"]), currency=record["currency"],
            reason=f"refund retried by {event.operator}", request_id=record["request_id"],
            subscription_id=event.subscription_id or "")


def _outcome(event: RefundRetryRequested, lines: list[RefundLine]) -> RefundIssued | Failed:
    failed = [line for line in lines if line.outcome == "failed"]
    if not lines or failed:
        message = ("The gateway refused the refund again: " + "; ".join(line.error or "" for line in failed)
                   if failed else f"No refused refund of request {event.retry_of} is left to retry")
        return Failed(request_id=event.request_id, source=Source.payment,
                      code="refund_failed" if failed else "nothing_to_retry", message=message, retryable=False,
                      details={"account_id": event.account_id, "subscription_id": event.subscription_id,
                               "retry_of": str(event.retry_of),
                               "refunds": [line.model_dump(mode="json") for line in lines]})
    total = sum((line.amount for line in lines), Decimal("0"))
    return RefundIssued(request_id=event.request_id, subscription_id=event.subscription_id, amount=total,
                        currency=lines[0].currency, status="succeeded", lines=lines)
