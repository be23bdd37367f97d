"""The lines a request's timeline gets for its saga steps: the tracker's status history and the
timeline in notification's support alerts say the same thing, from here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cancelflow import durations
from cancelflow import events as ev

AUTO_RENEW_STOPPED = "Auto-renew stopped at the payment gateway"
ACTION_NAMES = {"approve": "Approved", "decline": "Declined", "retry": "Retried",
                "retry_refund": "Refund retried", "close": "Closed"}


def lines(event: ev.Payload) -> list[str]:
    """What `event` adds to its request's timeline ([] for a step that adds nothing)."""
    said = _SAY.get(type(event))
    return said(event) if said is not None else []


def _received(e: ev.CancellationReceived) -> list[str]:
    who = f"{e.requested_by.role} {e.requested_by.user_id} via {e.requested_by.channel}"
    what = "charges " + ", ".join(e.charge_ids) if e.target == "charges" else f"subscription {e.subscription_id}"
    return [f"Cancellation of {what} ({e.mode.value}) requested by {who}"]


def _vendor_requested(e: ev.VendorCancellationRequested) -> list[str]:
    asked = (f"reduce {e.vendor_subscription_id} to {e.new_quantity} licenses" if e.new_quantity
             else f"cancel {e.vendor_subscription_id}")
    return [f"Provisioning status is set to In Progress; vendor {e.vendor} asked to {asked}"]


def _vendor_provisioned(e: ev.VendorProvisioned) -> list[str]:
    detail = " (it was already canceled there)" if e.already_applied else ""
    action = "the cancellation" if e.new_quantity == 0 else f"the reduction to {e.new_quantity} licenses"
    return [f"Vendor {e.vendor} confirmed {action}{detail}"]


def _refund(e: ev.RefundIssued) -> list[str]:
    said = [AUTO_RENEW_STOPPED] if e.auto_renew_stopped else []
    said += [f"Refund of {line.amount:.2f} {line.currency} issued to charge {line.charge_id} ({line.kind or 'refund'})"
             for line in e.lines]
    return said + (["No refund is due"] if e.status == "not_due" else [])


def _failed(e: ev.Failed) -> list[str]:
    if e.source is ev.Source.notification:
        return [f"Notification problem: {e.message}"]
    return [e.history or f"{e.source.value} error ({e.code}): {e.message}"]


def set_aside(e: ev.Failed) -> str:
    """A bad record naming a request already under way was set aside (the request goes on)."""
    return f"A record for this request was set aside ({e.details['dead_lettered']}): {e.message}"


def stuck(stage: str | None, seconds: float) -> str:
    at_step = f" at the {stage} step" if stage else ""
    return f"No progress{at_step} for {durations.text(seconds)}; set aside for manual review and support alerted"


def _operator_acted(e: ev.OperatorActed) -> list[str]:
    said = f"{ACTION_NAMES[e.action]} by {e.operator}" + (f": {e.note}" if e.note else "")
    return [said + (f" (new request {e.new_request_id})" if e.new_request_id is not None else "")]


_SAY: dict[type[Any], Callable[[Any], list[str]]] = {
    ev.CancellationReceived: _received,
    ev.ApprovalPending: lambda e: ["Waiting for an operator to approve the cancellation"],
    ev.RequestDeclined: lambda e: [f"Declined by {e.decided_by}" + (f": {e.note}" if e.note else "")],
    ev.CancellationScheduled: lambda e: [e.history or f"Cancellation scheduled for {e.run_on.isoformat()}"],
    ev.AutoRenewStopped: lambda e: [AUTO_RENEW_STOPPED],
    ev.VendorCancellationRequested: _vendor_requested,
    ev.VendorProvisioned: _vendor_provisioned,
    ev.VendorCancellationFailed: lambda e: [f"Vendor {e.vendor} error: {e.message}"],
    ev.PlatformCommitted: lambda e: [e.history],
    ev.RefundIssued: _refund,
    ev.Failed: _failed,
    ev.EmailSent: lambda e: [f"Email \"{e.subject}\" sent to {'the customer' if e.audience == 'customer' else 'support'}"],
    ev.DisputeStepRecorded: lambda e: [e.message],
    ev.OperatorActed: _operator_acted,
    ev.RefundRetryRequested: lambda e: [f"Refund of request {e.retry_of} retried by operator {e.operator}"
                                     + (f": {e.note}" if e.note else "")],
}
