"""dispute.domain: which listed charges are duplicates, which are not and why, and what the gateway's
view of a duplicate allows (CONTRACT.md section 5, "Charges")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from cancelflow.contract import GuardCode, dispute_refund_key
from cancelflow.events import ChargeVerification, ValidationCode
from dispute.domain import (
    Charge,
    Reason,
    confirm,
    detect,
    human_delta,
    refund_failure_reason,
    unique,
    validate,
)

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
WINDOW = timedelta(hours=72)


def charge(charge_id: str, hours: float, amount: str = "30.00", *, currency: str = "USD", account: str = "acc-1",
           subscription: str = "sub-1") -> Charge:
    return Charge(charge_id=charge_id, account_id=account, subscription_id=subscription,
                  gateway_charge_id=f"gw-{charge_id}", amount=Decimal(amount), currency=currency,
                  captured_at=T0 + timedelta(hours=hours))


def verdicts(listed: list[Charge], everything: list[Charge], window: timedelta = WINDOW) -> dict[str, Reason]:
    return {f.charge.charge_id: f.reason for f in detect(listed, everything, window)}


# --- validation ------------------------------------------------------------------------------------


def test_every_listed_charge_of_the_account_is_valid():
    a, b = charge("a", 0), charge("b", 1)
    assert validate("acc-1", ["a", "b"], {"a": a, "b": b}) is None


def test_unknown_charge_is_rejected_first():
    other = charge("x", 0, account="acc-2")
    rejection = validate("acc-1", ["x", "missing"], {"x": other})
    assert rejection is not None
    assert rejection.code is ValidationCode.unknown_charge and rejection.charge_ids == ("missing",)


def test_another_accounts_charge_is_not_owner_and_says_nothing_about_it():
    mine, theirs = charge("a", 0), charge("x", 1, amount="99.00", account="acc-2")
    rejection = validate("acc-1", ["a", "x"], {"a": mine, "x": theirs})
    assert rejection is not None
    assert rejection.code is ValidationCode.not_owner and rejection.charge_ids == ("x",)
    assert "99" not in rejection.message and "acc-2" not in rejection.message


def test_listed_ids_are_taken_once_in_order():
    assert unique(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


# --- detection -------------------------------------------------------------------------------------


def test_two_identical_charges_within_the_window_the_later_is_the_duplicate():
    a, b = charge("a", 0), charge("b", 1)
    findings = detect([b], [a, b], WINDOW)
    assert [f.reason for f in findings] == [Reason.duplicate]
    assert findings[0].duplicate and findings[0].related == a
    assert "duplicate of a" in findings[0].detail and "1 h later" in findings[0].detail


def test_triple_charge_two_duplicates_of_the_first():
    a, b, c = charge("a", 0), charge("b", 0.5), charge("c", 2)
    findings = detect([b, c], [a, b, c], WINDOW)
    assert [(f.reason, f.related.charge_id if f.related else None) for f in findings] == [
        (Reason.duplicate, "a"), (Reason.duplicate, "a")]


def test_the_earliest_of_a_group_is_never_a_duplicate():
    a, b = charge("a", 0), charge("b", 1)
    assert verdicts([a, b], [a, b]) == {"a": Reason.earliest_of_group, "b": Reason.duplicate}
    (finding,) = detect([a], [a, b], WINDOW)
    assert finding.related == b and "kept as the legitimate payment" in finding.detail


def test_outside_the_window_is_not_a_duplicate():
    a, b = charge("a", 0), charge("b", 73)
    (finding,) = detect([b], [a, b], WINDOW)
    assert finding.reason is Reason.outside_window and finding.related == a
    assert "3 d 1 h" in finding.detail and "72 h" in finding.detail


def test_exactly_at_the_window_edge_is_still_a_duplicate():
    a, b = charge("a", 0), charge("b", 72)
    assert verdicts([b], [a, b]) == {"b": Reason.duplicate}


def test_the_window_comes_from_the_setting():
    a, b = charge("a", 0), charge("b", 5)
    assert verdicts([b], [a, b], timedelta(hours=4)) == {"b": Reason.outside_window}
    assert verdicts([b], [a, b], timedelta(hours=6)) == {"b": Reason.duplicate}


def test_a_chain_within_the_window_counts_from_the_previous_capture():
    # c is 80 h after a (outside) but 40 h after b (inside): b is an earlier identical charge within the window.
    a, b, c = charge("a", 0), charge("b", 40), charge("c", 80)
    assert verdicts([b, c], [a, b, c]) == {"b": Reason.duplicate, "c": Reason.duplicate}


def test_renewal_a_month_later_with_a_duplicate_right_after_it():
    # Last month's charge is far outside the window; this month's first charge is the group's earliest.
    previous, renewal, copy = charge("p", -24 * 30), charge("r", 0), charge("c", 0.2)
    assert verdicts([renewal, copy], [previous, renewal, copy]) == {
        "r": Reason.earliest_of_group, "c": Reason.duplicate}


@pytest.mark.parametrize(("other", "reason"), [
    (dict(amount="35.00"), Reason.different_amount),
    (dict(currency="EUR"), Reason.different_amount),
])
def test_different_amount_or_currency_is_not_a_duplicate(other, reason):
    a, b = charge("a", 0), charge("b", 1, **other)
    (finding,) = detect([b], [a, b], WINDOW)
    assert finding.reason is reason and finding.related == a
    assert "30.00 USD" in finding.detail


def test_other_subscription_or_account_never_makes_a_duplicate():
    a = charge("a", 0, subscription="sub-2")
    b = charge("b", 1)
    c = charge("c", 0.5, account="acc-2")
    assert verdicts([b], [a, b, c]) == {"b": Reason.no_matching_charge}


def test_same_instant_the_charge_id_decides_the_order():
    a, b = charge("a", 0), charge("b", 0)
    assert verdicts([a, b], [a, b]) == {"a": Reason.earliest_of_group, "b": Reason.duplicate}


def test_human_delta():
    assert human_delta(timedelta(minutes=45)) == "45 min"
    assert human_delta(timedelta(hours=2)) == "2 h"
    assert human_delta(timedelta(hours=3, minutes=5)) == "3 h 5 min"
    assert human_delta(timedelta(days=4, hours=2, minutes=9)) == "4 d 2 h"
    assert human_delta(timedelta(0)) == "0 s"


# --- the gateway's view ----------------------------------------------------------------------------


def seen(**values) -> ChargeVerification:  # type: ignore[no-untyped-def]
    base = dict(charge_id="b", gateway_charge_id="gw-b", found=True, state="captured", amount="30.00",
                currency="USD", refunded="0.00", refundable="30.00", guard_refundable="30.00")
    return ChargeVerification(**{**base, **values})


@pytest.mark.parametrize("state", ["captured", "settled"])
def test_captured_or_settled_duplicate_is_confirmed(state):
    verdict = confirm(charge("b", 1), seen(state=state))
    assert verdict.ok and verdict.reason is None


@pytest.mark.parametrize(("values", "reason"), [
    (dict(state="refunded", refundable="0.00", refunded="30.00"), Reason.already_refunded),
    (dict(state="partially_refunded", refundable="20.00", refunded="10.00"), Reason.already_refunded),
    (dict(state="disputed", refundable="0.00"), Reason.disputed),
    (dict(found=False, state=None, error="the gateway has no such charge"), Reason.unknown_at_gateway),
    (dict(amount="31.00"), Reason.gateway_mismatch),
    (dict(refundable="29.99"), Reason.already_refunded),
    # Refunded (or being refunded) by a cancellation: the refund guard has less left than the charge.
    (dict(guard_refundable="10.00"), Reason.already_refunded),
])
def test_what_the_gateway_says_can_send_a_duplicate_to_review(values, reason):
    verdict = confirm(charge("b", 1), seen(**values))
    assert not verdict.ok and verdict.reason is reason


def test_refund_keys_agree_between_dispute_and_payment_gateway():
    # One builder in cancelflow.contract serves both services.
    assert dispute_refund_key("r-1", "ch-2") == "cf-dispute-r-1-ch-2"
    assert dispute_refund_key("r-1", "ch-2") != dispute_refund_key("r-1", "ch-3")


def test_refund_failures_read_as_already_refunded_only_when_the_guard_refused():
    assert refund_failure_reason(f"{GuardCode.insufficient_refundable_balance}: 0.00 USD left") is Reason.already_refunded
    assert refund_failure_reason("charge_disputed: The charge is disputed") is Reason.refund_refused
    assert refund_failure_reason(None) is Reason.refund_refused
