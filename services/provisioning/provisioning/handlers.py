"""Provisioning: asks the vendor to cancel (or reduce licenses) and reports what it said.

The operation is recorded as `pending` and committed before the vendor is called. A crash after
the call finds the pending row on redelivery and calls again: the vendor treats a repeated
cancellation as "already canceled", which counts as success, so the effect happens once.

An operator's retry of a request whose vendor step succeeded (the platform failed after it) does not
call the vendor again: the same change is on record as done, so it is answered as already applied.
"""

from __future__ import annotations

from sqlalchemy import bindparam, insert, select, update

from cancelflow.crashpoints import crash_point
from cancelflow.events import VendorCancellationFailed, VendorCancellationRequested, VendorProvisioned, utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext
from cancelflow.sql import Query
from provisioning import orm
from provisioning.adapters.vendor import AbstractVendorClient, VendorOutcome

log = get_logger(__name__)
ops = orm.vendor_operations

OPERATION = Query(select(ops).where(ops.c.request_id == bindparam("request_id")))
ADD_OPERATION = Query(insert(ops))
# The vendor's answer; the attempts add up over redeliveries (a crash after the call calls again).
FINISH_OPERATION = Query(update(ops).where(ops.c.request_id == bindparam("match_request_id"))
                         .values(attempts=ops.c.attempts + bindparam("more_attempts")))


class ProvisioningHandlers:
    def __init__(self, vendor: AbstractVendorClient) -> None:
        self.vendor = vendor

    async def vendor_cancellation_requested(self, msg: Message[VendorCancellationRequested], uow: HandlerContext) -> None:
        command = msg.payload
        request_id = str(command.request_id)
        op = await uow.db.first(OPERATION, request_id=request_id)
        if op is not None and op["status"] != "pending":
            return  # answered already; the answer was published with it
        if op is None:
            await uow.db.run(
                ADD_OPERATION,
                request_id=request_id, subscription_id=command.subscription_id, vendor=command.vendor,
                vendor_subscription_id=command.vendor_subscription_id,
                operation="cancel" if command.new_quantity == 0 else "set_quantity",
                effective_date=command.effective_date, current_quantity=command.current_quantity,
                new_quantity=command.new_quantity, status="pending", attempts=0, started_at=utcnow(),
            )
        if await self._done_before(uow, command):
            outcome = VendorOutcome(ok=True, already_done=True, http_status=None, code="already_applied",
                                    message=f"made by request {command.retry_of}", retryable=False, attempts=0)
        else:
            async with uow.outside():  # the pending row is committed before the vendor hears of it
                outcome = await self._call_vendor(command)
                crash_point("provisioning.after_vendor_call")
        await uow.db.run(
            FINISH_OPERATION, match_request_id=request_id, more_attempts=outcome.attempts,
            status="succeeded" if outcome.ok else "failed", already_applied=outcome.already_done,
            code=outcome.code, message=outcome.message, http_status=outcome.http_status, finished_at=utcnow(),
        )
        uow.emit(self._answer(command, outcome))

    @staticmethod
    async def _done_before(uow: HandlerContext, command: VendorCancellationRequested) -> bool:
        """Whether the request this one retries already made this very change at the vendor."""
        if command.retry_of is None:
            return False
        earlier = await uow.db.first(OPERATION, request_id=str(command.retry_of))
        return earlier is not None and earlier["status"] == "succeeded" and (
            earlier["vendor_subscription_id"], earlier["current_quantity"], earlier["new_quantity"]
        ) == (command.vendor_subscription_id, command.current_quantity, command.new_quantity)

    async def _call_vendor(self, command: VendorCancellationRequested) -> VendorOutcome:
        if command.new_quantity == 0:
            return await self.vendor.cancel(
                command.vendor_subscription_id, subscription_id=command.subscription_id,
                request_id=str(command.request_id), effective_date=command.effective_date)
        return await self.vendor.set_quantity(
            command.vendor_subscription_id, subscription_id=command.subscription_id,
            request_id=str(command.request_id), quantity=command.new_quantity,
            current_quantity=command.current_quantity)

    @staticmethod
    def _answer(command: VendorCancellationRequested,
                outcome: VendorOutcome) -> VendorProvisioned | VendorCancellationFailed:
        if outcome.ok:
            return VendorProvisioned(
                request_id=command.request_id, subscription_id=command.subscription_id, vendor=command.vendor,
                vendor_subscription_id=command.vendor_subscription_id, new_quantity=command.new_quantity,
                already_applied=outcome.already_done, attempts=outcome.attempts)
        return VendorCancellationFailed(
            request_id=command.request_id, subscription_id=command.subscription_id, vendor=command.vendor,
            vendor_subscription_id=command.vendor_subscription_id, code=outcome.code, message=outcome.message,
            http_status=outcome.http_status, retryable=outcome.retryable, attempts=outcome.attempts)
