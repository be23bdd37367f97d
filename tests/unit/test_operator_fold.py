"""What operators' actions do to a request's view (CONTRACT.md section 11): history lines, `resolution`
on a finished request (whose state stays), `retry_of`, and the refund retry's own request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from cancelflow.events import (
    CancellationReceived,
    CancellationStatusChanged,
    Failed,
    OperatorActed,
    RefundIssued,
    RefundRetryRequested,
    Source,
)
from status_tracker.fold import apply, empty_view

RID, NEW = uuid.uuid4(), uuid.uuid4()
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _view(state: str, **more: object) -> dict:
    return {**empty_view(str(RID)), "account_id": "acc-1", "target": "subscription", "subscription_id": "sub-1",
            "mode": "immediate", "state": state, "stage": "platform", **more}


def test_an_action_on_a_finished_request_keeps_its_state_and_sets_its_resolution() -> None:
    error = {"source": "platform", "code": "platform_commit_failed", "message": "boom"}
    before = _view("failed", error=error)
    after = apply(before, OperatorActed(request_id=RID, action="retry", operator="alice", note="platform fixed",
                                        new_request_id=NEW), T0)
    assert after is not None
    assert (after["state"], after["stage"], after["error"]) == ("failed", "platform", error)
    assert after["history"][-1]["message"] == f"Retried by alice: platform fixed (new request {NEW})"
    assert after["resolution"] == {"by": "alice", "at": T0.isoformat(), "action": "retry", "note": "platform fixed",
                                   "request_id": str(NEW)}
    # The status record carries it as the contract says.
    record = CancellationStatusChanged.model_validate({**after, "version": 2, "updated_at": T0})
    assert record.resolution is not None and record.resolution.request_id == NEW


def test_closing_a_manual_review_is_recorded_only() -> None:
    after = apply(_view("manual_review"), OperatorActed(request_id=RID, action="close", operator="bob",
                                                        note="refunded by hand"), T0)
    assert after is not None and after["state"] == "manual_review"
    assert after["history"][-1]["message"] == "Closed by bob: refunded by hand"
    assert after["resolution"]["action"] == "close" and after["resolution"]["request_id"] is None


def test_approving_adds_history_but_no_resolution() -> None:
    after = apply(_view("pending_approval"), OperatorActed(request_id=RID, action="approve", operator="alice"), T0)
    assert after is not None and after["state"] == "pending_approval"
    assert after["history"][-1]["message"] == "Approved by alice"
    assert after["resolution"] is None


def test_a_retry_says_which_request_it_repeats() -> None:
    received = CancellationReceived(request_id=NEW, account_id="acc-1", target="subscription", subscription_id="sub-1",
                                    mode="immediate", retry_of=RID,
                                    requested_by={"user_id": "alice", "role": "operator", "channel": "bss"})
    view = apply(empty_view(str(NEW)), received, T0)
    assert view is not None and view["retry_of"] == str(RID) and view["state"] == "received"
    assert "requested by operator alice via bss" in view["history"][0]["message"]


def test_a_refund_retry_is_a_request_of_its_own_that_ends_like_a_money_step() -> None:
    retry = RefundRetryRequested(request_id=NEW, retry_of=RID, account_id="acc-1", subscription_id="sub-1",
                                 operator="alice", note="new card")
    started = apply(empty_view(str(NEW)), retry, T0)
    assert started is not None
    assert (started["state"], started["stage"], started["retry_of"]) == ("in_progress", "payment", str(RID))
    issued = RefundIssued(request_id=NEW, subscription_id="sub-1", amount=Decimal("20.00"), currency="USD",
                          status="succeeded")
    done = apply(started, issued, T0 + timedelta(seconds=1))
    assert done is not None and done["state"] == "completed" and done["refund"]["amount"] == "20.00"
    refused = Failed(request_id=NEW, source=Source.payment, code="refund_failed", message="refused again")
    review = apply(started, refused, T0 + timedelta(seconds=1))
    assert review is not None and review["state"] == "manual_review"
    # Only a refund retry opens a request in progress: another step of an unseen request shows nothing.
    assert apply(empty_view(str(NEW)), issued, T0) is None
