"""The money side of the multiple-charge flow: what the gateway says of disputed charges, and the
refund of confirmed duplicates.

Duplicate refunds go through the same guard as cancellation refunds: in one transaction every line is
reserved against its charge's refundable balance (`Ledger.reserve`) and recorded as `pending` under its
idempotency key (`cf-dispute-<request_id>-<charge_id>`), committed before any gateway call. So a charge
a cancellation refunded (or is refunding) cannot be refunded again by a dispute, and the other way round;
a redelivery finds the same keys and asks the gateway again with them (it replays, never refunds twice).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from cancelflow import contract, metrics
from cancelflow.contract import GuardCode
from cancelflow.events import (
    ChargesVerificationRequested,
    ChargesVerified,
    ChargeVerification,
    DisputedCharge,
    DuplicateRefundLine,
    DuplicateRefundRequested,
    DuplicateRefundsIssued,
    RefundLine,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.deadletter import TransientError
from cancelflow.messaging.dispatch import HandlerContext
from payment_gateway.adapters.gateway import AbstractGatewayClient, GatewayError
from payment_gateway.domain import ChargeBalance
from payment_gateway.ledger import Ledger

log = get_logger(__name__)

REASON = "refund of a duplicate charge"


class DisputeRefundHandlers:
    def __init__(self, gateway: AbstractGatewayClient) -> None:
        self.gateway = gateway

    # --- verification ---------------------------------------------------------------------------

    async def charges_verification_requested(self, msg: Message[ChargesVerificationRequested], uow: HandlerContext) -> None:
        event = msg.payload
        answers = [await self._verify(uow, charge) for charge in event.charges]
        uow.emit(ChargesVerified(request_id=event.request_id, charges=answers))

    async def _verify(self, uow: HandlerContext, charge: DisputedCharge) -> ChargeVerification:
        guard = await Ledger(uow.db).refundable(charge.charge_id)
        base: dict[str, Any] = {"charge_id": charge.charge_id, "gateway_charge_id": charge.gateway_charge_id,
                "guard_refundable": guard}
        try:
            async with uow.outside():
                seen = await self.gateway.get_charge(charge.gateway_charge_id)
        except GatewayError as exc:
            if exc.http_status is None or exc.http_status >= 500:
                # The gateway is away: ask again later (the record is retried, nothing is decided).
                raise TransientError(f"gateway could not say the state of {charge.gateway_charge_id}: {exc}") from exc
            return ChargeVerification(**base, found=False, error=f"{exc.code}: {exc.message}")
        if seen is None:
            return ChargeVerification(**base, found=False, error="the gateway has no such charge")
        return ChargeVerification(
            **base, found=True, state=seen.get("state"), amount=seen.get("amount"), currency=seen.get("currency"),
            refunded=seen.get("refunded"), refundable=seen.get("refundable"), captured_at=seen.get("captured_at"))

    # --- refunds --------------------------------------------------------------------------------

    async def duplicate_refund_requested(self, msg: Message[DuplicateRefundRequested], uow: HandlerContext) -> None:
        event = msg.payload
        request_id = str(event.request_id)
        books = Ledger(uow.db)
        records: list[dict[str, Any]] = []
        planned = False
        for line in event.lines:
            key = contract.dispute_refund_key(request_id, line.charge_id)
            record = await books.refund_record(key)
            if record is None:
                record = await self._plan(uow, books, key, request_id, line)
                planned = True
            records.append(record)
        if planned:
            # Reservations and intents committed together, before any gateway call.
            await uow.checkpoint()
            await uow.resume()
        lines = [await self._issue(uow, books, record) for record in records]
        uow.emit(DuplicateRefundsIssued(request_id=event.request_id, lines=lines))

    async def _plan(self, uow: HandlerContext, books: Ledger, key: str, request_id: str,
                    line: DuplicateRefundLine) -> dict[str, Any]:
        charge = await books.charge_row(line.charge_id)
        balance = ChargeBalance(line.charge_id, line.gateway_charge_id, Decimal("0"), line.currency)
        refusal = None
        if line.idempotency_key != key:
            refusal = GuardCode.unexpected_idempotency_key.refused(f"expected {key}, got {line.idempotency_key}")
        elif charge is None:
            refusal = GuardCode.unknown_charge.refused(f"no charge {line.charge_id} in the payment records")
        elif charge["gateway_charge_id"] != line.gateway_charge_id or charge["currency"] != line.currency:
            refusal = GuardCode.charge_mismatch.refused(
                f"{line.charge_id} is {charge['gateway_charge_id']} in {charge['currency']}")
        elif not await books.reserve(line.charge_id, line.amount):
            left = await books.refundable(line.charge_id) or Decimal("0.00")
            refusal = GuardCode.insufficient_refundable_balance.refused(
                f"{left:.2f} {line.currency} of {line.charge_id} is left to refund, not {line.amount:.2f} "
                f"(refunded or being refunded by another request)")
        await books.add_refund(key=key, request_id=request_id, charge=balance, amount=line.amount)
        if refusal is not None:
            log.info("duplicate refund refused by the guard", key=key, error=refusal)
            await books.settle_refund(key, status="failed", error=refusal)
            metrics.REFUNDS.labels("failed").inc()
        record = await books.refund_record(key)
        assert record is not None
        return record

    async def _issue(self, uow: HandlerContext, books: Ledger, record: dict[str, Any]) -> RefundLine:
        key = record["idempotency_key"]
        if record["status"] == "pending":
            charge = await books.charge_row(record["charge_id"])
            async with uow.outside():
                outcome = await self.gateway.refund(
                    key, gateway_charge_id=record["gateway_charge_id"], amount=Decimal(str(record["amount"])),
                    currency=record["currency"], reason=REASON, request_id=record["request_id"],
                    subscription_id=charge["subscription_id"] if charge else "")
            if outcome.status == "unknown":
                # Maybe refunded, maybe not: keep the reservation and the key, ask again later.
                raise TransientError(f"refund {key} outcome unknown: {outcome.message}")
            if outcome.status == "succeeded":
                await books.settle_refund(key, status="succeeded", kind=outcome.kind, refund_id=outcome.refund_id)
                metrics.REFUNDS.labels("succeeded").inc()
                metrics.REFUND_AMOUNT.labels(record["currency"]).inc(float(record["amount"]))
                record = {**record, "status": "succeeded", "kind": outcome.kind, "refund_id": outcome.refund_id}
            else:
                error = f"{outcome.code}: {outcome.message}"
                await books.settle_refund(key, status="failed", error=error)
                await books.release(record["charge_id"], Decimal(str(record["amount"])))
                metrics.REFUNDS.labels("failed").inc()
                record = {**record, "status": "failed", "error": error}
        return RefundLine(charge_id=record["charge_id"], gateway_charge_id=record["gateway_charge_id"],
                          amount=Decimal(str(record["amount"])), currency=record["currency"], idempotency_key=key,
                          kind=record.get("kind"), outcome=record["status"], refund_id=record.get("refund_id"),
                          error=record.get("error"))
