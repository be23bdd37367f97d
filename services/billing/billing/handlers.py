"""Billing's handlers: the intake of cancellation requests and the platform side of the saga.

Each handler runs inside one unit of work: the state change, the events it emits and the inbox
record commit together (see cancelflow.messaging).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from cancelflow.events import (
    CancellationReceived,
    CancellationRequested,
    Failed,
    Mode,
    PlatformCommitted,
    Source,
    SubscriptionActivated,
    SubscriptionSnapshot,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.uow import UnitOfWork

from billing import domain
from billing.repository import BillingRepository

log = get_logger(__name__)


class BillingHandlers:
    def __init__(self, today: Callable[[], date]) -> None:
        self.today = today

    async def subscription_activated(self, msg: Message, uow: UnitOfWork) -> None:
        facts: SubscriptionActivated = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.session)
        await repo.upsert_subscription(facts, provisioning_status=domain.SYNCHRONIZED)
        await repo.schedule_renewal(facts)

    async def cancellation_requested(self, msg: Message, uow: UnitOfWork) -> None:
        request: CancellationRequested = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.session)
        request_id = str(request.request_id)
        if await repo.cancellation(request_id) is not None:
            log.info("request_id seen before: no new effect", request_id=request_id)
            return
        uow.emit(_received(request), correlation_id=request_id)
        if request.target == "charges":
            # Duplicate-charge disputes belong to the dispute service, which owns that case from here.
            await repo.add_cancellation(request_id=request_id, subscription_id=None,
                                        account_id=request.account_id, mode=request.mode.value,
                                        state="routed_to_dispute")
            return
        row = await repo.subscription(request.subscription_id or "")
        verdict = domain.validate(request, repo.facts(row) if row else None, self.today())
        if isinstance(verdict, domain.Rejection):
            await self._reject(uow, repo, request, verdict, row)
            return
        await self._lock_and_ask_vendor(uow, repo, request, verdict, row)  # type: ignore[arg-type]

    async def _reject(self, uow: UnitOfWork, repo: BillingRepository, request: CancellationRequested,
                      rejection: domain.Rejection, row: dict | None) -> None:
        request_id = str(request.request_id)
        await repo.add_cancellation(request_id=request_id, subscription_id=request.subscription_id,
                                    account_id=request.account_id, mode=request.mode.value, state="rejected")
        owner = row is not None and row["account_id"] == request.account_id
        uow.emit(Failed(
            request_id=request.request_id, source=Source.validation, code=rejection.code.value,
            message=rejection.message, retryable=rejection.code.value == "provisioning_in_progress",
            snapshot=repo.snapshot(row) if owner else None,
        ))

    async def _lock_and_ask_vendor(self, uow: UnitOfWork, repo: BillingRepository,
                                   request: CancellationRequested, plan: domain.Plan, row: dict) -> None:
        request_id = str(request.request_id)
        if request.mode is Mode.end_of_term or request.requires_approval:
            raise NotImplementedError("end_of_term and approval are handled by the modes issue")
        await repo.add_cancellation(
            request_id=request_id, subscription_id=row["subscription_id"], account_id=request.account_id,
            mode=request.mode.value, state="awaiting_vendor", effective_date=plan.effective_date,
            access_end_date=plan.access_end_date, new_quantity=plan.new_quantity,
            prior_status=row["status"], prior_provisioning_status=row["provisioning_status"],
        )
        await repo.update_subscription(row["subscription_id"], provisioning_status=domain.IN_PROGRESS)
        uow.emit(VendorCancellationRequested(
            request_id=request.request_id, account_id=request.account_id,
            subscription_id=row["subscription_id"], vendor=row["vendor"],
            vendor_subscription_id=row["vendor_subscription_id"], effective_date=plan.effective_date,
            current_quantity=row["quantity"], new_quantity=plan.new_quantity,
            snapshot=SubscriptionSnapshot(subscription_status=row["status"],
                                          provisioning_status=domain.IN_PROGRESS,
                                          effective_date=plan.effective_date,
                                          access_end_date=plan.access_end_date),
        ))

    async def vendor_provisioned(self, msg: Message, uow: UnitOfWork) -> None:
        event: VendorProvisioned = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.session)
        saga = await repo.cancellation(str(event.request_id))
        if saga is None or saga["state"] != "awaiting_vendor":
            return
        row = await repo.subscription(saga["subscription_id"])
        assert row is not None
        # Disarmed outside the savepoint, so the injected fault fires once and stays spent.
        fault = await repo.take_fault(row["subscription_id"], "commit")
        try:
            async with uow.session.begin_nested():
                committed = await self._commit(repo, saga, row, inject_fault=fault)
        except Exception as exc:  # scenario 3: the vendor canceled, our platform did not
            log.error("platform commit failed after vendor success", error=repr(exc))
            await self._revert_after_platform_error(uow, repo, saga, row, exc)
            return
        uow.emit(committed)

    async def _commit(self, repo: BillingRepository, saga: dict, row: dict, *,
                      inject_fault: bool) -> PlatformCommitted:
        subscription_id = row["subscription_id"]
        effective = saga["effective_date"]
        full = saga["new_quantity"] == 0
        history = domain.committed_history(saga["new_quantity"], effective)
        if full:
            await repo.update_subscription(subscription_id, status=domain.CANCELED, effective_date=effective,
                                           auto_renew=False, provisioning_status=domain.SYNCHRONIZED)
            await repo.cancel_scheduled_billings(subscription_id)
        else:
            await repo.update_subscription(subscription_id, quantity=saga["new_quantity"],
                                           effective_date=effective, provisioning_status=domain.SYNCHRONIZED)
            await repo.reprice_scheduled_billings(subscription_id, row["unit_price"] * saga["new_quantity"])
        await repo.add_history(subscription_id, saga["request_id"], history)
        await repo.set_cancellation(saga["request_id"], state="committed")
        if inject_fault:  # after the writes, so the savepoint really has something to undo
            raise domain.PlatformCommitError("injected platform fault at stage 'commit'")
        after = await repo.subscription(subscription_id)
        assert after is not None
        return PlatformCommitted(
            request_id=saga["request_id"], account_id=row["account_id"], subscription_id=subscription_id,
            mode=Mode(saga["mode"]), full=full, trial=row["trial"], effective_date=effective,
            access_end_date=saga["access_end_date"], period_start=row["current_period_start"],
            period_end=row["current_period_end"], quantity_before=row["quantity"],
            quantity_after=saga["new_quantity"], currency=row["currency"],
            refund_due=not row["trial"] and saga["mode"] != Mode.end_of_term.value,
            history=history,
            snapshot=repo.snapshot(after, access_end_date=saga["access_end_date"]),
        )

    async def _revert(self, repo: BillingRepository, saga: dict, history: str, state: str) -> dict:
        subscription_id = saga["subscription_id"]
        await repo.update_subscription(subscription_id, status=saga["prior_status"],
                                       provisioning_status=saga["prior_provisioning_status"])
        await repo.add_history(subscription_id, saga["request_id"], history)
        await repo.set_cancellation(saga["request_id"], state=state)
        row = await repo.subscription(subscription_id)
        assert row is not None
        return row

    async def _revert_after_platform_error(self, uow: UnitOfWork, repo: BillingRepository, saga: dict,
                                           before: dict, exc: Exception) -> None:
        row = await self._revert(repo, saga, domain.HISTORY_PLATFORM_ERROR, "reverted_platform")
        uow.emit(Failed(
            request_id=saga["request_id"], source=Source.platform, code="platform_commit_failed",
            message=domain.HISTORY_PLATFORM_ERROR, retryable=False, history=domain.HISTORY_PLATFORM_ERROR,
            snapshot=repo.snapshot(row),
            details={
                "account_id": before["account_id"], "subscription_id": before["subscription_id"],
                "vendor": before["vendor"], "vendor_subscription_id": before["vendor_subscription_id"],
                "vendor_state": "canceled at the vendor", "requested_effective_date": str(saga["effective_date"]),
                "new_quantity": saga["new_quantity"], "platform_error": str(exc),
            },
        ))

    async def vendor_failed(self, msg: Message, uow: UnitOfWork) -> None:
        event: VendorCancellationFailed = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.session)
        saga = await repo.cancellation(str(event.request_id))
        if saga is None or saga["state"] != "awaiting_vendor":
            return
        history = domain.vendor_error_history(event.message)
        row = await self._revert(repo, saga, history, "reverted_vendor")
        uow.emit(Failed(
            request_id=event.request_id, source=Source.vendor, code=event.code, message=event.message,
            retryable=True, history=history, snapshot=repo.snapshot(row),
            details={"vendor": event.vendor, "vendor_subscription_id": event.vendor_subscription_id,
                     "http_status": event.http_status, "attempts": event.attempts},
        ))


def _received(request: CancellationRequested) -> CancellationReceived:
    return CancellationReceived(
        request_id=request.request_id, account_id=request.account_id, target=request.target,
        subscription_id=request.subscription_id, charge_ids=request.charge_ids, mode=request.mode,
        effective_date=request.effective_date, quantity=request.quantity, requested_by=request.requested_by,
        reason=request.reason, requires_approval=request.requires_approval,
        opt_out_of_emails=request.opt_out_of_emails,
    )
