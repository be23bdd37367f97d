"""Folding saga events into a request's view (CONTRACT.md section 6). Pure: no I/O.

`apply(view, event, at)` returns the new view, or None when the event changes nothing. A terminal
state is never left: later events (emails) only add history. One exception to "only history": a request
the stuck timer set aside (`manual_review`, code `timeout`) was never stopped, so what its steps do
afterwards still shows in its fields, and its outcome resolves the case (`resolution` by the system).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from cancelflow import timeline
from cancelflow.events import (
    TERMINAL_STATES,
    ApprovalPending,
    AutoRenewStopped,
    CancellationReceived,
    CancellationScheduled,
    DisputeStepRecorded,
    EmailSent,
    Failed,
    OperatorActed,
    Payload,
    PlatformCommitted,
    RefundIssued,
    RefundRetryRequested,
    RequestDeclined,
    RequestStuck,
    SagaEvent,
    Source,
    State,
    SubscriptionSnapshot,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
)

View = dict[str, Any]

STUCK_CODE = "timeout"  # the error code of a request the stuck timer set aside

LEGAL: dict[State, frozenset[State]] = {
    State.received: frozenset({State.pending_approval, State.in_progress, State.scheduled, State.rejected,
                               State.declined, State.manual_review}),
    State.pending_approval: frozenset({State.in_progress, State.scheduled, State.declined, State.rejected}),
    State.scheduled: frozenset({State.in_progress, State.failed, State.manual_review}),
    State.in_progress: frozenset({State.completed, State.failed, State.manual_review}),
}

FAILED_STATE = {
    Source.validation: State.rejected,
    Source.vendor: State.failed,
    Source.platform: State.failed,
    Source.payment: State.manual_review,
}


def empty_view(request_id: str) -> View:
    return {
        "request_id": request_id, "account_id": None, "target": None, "subscription_id": None,
        "charge_ids": [], "mode": None, "state": None, "stage": None, "subscription_status": None,
        "provisioning_status": None, "effective_date": None, "access_end_date": None, "refund": None,
        "error": None, "history": [], "retry_of": None, "resolution": None,
    }


def is_legal(before: State | None, after: State) -> bool:
    if before is None:
        return after in (State.received, State.rejected)
    return before == after or after in LEGAL.get(before, frozenset())


def apply(view: View, event: Payload, at: datetime) -> View | None:
    if is_set_aside(view):
        return _work_went_on(view, event, at)
    new = {**view, "history": list(view["history"])}
    handler = _HANDLERS.get(type(event)) if isinstance(event, SagaEvent) else None
    if handler is None:
        return None
    handler(new, event, at)
    before = State(view["state"]) if view["state"] else None
    after = State(new["state"]) if new["state"] else None
    if before is None and after is None:
        return None  # a step of a request whose first record we never saw: no status to speak of
    opens = before is None and isinstance(event, RefundRetryRequested)  # a request born in progress
    if after is None or before in TERMINAL_STATES or not (opens or is_legal(before, after)):
        # Never leave a terminal state (nor change its stage, snapshot, refund or error), never jump
        # illegally: keep only the history the event adds, and what an operator did about it.
        new = {**view, "history": new["history"], "resolution": new.get("resolution")}
    return None if new == view else new


def is_set_aside(view: View) -> bool:
    """Set aside by the stuck timer and not resolved since: its services may still finish it."""
    error = view["error"] or {}
    return (view["state"] == State.manual_review.value and error.get("code") == STUCK_CODE
            and not view.get("resolution"))


def _work_went_on(view: View, event: Payload, at: datetime) -> View | None:
    """Fold `event` as if the timer had not spoken (from the state it found), keep `manual_review` (a
    terminal state is never left, CONTRACT.md section 6) and let the fields tell what happened. An
    outcome other than a failed refund resolves the case: nobody should act on it by hand any more."""
    if isinstance(event, RequestStuck):
        return None  # set aside once is enough
    found = State.received if view["stage"] == Source.validation.value else State.in_progress
    shadow = apply({**view, "state": found.value}, event, at)
    if shadow is None:
        return None
    outcome = State(shadow["state"])
    if outcome not in TERMINAL_STATES:
        return {**shadow, "state": view["state"], "error": view["error"]}
    if outcome is State.manual_review:  # a refund refused after all: still support's, for that reason now
        return shadow
    note = _resolved_note(outcome, shadow)
    resolution = {"by": "system", "at": at.isoformat(), "action": outcome.value, "note": note}
    resolved = {**shadow, "state": view["state"], "resolution": resolution}
    _say(resolved, at, f"Resolved by the system: {note}")
    return resolved


def _resolved_note(outcome: State, view: View) -> str:
    if outcome is not State.completed:
        error = view["error"]
        reason = f" ({error['source']} error: {error['message']})" if error else ""
        return f"the request ended {outcome.value} after it was set aside for manual review{reason}"
    refund = view["refund"]
    if refund is None or refund["status"] == "not_due":
        money = "no refund was due"
    else:
        status = "" if refund["status"] == "succeeded" else f" ({refund['status'].replace('_', ' ')})"
        money = f"{refund['amount']} {refund['currency']} refunded{status}"
    return (f"the cancellation completed after it was set aside for manual review; {money}; "
            "nothing to do by hand")


def _say(view: View, at: datetime, message: str) -> None:
    view["history"].append({"at": at.isoformat(), "message": message})


def _tell(view: View, event: Payload, at: datetime) -> None:
    """The lines the event adds to the timeline (cancelflow.timeline, as notification's alerts say them)."""
    for message in timeline.lines(event):
        _say(view, at, message)


def _snapshot(view: View, snapshot: SubscriptionSnapshot | None) -> None:
    if snapshot is None:
        return
    view["subscription_status"] = snapshot.subscription_status
    view["provisioning_status"] = snapshot.provisioning_status
    if snapshot.effective_date is not None:
        view["effective_date"] = snapshot.effective_date.isoformat()
    if snapshot.access_end_date is not None:
        view["access_end_date"] = snapshot.access_end_date.isoformat()


def _received(view: View, e: CancellationReceived, at: datetime) -> None:
    view.update(account_id=e.account_id, target=e.target, subscription_id=e.subscription_id,
                charge_ids=list(e.charge_ids), mode=e.mode.value,
                retry_of=str(e.retry_of) if e.retry_of else None)
    if view["state"] is None:
        view.update(state=State.received.value, stage=Source.validation.value)
        _tell(view, e, at)


def _pending(view: View, e: ApprovalPending, at: datetime) -> None:
    view.update(state=State.pending_approval.value, stage=Source.validation.value)
    _snapshot(view, e.snapshot)
    _tell(view, e, at)


def _declined(view: View, e: RequestDeclined, at: datetime) -> None:
    view.update(state=State.declined.value, stage=None)
    _tell(view, e, at)


def _scheduled(view: View, e: CancellationScheduled, at: datetime) -> None:
    view.update(state=State.scheduled.value, stage=None)
    _snapshot(view, e.snapshot)
    _tell(view, e, at)


def _vendor_requested(view: View, e: VendorCancellationRequested, at: datetime) -> None:
    view.update(state=State.in_progress.value, stage=Source.vendor.value)
    _snapshot(view, e.snapshot)
    _tell(view, e, at)


def _vendor_provisioned(view: View, e: VendorProvisioned, at: datetime) -> None:
    view.update(stage=Source.platform.value)
    _tell(view, e, at)


def _committed(view: View, e: PlatformCommitted, at: datetime) -> None:
    view.update(stage=Source.payment.value)
    _snapshot(view, e.snapshot)
    _tell(view, e, at)


def _refund(view: View, e: RefundIssued, at: datetime) -> None:
    view.update(state=State.completed.value, stage=Source.notification.value, error=None,
                refund={"amount": f"{e.amount:.2f}", "currency": e.currency, "status": e.status})
    _tell(view, e, at)


def _failed(view: View, e: Failed, at: datetime) -> None:
    if e.source is Source.notification:
        _tell(view, e, at)
        return
    if e.source is Source.validation and e.details.get("dead_lettered") and view["state"] is not None:
        # A bad record naming a request already under way (a garbled copy of the request, an approval that
        # could not be read) was set aside: the request itself goes on, and says so. (A step's own record
        # that could not be handled fails the request at its step: source vendor, platform, payment.)
        _say(view, at, timeline.set_aside(e))
        return
    view.update(state=FAILED_STATE[e.source].value, stage=e.source.value,
                error={"source": e.source.value, "code": e.code, "message": e.message})
    _snapshot(view, e.snapshot)
    if FAILED_STATE[e.source] is not State.manual_review:
        # Rejected or failed: the cancellation did not take effect, so no date of it stands (the
        # subscription is as it was). A payment failure comes after the commit: its dates did.
        view.update(effective_date=None, access_end_date=None)
    if e.source is Source.payment:
        refunds = e.details.get("refunds") or []
        if refunds:  # all issued when it was auto-renew that the gateway would not stop
            total = sum((Decimal(r["amount"]) for r in refunds), Decimal("0"))
            issued = all(r.get("outcome") == "succeeded" for r in refunds)
            view["refund"] = {"amount": f"{total:.2f}", "currency": refunds[0]["currency"],
                              "status": "succeeded" if issued else "failed"}
    _tell(view, e, at)


def _stuck(view: View, e: RequestStuck, at: datetime) -> None:
    """No progress for too long (the tracker's own timer): support takes it from here. Said once: a
    request already terminal is left alone."""
    if view["state"] is None or State(view["state"]) in TERMINAL_STATES:
        return
    stage = e.stage if e.stage in Source.__members__ else None
    source = stage or Source.platform.value
    message = timeline.stuck(stage, e.stuck_for_seconds)
    view.update(state=State.manual_review.value, stage=stage or view["stage"],
                error={"source": source, "code": STUCK_CODE, "message": message})
    _say(view, at, message)


def _dispute_step(view: View, e: DisputeStepRecorded, at: datetime) -> None:
    """An audit step of a charges dispute: a history line; validation moves it on to the money step,
    and each refund the gateway issued adds to the refund shown (a mixed outcome keeps it)."""
    if e.step == "validated" and view["state"] == State.received.value:
        view.update(state=State.in_progress.value, stage=Source.payment.value)
    if e.step == "refund_issued" and e.data.get("amount") is not None:
        before = view["refund"] or {}
        total = Decimal(before.get("amount") or "0") + Decimal(str(e.data["amount"]))
        view["refund"] = {"amount": f"{total:.2f}", "currency": e.data.get("currency") or before.get("currency"),
                          "status": "succeeded"}
    _tell(view, e, at)


def _operator_acted(view: View, e: OperatorActed, at: datetime) -> None:
    """CONTRACT.md section 11: `<Action> by <name>: <note>`; a finished request keeps its state and
    gains `resolution` (the work the action causes runs as its own request)."""
    _tell(view, e, at)
    if view["state"] is not None and State(view["state"]) in TERMINAL_STATES:
        view["resolution"] = {"by": e.operator, "at": at.isoformat(), "action": e.action, "note": e.note,
                              "request_id": str(e.new_request_id) if e.new_request_id else None}


def _refund_retry(view: View, e: RefundRetryRequested, at: datetime) -> None:
    """The request an operator's `retry_refund` starts: it goes straight to the money step."""
    if view["state"] is not None:
        return
    view.update(account_id=e.account_id, target="subscription" if e.subscription_id else None,
                subscription_id=e.subscription_id, state=State.in_progress.value, stage=Source.payment.value,
                retry_of=str(e.retry_of))
    _tell(view, e, at)


_HANDLERS: dict[type[SagaEvent], Callable[[View, Any, datetime], None]] = {
    CancellationReceived: _received,
    ApprovalPending: _pending,
    RequestDeclined: _declined,
    CancellationScheduled: _scheduled,
    AutoRenewStopped: _tell,
    VendorCancellationRequested: _vendor_requested,
    VendorProvisioned: _vendor_provisioned,
    VendorCancellationFailed: _tell,
    PlatformCommitted: _committed,
    RefundIssued: _refund,
    Failed: _failed,
    EmailSent: _tell,
    DisputeStepRecorded: _dispute_step,
    RequestStuck: _stuck,
    OperatorActed: _operator_acted,
    RefundRetryRequested: _refund_retry,
}
SAGA_EVENTS: list[type[SagaEvent]] = list(_HANDLERS)
SAGA_EVENT_TYPES = [cls.event_type for cls in SAGA_EVENTS]
