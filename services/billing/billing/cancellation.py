"""A cancellation in billing and the subscription it changes: the saga's legal moves and the events each
records. Pure: handlers load it, call one transition, save it and emit what it recorded."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from billing import domain
from cancelflow.events import (
    ApprovalPending,
    CancellationReceived,
    CancellationRequested,
    CancellationScheduled,
    Failed,
    Mode,
    Payload,
    PlatformCommitted,
    RequestDeclined,
    Source,
    SubscriptionSnapshot,
    ValidationCode,
    VendorCancellationFailed,
    VendorCancellationRequested,
)


class State(StrEnum):
    """A cancellation's state, as stored in `cancellations.state`."""

    RECEIVED = "received"
    AWAITING_FACTS = "awaiting_facts"  # its subscription is not known yet: waits for the upstream facts
    ROUTED_TO_DISPUTE = "routed_to_dispute"
    REJECTED = "rejected"
    PENDING_APPROVAL = "pending_approval"
    DECLINED = "declined"
    SCHEDULED = "scheduled"  # end of term: waits for its run_on date
    AWAITING_VENDOR = "awaiting_vendor"  # holds the subscription's lock
    COMMITTED = "committed"
    REVERTED_VENDOR = "reverted_vendor"
    REVERTED_PLATFORM = "reverted_platform"
    RELEASED_STUCK = "released_stuck"  # set aside by the tracker while it held the lock: unlocked


_ACCEPTED = frozenset({State.REJECTED, State.PENDING_APPROVAL, State.SCHEDULED, State.AWAITING_VENDOR})
LEGAL: dict[State, frozenset[State]] = {
    State.RECEIVED: _ACCEPTED | {State.ROUTED_TO_DISPUTE, State.AWAITING_FACTS},
    State.AWAITING_FACTS: _ACCEPTED,
    State.PENDING_APPROVAL: frozenset({State.DECLINED, State.REJECTED, State.SCHEDULED, State.AWAITING_VENDOR}),
    State.SCHEDULED: frozenset({State.AWAITING_VENDOR}),
    State.AWAITING_VENDOR: frozenset({State.COMMITTED, State.REVERTED_VENDOR, State.REVERTED_PLATFORM,
                                      State.RELEASED_STUCK}),
    State.RELEASED_STUCK: frozenset({State.COMMITTED, State.REVERTED_PLATFORM}),
}

# Another request for the subscription in one of these holds its lock (`BillingRepository.in_flight`).
HOLDS_LOCK = (State.SCHEDULED, State.AWAITING_VENDOR)


class IllegalTransition(Exception):
    """A transition the cancellation's state does not allow (a bug in the caller, not bad input)."""


@dataclass
class Subscription:
    """The subscription's row as a cancellation reads it; `changes` holds the columns it set."""

    subscription_id: str
    account_id: str
    vendor: str
    vendor_subscription_id: str
    unit_price: Decimal
    currency: str
    quantity: int
    period_quantity: int | None
    status: str
    trial: bool
    provisioning_status: str
    current_period_start: date
    current_period_end: date
    auto_renew: bool
    effective_date: date | None
    updated_at: datetime
    changes: dict[str, object] = field(default_factory=dict)
    renewals_canceled: bool = False  # its scheduled renewals are to be canceled
    renewals_repriced: Decimal | None = None  # what its scheduled renewals are to bill from now on

    @property
    def locked(self) -> bool:
        return self.provisioning_status == domain.IN_PROGRESS

    def facts(self) -> domain.SubscriptionFacts:
        return domain.SubscriptionFacts(
            subscription_id=self.subscription_id, account_id=self.account_id, status=self.status,
            provisioning_status=self.provisioning_status, quantity=self.quantity,
            current_period_start=self.current_period_start, current_period_end=self.current_period_end)

    def snapshot(self, *, effective_date: date | None = None,
                 access_end_date: date | None = None) -> SubscriptionSnapshot:
        return SubscriptionSnapshot(subscription_status=self.status, provisioning_status=self.provisioning_status,
                                    effective_date=effective_date or self.effective_date,
                                    access_end_date=access_end_date)

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            setattr(self, name, value)
        self.changes.update(values)


