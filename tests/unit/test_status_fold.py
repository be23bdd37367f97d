"""status_tracker.fold: saga events folded into the support view of CONTRACT.md section 6."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cancelflow.events import (
    TERMINAL_STATES,
    ApprovalPending,
    CancellationReceived,
    EmailSent,
    Failed,
    Payload,
    PlatformCommitted,
    RefundIssued,
    RefundLine,
    RequestStuck,
    Source,
    State,
    SubscriptionSnapshot,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
)
from status_tracker.fold import apply, empty_view, is_legal

RID = uuid.UUID("4c1f0e7a-0000-4000-8000-000000000001")
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
EFFECTIVE = date(2026, 11, 21)
SEED_VENDOR = ("Subscription failed to cancel due to Provisioning Error. "
               "Please try to cancel the subscription again.")
SEED_PLATFORM = ("The subscription cancellation process has encountered an error on our Platform. "
                 "Please contact your administrator")
COMMITTED = "Status is set to canceled with effective date 2026-11-21"


def received() -> CancellationReceived:
    return CancellationReceived(
        request_id=RID, account_id="acc-1", target="subscription", subscription_id="sub-1", mode="immediate",
        requested_by={"user_id": "u-1", "role": "customer", "channel": "storefront"})


def vendor_requested() -> VendorCancellationRequested:
    return VendorCancellationRequested(
        request_id=RID, account_id="acc-1", subscription_id="sub-1", vendor="acme", vendor_subscription_id="V-1",
        effective_date=EFFECTIVE, current_quantity=1, new_quantity=0,
        snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="In Progress",
                                      effective_date=EFFECTIVE, access_end_date=EFFECTIVE))


def provisioned() -> VendorProvisioned:
    return VendorProvisioned(request_id=RID, subscription_id="sub-1", vendor="acme",
                             vendor_subscription_id="V-1", new_quantity=0)


def vendor_failed(message: str = "Subscription is locked") -> VendorCancellationFailed:
    return VendorCancellationFailed(request_id=RID, subscription_id="sub-1", vendor="acme",
                                    vendor_subscription_id="V-1", code="vendor_rejected", message=message,
                                    http_status=409, retryable=False)


def committed() -> PlatformCommitted:
    return PlatformCommitted(
        request_id=RID, account_id="acc-1", subscription_id="sub-1", mode="immediate", full=True, trial=False,
        effective_date=EFFECTIVE, access_end_date=EFFECTIVE, period_start=date(2026, 11, 1),
        period_end=date(2026, 12, 1), quantity_before=1, quantity_after=0, currency="USD", refund_due=True,
        history=COMMITTED,
        snapshot=SubscriptionSnapshot(subscription_status="canceled", provisioning_status="Synchronized",
                                      effective_date=EFFECTIVE, access_end_date=EFFECTIVE))


def refunded() -> RefundIssued:
    line = RefundLine(charge_id="c1", gateway_charge_id="gw-1", amount="16.65", currency="USD",
                      idempotency_key="cf-refund-x-c1", kind="refund", outcome="succeeded", refund_id="re_1")
    return RefundIssued(request_id=RID, subscription_id="sub-1", amount="16.65", currency="USD",
                        status="succeeded", lines=[line], auto_renew_stopped=True)


def stuck(stage: str = "vendor") -> RequestStuck:
    return RequestStuck(request_id=RID, stage=stage, since=T0, stuck_for_seconds=700)


def email() -> EmailSent:
    return EmailSent(request_id=RID, kind="completed", audience="customer",
                     subject="Subscription Cancellation Request Completed", message_id="<m1@cancelflow>")


def failed(source: Source, **extra: Any) -> Failed:
    values: dict[str, Any] = dict(request_id=RID, source=source, code=f"{source.value}_error",
                                  message=f"{source.value} went wrong")
    values.update(extra)
    return Failed(**values)


def fold(*events: Payload) -> list[dict[str, Any]]:
    """Every intermediate view; an event that changes nothing repeats the previous view."""
    view = empty_view(str(RID))
    views = []
    for i, event in enumerate(events):
        new = apply(view, event, T0 + timedelta(seconds=i))
        view = new if new is not None else view
        views.append(view)
    return views


def messages(view: dict[str, Any]) -> list[str]:
    return [h["message"] for h in view["history"]]


# --- the success path -------------------------------------------------------------------------------


def test_success_sequence_states_and_stages() -> None:
    views = fold(received(), vendor_requested(), provisioned(), committed(), refunded(), email())
    assert [(v["state"], v["stage"]) for v in views] == [
        ("received", "validation"),
        ("in_progress", "vendor"),
        ("in_progress", "platform"),
        ("in_progress", "payment"),
        ("completed", "notification"),
        ("completed", "notification"),
    ]
    # Each step adds history; the email only adds history.
    lengths = [len(v["history"]) for v in views]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    final = views[-1]
    assert final["error"] is None
    assert final["refund"] == {"amount": "16.65", "currency": "USD", "status": "succeeded"}
    assert final["subscription_status"] == "canceled"
    assert final["provisioning_status"] == "Synchronized"
    assert final["effective_date"] == "2026-11-21"
    assert final["account_id"] == "acc-1" and final["subscription_id"] == "sub-1" and final["mode"] == "immediate"
    assert COMMITTED in messages(final)
    assert any("Subscription Cancellation Request Completed" in m for m in messages(final))
    assert all(h["at"].endswith("+00:00") for h in final["history"])


def test_in_progress_snapshot_is_taken_from_the_vendor_request() -> None:
    view = fold(received(), vendor_requested())[-1]
    assert view["provisioning_status"] == "In Progress"
    assert view["subscription_status"] == "active"


def test_not_due_refund_completes_and_says_so() -> None:
    not_due = RefundIssued(request_id=RID, subscription_id="sub-1", amount="0.00", currency="USD", status="not_due")
    view = fold(received(), vendor_requested(), provisioned(), committed(), not_due)[-1]
    assert view["state"] == "completed"
    assert view["refund"] == {"amount": "0.00", "currency": "USD", "status": "not_due"}
    assert "No refund is due" in messages(view)


# --- failures ---------------------------------------------------------------------------------------


def test_vendor_failure() -> None:
    history = f"{SEED_VENDOR} Vendor error: Subscription is locked"
    fail = failed(Source.vendor, code="vendor_rejected", message="Subscription is locked", history=history,
                  snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="Synchronized"))
    views = fold(received(), vendor_requested(), vendor_failed(), fail)
    assert views[2]["state"] == "in_progress"  # the vendor's answer alone does not end the request
    view = views[-1]
    assert view["state"] == "failed"
    assert view["stage"] == "vendor"
    assert view["error"] == {"source": "vendor", "code": "vendor_rejected", "message": "Subscription is locked"}
    assert messages(view)[-1] == history
    assert messages(view)[-1].startswith(SEED_VENDOR)
    assert view["subscription_status"] == "active"
    assert view["provisioning_status"] == "Synchronized"


def test_platform_failure() -> None:
    fail = failed(Source.platform, code="platform_commit_failed", message=SEED_PLATFORM, history=SEED_PLATFORM)
    view = fold(received(), vendor_requested(), provisioned(), fail)[-1]
    assert view["state"] == "failed"
    assert view["error"]["source"] == "platform"
    assert view["stage"] == "platform"
    assert messages(view)[-1] == SEED_PLATFORM


def test_payment_failure_is_manual_review() -> None:
    line = {"charge_id": "c1", "amount": "16.65", "currency": "USD", "outcome": "failed"}
    fail = failed(Source.payment, code="refund_failed", details={"refunds": [line]})
    view = fold(received(), vendor_requested(), provisioned(), committed(), fail)[-1]
    assert view["state"] == "manual_review"
    assert view["error"]["source"] == "payment"
    assert view["refund"] == {"amount": "16.65", "currency": "USD", "status": "failed"}
    # The cancellation itself stays committed.
    assert view["subscription_status"] == "canceled"


ACTIVE = SubscriptionSnapshot(subscription_status="active", provisioning_status="Synchronized")


@pytest.mark.parametrize("steps", [
    pytest.param(lambda: [received(), vendor_requested(), vendor_failed(),
                          failed(Source.vendor, snapshot=ACTIVE)], id="vendor"),
    pytest.param(lambda: [received(), vendor_requested(), provisioned(),
                          failed(Source.platform, snapshot=ACTIVE)], id="platform"),
    # A rejection's snapshot is the subscription as it is, which may carry an earlier cancellation's date.
    pytest.param(lambda: [received(), failed(Source.validation, code="provisioning_in_progress", snapshot=(
        ACTIVE.model_copy(update={"effective_date": EFFECTIVE, "provisioning_status": "In Progress"})))],
        id="rejected"),
])
def test_dates_that_did_not_take_effect_are_null(steps) -> None:  # type: ignore[no-untyped-def]
    view = fold(*steps())[-1]
    assert view["state"] in {"failed", "rejected"} and view["subscription_status"] == "active"
    assert view["effective_date"] is None and view["access_end_date"] is None


def test_a_payment_failure_keeps_the_dates_of_the_committed_cancellation() -> None:
    view = fold(received(), vendor_requested(), provisioned(), committed(), failed(Source.payment))[-1]
    assert view["state"] == "manual_review"
    assert view["effective_date"] == view["access_end_date"] == EFFECTIVE.isoformat()


def test_validation_failure_is_rejected() -> None:
    fail = failed(Source.validation, code="not_owner", message="The subscription does not belong to this account.")
    view = fold(received(), fail)[-1]
    assert view["state"] == "rejected"
    assert view["error"] == {"source": "validation", "code": "not_owner",
                             "message": "The subscription does not belong to this account."}


def test_rejection_without_received_first() -> None:
    # A dead-lettered request only ever gets a Failed(validation).
    view = fold(failed(Source.validation, code="bad_input"))[-1]
    assert view["state"] == "rejected"


@pytest.mark.parametrize("before", ["received", "pending_approval"])
def test_a_dead_lettered_record_of_a_request_under_way_does_not_end_it(before: str) -> None:
    """A garbled copy of the request, or an approval that could not be read, is set aside: billing never
    saw it, and the request goes on (it was marked rejected, and then completed under that state)."""
    bad = failed(Source.validation, code="bad_input", message="invalid_payload: payload.account_id: Field required",
                 details={"dead_lettered": "cancellations.requested:0:17"})
    steps: list[Payload] = [received()]
    if before == "pending_approval":
        steps.append(ApprovalPending(request_id=RID, subscription_id="sub-1", snapshot=SubscriptionSnapshot(
            subscription_status="active", provisioning_status="Synchronized")))
    views = fold(*steps, bad, vendor_requested(), provisioned(), committed(), refunded())
    assert views[len(steps)]["state"] == before
    assert messages(views[len(steps)])[-1] == ("A record for this request was set aside "
                                                "(cancellations.requested:0:17): invalid_payload: "
                                                "payload.account_id: Field required")
    assert views[-1]["state"] == "completed" and views[-1]["error"] is None


def test_a_step_that_could_not_handle_its_record_still_fails_the_request() -> None:
    step = failed(Source.vendor, code="internal_error", message="provisioning could not handle it",
                  details={"dead_lettered": "cancellations.saga:1:40"})
    view = fold(received(), vendor_requested(), step)[-1]
    assert view["state"] == "failed" and view["error"]["source"] == "vendor"


def test_a_refused_auto_renew_stop_keeps_the_refund_issued() -> None:
    line = {"charge_id": "c1", "amount": "10.00", "currency": "USD", "outcome": "succeeded"}
    view = fold(received(), vendor_requested(), provisioned(), committed(),
                failed(Source.payment, code="auto_renew_stop_failed", details={"refunds": [line]}))[-1]
    assert view["state"] == "manual_review"
    assert view["refund"] == {"amount": "10.00", "currency": "USD", "status": "succeeded"}


def test_notification_failure_only_adds_history() -> None:
    views = fold(received(), vendor_requested(), provisioned(), committed(), refunded(),
                 failed(Source.notification, message="SMTP down"))
    assert views[-1]["state"] == "completed"
    assert views[-1]["error"] is None
    assert "Notification problem: SMTP down" in messages(views[-1])


# --- terminal states are never left --------------------------------------------------------------------


@pytest.mark.parametrize("late", [vendor_requested, provisioned, committed, refunded,
                                  lambda: failed(Source.vendor), lambda: failed(Source.payment)],
                         ids=["vendor_requested", "provisioned", "committed", "refunded", "failed_vendor",
                              "failed_payment"])
def test_completed_is_never_left(late: Any) -> None:
    done = fold(received(), vendor_requested(), provisioned(), committed(), refunded())[-1]
    after = apply(done, late(), T0 + timedelta(minutes=5))
    if after is None:
        return
    for key in done:
        if key != "history":
            assert after[key] == done[key], key
    assert after["history"][:len(done["history"])] == done["history"]


def test_email_after_completed_adds_history_only() -> None:
    done = fold(received(), vendor_requested(), provisioned(), committed(), refunded())[-1]
    after = apply(done, email(), T0 + timedelta(minutes=5))
    assert after is not None
    assert after["state"] == "completed"
    assert len(after["history"]) == len(done["history"]) + 1


def test_failed_is_never_left_by_a_late_success() -> None:
    fail = failed(Source.vendor, history=SEED_VENDOR)
    views = fold(received(), vendor_requested(), fail, provisioned(), committed(), refunded())
    ended, view = views[2], views[-1]
    assert view["state"] == "failed"
    assert view["error"]["source"] == "vendor"
    assert view["refund"] is None
    # Nothing but history moves once the request ended: not the stage, not the subscription's statuses.
    assert view["stage"] == ended["stage"] == "vendor"
    assert view["subscription_status"] == ended["subscription_status"] == "active"
    assert view["provisioning_status"] == ended["provisioning_status"]
    assert len(view["history"]) > len(ended["history"])


def test_rejected_is_never_left() -> None:
    view = fold(received(), failed(Source.validation, code="provisioning_in_progress"), vendor_requested())[-1]
    assert view["state"] == "rejected"
    assert view["stage"] == "validation"


# --- set aside by the stuck timer, and the work went on ---------------------------------------------


def test_a_request_set_aside_that_completes_after_all_shows_it_and_is_resolved_by_the_system() -> None:
    views = fold(received(), vendor_requested(), stuck(), provisioned(), committed(), refunded(), email())
    aside, going_on, done = views[2], views[4], views[-1]
    assert (aside["state"], aside["error"]["code"]) == ("manual_review", "timeout")
    # On its way: the state stays (terminal), the fields move, the timeout stays until the outcome.
    assert (going_on["state"], going_on["stage"], going_on["error"]) == ("manual_review", "payment", aside["error"])
    assert going_on["subscription_status"] == "canceled" and going_on.get("resolution") is None
    # Completed after all: the refund, the subscription's state and the resolution, by the system.
    assert done["state"] == "manual_review"  # CONTRACT.md section 6: one terminal state, never left
    assert done["refund"] == {"amount": "16.65", "currency": "USD", "status": "succeeded"}
    assert (done["subscription_status"], done["provisioning_status"]) == ("canceled", "Synchronized")
    assert (done["stage"], done["error"]) == ("notification", None)
    assert {k: done["resolution"][k] for k in ("by", "action")} == {"by": "system", "action": "completed"}
    assert "16.65 USD refunded" in done["resolution"]["note"]
    resolved = "Resolved by the system: the cancellation completed after it was set aside for manual review"
    assert any(m.startswith(resolved) for m in messages(done))
    assert messages(done)[-1].startswith("Email ")  # the email after it: history only


def test_a_request_set_aside_that_fails_at_the_vendor_after_all_is_resolved_as_failed() -> None:
    fail = failed(Source.vendor, code="vendor_rejected", message="Subscription is locked", history=SEED_VENDOR,
                  snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="Synchronized"))
    view = fold(received(), vendor_requested(), stuck(), vendor_failed(), fail)[-1]
    assert view["state"] == "manual_review"
    assert view["error"] == {"source": "vendor", "code": "vendor_rejected", "message": "Subscription is locked"}
    assert view["provisioning_status"] == "Synchronized" and view["refund"] is None
    assert (view["resolution"]["by"], view["resolution"]["action"]) == ("system", "failed")


def test_a_request_set_aside_whose_refund_is_refused_stays_supports_for_that_reason() -> None:
    line = {"charge_id": "c1", "amount": "16.65", "currency": "USD", "outcome": "failed"}
    view = fold(received(), vendor_requested(), stuck(), provisioned(), committed(),
                failed(Source.payment, code="refund_failed", details={"refunds": [line]}))[-1]
    assert view["state"] == "manual_review" and view.get("resolution") is None
    assert view["error"]["source"] == "payment" and view["refund"]["status"] == "failed"


def test_a_request_set_aside_at_validation_goes_on_from_received() -> None:
    views = fold(received(), stuck("validation"), vendor_requested(), provisioned(), committed(), refunded())
    assert views[2]["stage"] == "vendor" and views[2]["provisioning_status"] == "In Progress"
    assert views[-1]["resolution"]["action"] == "completed"


def test_a_resolved_request_is_not_resolved_again() -> None:
    done = fold(received(), vendor_requested(), stuck(), provisioned(), committed(), refunded())[-1]
    for late in (refunded(), stuck(), failed(Source.vendor)):
        after = apply(done, late, T0 + timedelta(minutes=5))
        assert after is None or {k: v for k, v in after.items() if k != "history"} == {
            k: v for k, v in done.items() if k != "history"}
    assert apply(fold(received(), vendor_requested(), stuck())[-1], stuck(), T0 + timedelta(minutes=5)) is None


@settings(max_examples=200, deadline=None)
@given(at=st.integers(min_value=1, max_value=4), again=st.lists(st.integers(min_value=0, max_value=6), max_size=4))
def test_wherever_the_timer_speaks_the_fields_end_as_without_it(at: int, again: list[int]) -> None:
    """The timer setting a request aside anywhere before its outcome, events redelivered anywhere: the
    refund, subscription and provisioning status, dates and stage end as on the plain success path;
    the state is the first terminal one; and the case is resolved by the system exactly once."""
    plain = [received(), vendor_requested(), provisioned(), committed(), refunded(), email()]
    events: list[Payload] = [*plain[:at], stuck("validation" if at == 1 else "vendor"), *plain[at:]]
    for i in sorted(again, reverse=True):
        events.insert(i + 1, events[i])  # a redelivered copy right after the original
    views = fold(*events)
    done, expected = views[-1], fold(*plain)[-1]
    for key in ("refund", "subscription_status", "provisioning_status", "effective_date", "access_end_date",
                "stage", "error"):
        assert done[key] == expected[key], key
    first_terminal = next(v["state"] for v in views if State(v["state"]) in TERMINAL_STATES)
    assert first_terminal == done["state"] == "manual_review"
    assert done["resolution"]["action"] == "completed"
    assert sum(m.startswith("Resolved by the system") for m in messages(done)) == 1


def test_a_manual_review_of_a_refused_refund_is_not_reopened_by_a_late_refund() -> None:
    fail = failed(Source.payment, code="refund_failed", details={})
    view = fold(received(), vendor_requested(), provisioned(), committed(), fail, refunded())[-1]
    assert view["refund"] is None and view.get("resolution") is None and view["error"]["source"] == "payment"


# --- events that change nothing ----------------------------------------------------------------------


def test_repeated_received_returns_none() -> None:
    view = fold(received())[-1]
    assert apply(view, received(), T0 + timedelta(seconds=30)) is None


def test_unknown_payload_returns_none() -> None:
    from cancelflow.events import CancellationApproved

    view = fold(received())[-1]
    assert apply(view, CancellationApproved(request_id=RID, decided_by="op-1"), T0) is None


def test_apply_does_not_mutate_its_input() -> None:
    view = fold(received())[-1]
    snapshot = {**view, "history": list(view["history"])}
    apply(view, vendor_requested(), T0 + timedelta(seconds=1))
    assert view == snapshot


# --- the transition table ----------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "after", "legal"), [
    (None, State.received, True),
    (None, State.rejected, True),
    (None, State.in_progress, False),
    (None, State.completed, False),
    (State.received, State.in_progress, True),
    (State.received, State.rejected, True),
    (State.received, State.pending_approval, True),
    (State.received, State.scheduled, True),
    (State.received, State.completed, False),
    (State.received, State.failed, False),
    (State.pending_approval, State.in_progress, True),
    (State.pending_approval, State.declined, True),
    (State.pending_approval, State.completed, False),
    (State.scheduled, State.in_progress, True),
    (State.scheduled, State.completed, False),
    (State.in_progress, State.in_progress, True),
    (State.in_progress, State.completed, True),
    (State.in_progress, State.failed, True),
    (State.in_progress, State.manual_review, True),
    (State.in_progress, State.received, False),
    (State.in_progress, State.rejected, False),
    (State.completed, State.completed, True),
    (State.completed, State.failed, False),
    (State.completed, State.in_progress, False),
    (State.failed, State.completed, False),
    (State.rejected, State.in_progress, False),
    (State.manual_review, State.completed, False),
    (State.declined, State.in_progress, False),
])
def test_is_legal(before: State | None, after: State, legal: bool) -> None:
    assert is_legal(before, after) is legal


def test_every_terminal_state_has_no_way_out() -> None:
    from cancelflow.events import TERMINAL_STATES

    for terminal in TERMINAL_STATES:
        for other in State:
            assert is_legal(terminal, other) is (other == terminal)


def test_refund_amount_keeps_two_places() -> None:
    whole = RefundIssued(request_id=RID, subscription_id="sub-1", amount=Decimal("20"), currency="USD",
                         status="succeeded")
    view = fold(received(), vendor_requested(), provisioned(), committed(), whole)[-1]
    assert view["refund"]["amount"] == "20.00"
