"""Billing's handlers: the intake of cancellation requests and the platform side of the saga.

Each handler runs inside one unit of work: the state change, the events it emits and the inbox
record commit together (see cancelflow.messaging).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from billing import domain
from billing.clock import Clock
from billing.repository import BillingRepository
from cancelflow.events import (
    ApprovalPending,
    CancellationApproved,
    CancellationDeclined,
    CancellationReceived,
    CancellationRequested,
    CancellationScheduled,
    Failed,
    Mode,
    PlatformCommitted,
    RequestDeclined,
    RequestStuck,
    Source,
    SubscriptionActivated,
    SubscriptionSnapshot,
    ValidationCode,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.facts import FACTS_WAIT_S, FactsProgress
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.sql import Savepoint

log = get_logger(__name__)

# A request for a subscription not known yet, waiting for the upstream facts (`settle_waiting`).
AWAITING_FACTS = "awaiting_facts"

# A request the status tracker set aside as stuck while it held the lock (`request_stuck`).
RELEASED_STUCK = "released_stuck"

# The platform commit after the vendor canceled: undone as a whole when it fails (scenario 3).
PLATFORM_COMMIT = Savepoint("platform_commit")


class BillingHandlers:
    def __init__(self, clock: Clock, facts: FactsProgress | None = None, *,
                 facts_wait_s: float = FACTS_WAIT_S) -> None:
        self.clock = clock
        self.facts = facts or FactsProgress()
        self.facts_wait_s = facts_wait_s
        self.on_scheduled: Callable[[], None] = lambda: None

    async def subscription_activated(self, msg: Message, uow: UnitOfWork) -> None:
        facts: SubscriptionActivated = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.db)
        existing = await repo.subscription(facts.subscription_id)
        if existing is not None and msg.envelope.occurred_at < _utc(existing["updated_at"]):
            # Facts from before our last change of the subscription (a cancellation committed since,
            # a lock taken): applying them would undo what happened after them.
            log.info("subscription facts older than our last change of it: not applied",
                     subscription_id=facts.subscription_id, occurred_at=msg.envelope.occurred_at.isoformat())
            return
        if facts.auto_renew and existing is not None and (
                existing["status"] == domain.CANCELED or await repo.ends_at_term(facts.subscription_id)):
            # An upstream refresh does not undo a cancellation, done or scheduled for the end of the
            # term: auto-renew stays off, and no renewal comes back (the gateway's schedule stays stopped).
            facts = facts.model_copy(update={"auto_renew": False})
        kept = await repo.kept_quantity(facts.subscription_id, facts.current_period_start)
        if kept is not None and facts.quantity > kept:
            # Licenses our own cancellation removed stay removed, however upstream counts them, as a
            # canceled subscription stays canceled (a refresh with the old quantity would refund them again).
            facts = facts.model_copy(update={"quantity": kept})
        await repo.upsert_subscription(facts, provisioning_status=domain.SYNCHRONIZED, existing=existing)
        await repo.schedule_renewal(facts)
        for request_id in await repo.awaiting_facts(facts.subscription_id):  # in the order they came
            await self.settle_waiting(uow, request_id)

    # --- intake ------------------------------------------------------------------------------

    async def cancellation_requested(self, msg: Message, uow: UnitOfWork) -> None:
        request: CancellationRequested = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.db)
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
        if row is None and not self.facts.read_up_to(msg.envelope.occurred_at):
            # The subscription's facts may be behind us in a backlog (billing restarted): the request waits
            # for them, within a bound (`settle_waiting`), rather than being rejected as unknown now.
            await repo.add_cancellation(request_id=request_id, subscription_id=request.subscription_id,
                                        account_id=request.account_id, mode=request.mode.value,
                                        state=AWAITING_FACTS, request=request.model_dump(mode="json"))
            log.info("subscription unknown while its facts are not read up to the request: waiting",
                     request_id=request_id, subscription_id=request.subscription_id)
            uow.wrote(AWAITING_FACTS)  # wakes the waiter once committed
            return
        await repo.add_cancellation(request_id=request_id, subscription_id=request.subscription_id,
                                    account_id=request.account_id, mode=request.mode.value, state="received",
                                    request=request.model_dump(mode="json"))
        await self._intake(uow, repo, request, row)

    async def _intake(self, uow: UnitOfWork, repo: BillingRepository, request: CancellationRequested,
                      row: dict | None) -> None:
        """Validate the request (its cancellation row exists) and reject it or set it on its way."""
        request_id = str(request.request_id)
        verdict = await self._validate(repo, request, row)
        if isinstance(verdict, domain.Rejection):
            await repo.set_cancellation(request_id, state="rejected", request=None)
            uow.emit(self._rejection(request, verdict, row))
            return
        assert row is not None
        await repo.set_cancellation(request_id, subscription_id=row["subscription_id"], state="received",
                                    **_plan_columns(verdict))
        saga = await repo.cancellation(request_id)
        assert saga is not None
        if request.requires_approval:
            await repo.set_cancellation(request_id, state="pending_approval")
            uow.emit(ApprovalPending(request_id=request.request_id, subscription_id=row["subscription_id"],
                                     snapshot=repo.snapshot(row)))
            parked = await repo.take_parked_decision(request_id)
            if parked is not None:
                await self._decide(uow, repo, {**saga, "state": "pending_approval"}, **parked)
            return
        await self._proceed(uow, repo, saga, row)

    async def settle_waiting(self, uow: UnitOfWork, request_id: str) -> bool:
        """A request waiting for its subscription's facts: taken in when they have arrived; rejected as
        unknown once the facts are read up to when it arrived, or after `facts_wait_s` whatever they say.
        False while it still waits (or waits no more)."""
        repo = BillingRepository(uow.db)
        saga = await repo.cancellation(request_id)
        if saga is None or saga["state"] != AWAITING_FACTS:
            return False
        row = await repo.subscription(saga["subscription_id"] or "")
        arrived = _utc(saga["created_at"])
        if row is None and not self.facts.handled_up_to(arrived) and (
                utcnow() - arrived).total_seconds() < self.facts_wait_s:
            return False
        if row is None:
            log.info("subscription still unknown after waiting for its facts", request_id=request_id,
                     waited_s=round((utcnow() - arrived).total_seconds(), 1))
        await self._intake(uow, repo, CancellationRequested.model_validate(saga["request"]), row)
        return True

    async def _validate(self, repo: BillingRepository, request: CancellationRequested,
                        row: dict | None) -> domain.Rejection | domain.Plan:
        other_in_flight = False
        if row is not None and row["account_id"] == request.account_id:
            other_in_flight = await repo.in_flight(row["subscription_id"], exclude=str(request.request_id))
        return domain.validate(request, repo.facts(row) if row else None, self.clock.today(),
                               other_in_flight=other_in_flight)

    @staticmethod
    def _rejection(request: CancellationRequested, rejection: domain.Rejection, row: dict | None) -> Failed:
        owner = row is not None and row["account_id"] == request.account_id
        return Failed(
            request_id=request.request_id, source=Source.validation, code=rejection.code.value,
            message=rejection.message, retryable=rejection.code is ValidationCode.provisioning_in_progress,
            snapshot=BillingRepository.snapshot(row) if owner and row else None,
        )

    # --- operator decisions ------------------------------------------------------------------

    async def cancellation_approved(self, msg: Message, uow: UnitOfWork) -> None:
        decision: CancellationApproved = msg.payload  # type: ignore[assignment]
        await self._on_decision(uow, str(decision.request_id), "approved", decision.decided_by, decision.note)

    async def cancellation_declined(self, msg: Message, uow: UnitOfWork) -> None:
        decision: CancellationDeclined = msg.payload  # type: ignore[assignment]
        await self._on_decision(uow, str(decision.request_id), "declined", decision.decided_by, decision.note)

    async def _on_decision(self, uow: UnitOfWork, request_id: str, decision: str, decided_by: str,
                           note: str) -> None:
        repo = BillingRepository(uow.db)
        saga = await repo.cancellation(request_id)
        if saga is None or saga["state"] == AWAITING_FACTS:
            # Decisions travel on other partitions than their request: keep it until the request is taken in.
            await repo.park_decision(request_id, decision=decision, decided_by=decided_by, note=note)
            return
        if saga["state"] != "pending_approval":
            log.warning("decision for a request that is not pending approval: ignored",
                        request_id=request_id, state=saga["state"], decision=decision)
            return
        await self._decide(uow, repo, saga, decision=decision, decided_by=decided_by, note=note)

    async def _decide(self, uow: UnitOfWork, repo: BillingRepository, saga: dict, *, decision: str,
                      decided_by: str, note: str) -> None:
        request_id = saga["request_id"]
        if decision == "declined":
            await repo.set_cancellation(request_id, state="declined", decided_by=decided_by)
            uow.emit(RequestDeclined(request_id=request_id, subscription_id=saga["subscription_id"],
                                     decided_by=decided_by, note=note))
            return
        # Approved: the world may have moved on while the request waited, so validate again.
        request = CancellationRequested.model_validate(saga["request"])
        row = await repo.subscription(saga["subscription_id"])
        verdict = await self._validate(repo, request, row)
        if isinstance(verdict, domain.Rejection):
            await repo.set_cancellation(request_id, state="rejected", decided_by=decided_by)
            uow.emit(self._rejection(request, verdict, row))
            return
        assert row is not None
        await repo.set_cancellation(request_id, decided_by=decided_by, **_plan_columns(verdict))
        saga = await repo.cancellation(request_id)
        assert saga is not None
        await self._proceed(uow, repo, saga, row)

    # --- scheduling and the vendor step ---------------------------------------------------------

    async def _proceed(self, uow: UnitOfWork, repo: BillingRepository, saga: dict, row: dict) -> None:
        if saga["mode"] == Mode.end_of_term.value and saga["run_on"] > self.clock.today():
            await self._schedule(uow, repo, saga, row)
        else:
            await self._lock_and_ask_vendor(uow, repo, saga, row)

    async def _schedule(self, uow: UnitOfWork, repo: BillingRepository, saga: dict, row: dict) -> None:
        """End of term, full: auto-renew stops now (billing here, the gateway's schedule via the event).
        Partial: nothing stops. The subscription goes on with the licenses that are left, so it keeps
        renewing; the commit at the end of the term reprices the renewal (`_commit`)."""
        subscription_id = row["subscription_id"]
        full = saga["new_quantity"] == 0
        if full:
            history = domain.HISTORY_SCHEDULED.format(effective_date=saga["run_on"].isoformat())
            await repo.update_subscription(subscription_id, auto_renew=False)
            await repo.cancel_scheduled_billings(subscription_id)
        else:
            history = domain.HISTORY_SCHEDULED_PARTIAL.format(quantity=saga["new_quantity"],
                                                              effective_date=saga["run_on"].isoformat())
        await repo.add_history(subscription_id, saga["request_id"], history)
        await repo.set_cancellation(saga["request_id"], state="scheduled")
        after = await repo.subscription(subscription_id)
        assert after is not None
        uow.emit(CancellationScheduled(
            request_id=saga["request_id"], account_id=row["account_id"], subscription_id=subscription_id,
            run_on=saga["run_on"], history=history, full=full,
            snapshot=repo.snapshot(after, effective_date=saga["effective_date"],
                                   access_end_date=saga["access_end_date"])))
        self.on_scheduled()

    async def start_scheduled(self, uow: UnitOfWork, request_id: str) -> bool:
        """Called by the scheduler when a scheduled cancellation's period has ended."""
        repo = BillingRepository(uow.db)
        saga = await repo.cancellation(request_id)
        if saga is None or saga["state"] != "scheduled":
            return False
        row = await repo.subscription(saga["subscription_id"])
        if row is None or row["provisioning_status"] == domain.IN_PROGRESS:
            return False  # something else holds the lock: next round
        await self._lock_and_ask_vendor(uow, repo, saga, row)
        return True

    async def _lock_and_ask_vendor(self, uow: UnitOfWork, repo: BillingRepository, saga: dict,
                                   row: dict) -> None:
        await repo.set_cancellation(saga["request_id"], state="awaiting_vendor", prior_status=row["status"],
                                    prior_provisioning_status=row["provisioning_status"])
        await repo.update_subscription(row["subscription_id"], provisioning_status=domain.IN_PROGRESS)
        uow.emit(VendorCancellationRequested(
            request_id=saga["request_id"], account_id=row["account_id"],
            subscription_id=row["subscription_id"], vendor=row["vendor"],
            vendor_subscription_id=row["vendor_subscription_id"], effective_date=saga["effective_date"],
            current_quantity=row["quantity"], new_quantity=saga["new_quantity"],
            retry_of=await self._vendor_done_by(repo, saga, row),
            snapshot=SubscriptionSnapshot(subscription_status=row["status"],
                                          provisioning_status=domain.IN_PROGRESS,
                                          effective_date=saga["effective_date"],
                                          access_end_date=saga["access_end_date"]),
        ))

    async def request_stuck(self, msg: Message, uow: UnitOfWork) -> None:
        """The status tracker set the request aside (no progress for too long). Its lock must not outlive
        it: were the subscription left `In Progress`, every later request for it would be rejected and
        support could do nothing. Billing unlocks it (statuses back to what they were) and says in the
        history that the vendor may have canceled and that canceling again is safe (the vendor counts
        "already canceled" as success)."""
        event: RequestStuck = msg.payload  # type: ignore[assignment]
        await self.release_lock(uow, str(event.request_id), why=f"set aside as stuck at the {event.stage} step")

    async def release_lock(self, uow: UnitOfWork, request_id: str, *, why: str) -> bool:
        """Unlock the subscription of a request that waits for the vendor's answer no more (its status
        set aside, or a lock left overdue: `locks.OverdueLocks`); False when it holds no lock."""
        repo = BillingRepository(uow.db)
        saga = await repo.cancellation(request_id)
        if saga is None or saga["state"] != "awaiting_vendor":
            return False  # not holding the lock: nothing of billing's to release
        await self._revert(repo, saga, domain.HISTORY_STUCK, RELEASED_STUCK)
        log.warning("lock released: the request waits for the vendor no more", request_id=request_id,
                    subscription_id=saga["subscription_id"], why=why)
        return True
    @staticmethod
    async def _vendor_done_by(repo: BillingRepository, saga: dict, row: dict) -> str | None:
        """The request this one retries, when its vendor step went through and our platform then failed
        (provisioning does not ask the vendor again for the same change); None otherwise, whatever
        `retry_of` a request claims."""
        retried = (saga.get("request") or {}).get("retry_of")
        earlier = await repo.cancellation(retried) if retried else None
        if earlier is None or earlier["state"] != "reverted_platform":
            return None
        return retried if earlier["subscription_id"] == row["subscription_id"] else None

    async def vendor_provisioned(self, msg: Message, uow: UnitOfWork) -> None:
        event: VendorProvisioned = msg.payload  # type: ignore[assignment]
        repo = BillingRepository(uow.db)
        saga = await repo.cancellation(str(event.request_id))
        if saga is None or saga["state"] not in ("awaiting_vendor", RELEASED_STUCK):
            return
        row = await repo.subscription(saga["subscription_id"])
        assert row is not None
        if saga["state"] == RELEASED_STUCK and _utc(row["updated_at"]) > _utc(saga["updated_at"]):
            # The vendor canceled after all, but the subscription changed since its lock was released
            # (another request took it, say): committing this one now could undo that. Support finishes it.
            await repo.add_history(row["subscription_id"], saga["request_id"], domain.HISTORY_LATE_VENDOR)
            return
        # Released and untouched since: the saga finishes after all, as it would have with the lock.
        # Disarmed outside the savepoint, so the injected fault fires once and stays spent.
        fault = await repo.take_fault(row["subscription_id"], "commit")
        try:
            async with uow.db.savepoint(PLATFORM_COMMIT):
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
            quantity_after=saga["new_quantity"], period_quantity=row["period_quantity"], currency=row["currency"],
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
        repo = BillingRepository(uow.db)
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


def _plan_columns(plan: domain.Plan) -> dict:
    return {"effective_date": plan.effective_date, "access_end_date": plan.access_end_date,
            "new_quantity": plan.new_quantity, "run_on": plan.run_on}


def _received(request: CancellationRequested) -> CancellationReceived:
    return CancellationReceived(
        request_id=request.request_id, account_id=request.account_id, target=request.target,
        subscription_id=request.subscription_id, charge_ids=request.charge_ids, mode=request.mode,
        effective_date=request.effective_date, quantity=request.quantity, requested_by=request.requested_by,
        reason=request.reason, requires_approval=request.requires_approval,
        opt_out_of_emails=request.opt_out_of_emails, retry_of=request.retry_of,
    )


def _utc(at: datetime) -> datetime:
    """A stored timestamp as an aware UTC one (SQLite gives them back without their zone)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