@dataclass
class Cancellation:
    """One request's cancellation as billing runs it. Transitions check the state, change it and the
    subscription, and record in `events` and `history` what the handler emits and the repository adds."""

    request_id: str
    account_id: str
    mode: Mode
    state: State
    subscription_id: str | None = None
    request: CancellationRequested | None = None  # as received; None once rejected
    plan: domain.Plan | None = None
    decided_by: str | None = None
    prior_status: str | None = None  # the subscription's statuses before the lock, restored on a revert
    prior_provisioning_status: str | None = None
    created_at: datetime | None = None  # None: not stored yet
    updated_at: datetime | None = None
    subscription: Subscription | None = None
    events: list[Payload] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # records for the subscription's history
    changes: set[str] = field(default_factory=set)  # the stored columns the transitions set

    @classmethod
    def receive(cls, request: CancellationRequested) -> Cancellation:
        """A request seen for the first time: billing tells that it has it, whatever comes next."""
        cancellation = cls(request_id=str(request.request_id), account_id=request.account_id,
                           mode=request.mode, state=State.RECEIVED, subscription_id=request.subscription_id,
                           request=request)
        cancellation.events.append(received(request))
        return cancellation

    def copy(self) -> Cancellation:
        """An independent copy, to try a transition on (its request and plan are shared: never changed)."""
        subscription = self.subscription and replace(self.subscription, changes=dict(self.subscription.changes))
        return replace(self, subscription=subscription, events=list(self.events), history=list(self.history),
                       changes=set(self.changes))

    @property
    def is_new(self) -> bool:
        return self.created_at is None

    @property
    def full(self) -> bool:
        return self._plan.new_quantity == 0

    @property
    def changed_since_released(self) -> bool:
        """Released as stuck, and its subscription changed since (another request took it, say)."""
        return (self.state is State.RELEASED_STUCK and self.updated_at is not None
                and self._subscription.updated_at > self.updated_at)

    # --- intake -----------------------------------------------------------------------------------

    def route_to_dispute(self) -> None:
        """Duplicate-charge disputes belong to the dispute service, which owns the case from here."""
        self._move(State.ROUTED_TO_DISPUTE)
        self._set(subscription_id=None, request=None)

    def await_facts(self) -> None:
        self._move(State.AWAITING_FACTS)

    def take_in(self, verdict: domain.Rejection | domain.Plan, subscription: Subscription | None, *,
                today: date, retried: Cancellation | None = None) -> None:
        """The request validated (`verdict`): rejected, parked for approval, or on its way."""
        self._require(State.RECEIVED, State.AWAITING_FACTS)
        request = self._request
        if isinstance(verdict, domain.Rejection):
            self._reject(verdict, subscription)
            return
        assert subscription is not None, "a plan is made for a known subscription"
        self.subscription = subscription
        self._set(subscription_id=subscription.subscription_id, plan=verdict)
        if request.requires_approval:
            self._move(State.PENDING_APPROVAL)
            self.events.append(ApprovalPending(request_id=request.request_id,
                                               subscription_id=subscription.subscription_id,
                                               snapshot=subscription.snapshot()))
            return
        self.proceed(today, retried=retried)

    # --- operator decisions -----------------------------------------------------------------------

    def decline(self, decided_by: str, note: str) -> None:
        self._move(State.DECLINED)
        self._set(decided_by=decided_by)
        self.events.append(RequestDeclined(request_id=uuid.UUID(self.request_id),
                                           subscription_id=self.subscription_id, decided_by=decided_by, note=note))

    def approve(self, decided_by: str, verdict: domain.Rejection | domain.Plan, subscription: Subscription | None,
                *, today: date, retried: Cancellation | None = None) -> None:
        """`verdict`: the request validated again (the world may have moved on while it waited)."""
        self._require(State.PENDING_APPROVAL)
        self._set(decided_by=decided_by)
        if isinstance(verdict, domain.Rejection):
            self._reject(verdict, subscription, keep_request=True)
            return
        assert subscription is not None, "a plan is made for a known subscription"
        self.subscription = subscription
        self._set(plan=verdict)
        self.proceed(today, retried=retried)

    # --- scheduling and the vendor step -----------------------------------------------------------

    def proceed(self, today: date, *, retried: Cancellation | None = None) -> None:
        """End of term with the date ahead: scheduled; otherwise the vendor step starts now."""
        if self.mode is Mode.end_of_term and self._plan.run_on is not None and self._plan.run_on > today:
            self.schedule()
        else:
            self.lock(retried=retried)

    def schedule(self) -> None:
        """End of term, full: auto-renew stops now (billing here, the gateway's schedule via the event).
        Partial: nothing stops; the subscription renews with the licenses left (`commit` reprices)."""
        plan, subscription = self._plan, self._subscription
        if plan.run_on is None:
            raise IllegalTransition(f"cancellation {self.request_id}: only an end-of-term plan is scheduled")
        self._move(State.SCHEDULED)
        if self.full:
            history = domain.HISTORY_SCHEDULED.format(effective_date=plan.run_on.isoformat())
            subscription._set(auto_renew=False)
            subscription.renewals_canceled = True
        else:
            history = domain.HISTORY_SCHEDULED_PARTIAL.format(quantity=plan.new_quantity,
                                                              effective_date=plan.run_on.isoformat())
        self.history.append(history)
        self.events.append(CancellationScheduled(
            request_id=uuid.UUID(self.request_id), account_id=subscription.account_id,
            subscription_id=subscription.subscription_id, run_on=plan.run_on, history=history, full=self.full,
            snapshot=subscription.snapshot(effective_date=plan.effective_date,
                                           access_end_date=plan.access_end_date)))

    def lock(self, *, retried: Cancellation | None = None) -> None:
        """Lock the subscription (provisioning `In Progress`) and ask provisioning to go to the vendor.
        `retried`: the request this one's `retry_of` names, when there is one."""
        plan, subscription = self._plan, self._subscription
        self._move(State.AWAITING_VENDOR)
        self._set(prior_status=subscription.status, prior_provisioning_status=subscription.provisioning_status)
        subscription._set(provisioning_status=domain.IN_PROGRESS)
        self.events.append(VendorCancellationRequested(
            request_id=uuid.UUID(self.request_id), account_id=subscription.account_id,
            subscription_id=subscription.subscription_id, vendor=subscription.vendor,
            vendor_subscription_id=subscription.vendor_subscription_id, effective_date=plan.effective_date,
            current_quantity=subscription.quantity, new_quantity=plan.new_quantity,
            retry_of=self._vendor_done_by(retried),
            snapshot=SubscriptionSnapshot(subscription_status=subscription.status,
                                          provisioning_status=domain.IN_PROGRESS,
                                          effective_date=plan.effective_date,
                                          access_end_date=plan.access_end_date)))

    def _vendor_done_by(self, retried: Cancellation | None) -> uuid.UUID | None:
        """The request this one retries, when its vendor step went through and our platform then failed
        (provisioning does not ask the vendor again for the same change); None otherwise, whatever
        `retry_of` a request claims."""
        retry_of = self.request.retry_of if self.request is not None else None
        if retry_of is None or retried is None or retried.request_id != str(retry_of):
            return None
        if retried.state is not State.REVERTED_PLATFORM or retried.subscription_id != self.subscription_id:
            return None
        return retry_of

    # --- the vendor's answer ----------------------------------------------------------------------

    def note_late_vendor(self) -> None:
        """The vendor canceled after the lock was released and the subscription changed since: committing
        now could undo that change, so support finishes it."""
        if not self.changed_since_released:
            raise IllegalTransition(f"{self.request_id}: no late vendor answer to note in state {self.state}")
        self.history.append(domain.HISTORY_LATE_VENDOR)

    def commit(self) -> None:
        """The vendor canceled: the platform follows (released and untouched since: as with the lock)."""
        if self.changed_since_released:
            raise IllegalTransition(f"{self.request_id}: its subscription changed since its lock was released")
        plan, subscription = self._plan, self._subscription
        self._move(State.COMMITTED)
        before = subscription.quantity
        if self.full:
            subscription._set(status=domain.CANCELED, effective_date=plan.effective_date, auto_renew=False,
                              provisioning_status=domain.SYNCHRONIZED)
            subscription.renewals_canceled = True
        else:
            subscription._set(quantity=plan.new_quantity, effective_date=plan.effective_date,
                              provisioning_status=domain.SYNCHRONIZED)
            subscription.renewals_repriced = subscription.unit_price * plan.new_quantity
        history = domain.committed_history(plan.new_quantity, plan.effective_date)
        self.history.append(history)
        self.events.append(PlatformCommitted(
            request_id=uuid.UUID(self.request_id), account_id=subscription.account_id,
            subscription_id=subscription.subscription_id, mode=self.mode, full=self.full, trial=subscription.trial,
            effective_date=plan.effective_date, access_end_date=plan.access_end_date,
            period_start=subscription.current_period_start, period_end=subscription.current_period_end,
            quantity_before=before, quantity_after=plan.new_quantity,
            period_quantity=subscription.period_quantity, currency=subscription.currency,
            refund_due=not subscription.trial and self.mode is not Mode.end_of_term, history=history,
            snapshot=subscription.snapshot(access_end_date=plan.access_end_date)))

    def revert_platform(self, error: Exception) -> None:
        """The vendor canceled but our platform could not commit (scenario 3): unlocked, support told."""
        plan, subscription = self._plan, self._subscription
        self._revert(State.REVERTED_PLATFORM, domain.HISTORY_PLATFORM_ERROR)
        self.events.append(Failed(
            request_id=uuid.UUID(self.request_id), source=Source.platform, code="platform_commit_failed",
            message=domain.HISTORY_PLATFORM_ERROR, retryable=False, history=domain.HISTORY_PLATFORM_ERROR,
            snapshot=subscription.snapshot(),
            details={
                "account_id": subscription.account_id, "subscription_id": subscription.subscription_id,
                "vendor": subscription.vendor, "vendor_subscription_id": subscription.vendor_subscription_id,
                "vendor_state": "canceled at the vendor", "requested_effective_date": str(plan.effective_date),
                "new_quantity": plan.new_quantity, "platform_error": str(error),
            }))

    def revert_vendor(self, failure: VendorCancellationFailed) -> None:
        history = domain.vendor_error_history(failure.message)
        self._revert(State.REVERTED_VENDOR, history)
        self.events.append(Failed(
            request_id=failure.request_id, source=Source.vendor, code=failure.code, message=failure.message,
            retryable=True, history=history, snapshot=self._subscription.snapshot(),
            details={"vendor": failure.vendor, "vendor_subscription_id": failure.vendor_subscription_id,
                     "http_status": failure.http_status, "attempts": failure.attempts}))

    def release(self) -> None:
        """Set aside as stuck while it held the lock: the lock must not outlive it (the history says
        that the vendor may have canceled and that canceling again is safe)."""
        self._revert(State.RELEASED_STUCK, domain.HISTORY_STUCK)

    # --- helpers ----------------------------------------------------------------------------------

    def _revert(self, to: State, history: str) -> None:
        self._check(to)
        subscription = self._subscription
        assert self.prior_status is not None and self.prior_provisioning_status is not None
        self._move(to)
        subscription._set(status=self.prior_status, provisioning_status=self.prior_provisioning_status)
        self.history.append(history)

    def _reject(self, rejection: domain.Rejection, subscription: Subscription | None, *,
                keep_request: bool = False) -> None:
        request = self._request
        self._move(State.REJECTED)
        if not keep_request:
            self._set(request=None)
        owner = subscription is not None and subscription.account_id == request.account_id
        self.events.append(Failed(
            request_id=request.request_id, source=Source.validation, code=rejection.code.value,
            message=rejection.message, retryable=rejection.code is ValidationCode.provisioning_in_progress,
            snapshot=subscription.snapshot() if owner and subscription is not None else None))

    def _move(self, to: State) -> None:
        self._check(to)
        self._set(state=to)

    def _check(self, to: State) -> None:
        if to not in LEGAL.get(self.state, frozenset()):
            raise IllegalTransition(f"cancellation {self.request_id}: {self.state} -> {to} is not a legal move")
        if self.state is State.PENDING_APPROVAL and to in HOLDS_LOCK and self.decided_by is None:
            raise IllegalTransition(f"cancellation {self.request_id}: waits for an operator's approval")

    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise IllegalTransition(f"cancellation {self.request_id}: not possible in state {self.state}")

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            setattr(self, name, value)
        self.changes.update(values)

    @property
    def _request(self) -> CancellationRequested:
        if self.request is None:
            raise IllegalTransition(f"cancellation {self.request_id}: no request kept in state {self.state}")
        return self.request

    @property
    def _plan(self) -> domain.Plan:
        if self.plan is None:
            raise IllegalTransition(f"cancellation {self.request_id}: no plan in state {self.state}")
        return self.plan

    @property
    def _subscription(self) -> Subscription:
        if self.subscription is None:
            raise IllegalTransition(f"cancellation {self.request_id}: no subscription in state {self.state}")
        return self.subscription


def received(request: CancellationRequested) -> CancellationReceived:
    """What the tracker starts the request's view from: the request as billing took it."""
    return CancellationReceived(
        request_id=request.request_id, account_id=request.account_id, target=request.target,
        subscription_id=request.subscription_id, charge_ids=request.charge_ids, mode=request.mode,
        effective_date=request.effective_date, quantity=request.quantity, requested_by=request.requested_by,
        reason=request.reason, requires_approval=request.requires_approval,
        opt_out_of_emails=request.opt_out_of_emails, retry_of=request.retry_of,
    )
