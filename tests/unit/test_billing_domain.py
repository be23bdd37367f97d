"""billing.domain: the validation rules of CONTRACT.md section 5 and the seed's history texts."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from billing import domain
from billing.domain import Plan, Rejection, SubscriptionFacts, validate
from cancelflow.events import Mode, ValidationCode
from tests.factories import cancellation_requested as request

TODAY = date(2026, 11, 21)
PERIOD_START = date(2026, 11, 1)
PERIOD_END = date(2026, 12, 1)

# Seed 002, word for word.
SEED_VENDOR = ("Subscription failed to cancel due to Provisioning Error. "
               "Please try to cancel the subscription again.")
SEED_PLATFORM = ("The subscription cancellation process has encountered an error on our Platform. "
                 "Please contact your administrator")


def sub(**overrides: Any) -> SubscriptionFacts:
    values: dict[str, Any] = dict(
        subscription_id="sub-1", account_id="acc-1", status="active", provisioning_status="Synchronized",
        quantity=5, current_period_start=PERIOD_START, current_period_end=PERIOD_END,
    )
    values.update(overrides)
    return SubscriptionFacts(**values)


def rejected(verdict: Rejection | Plan, code: ValidationCode) -> Rejection:
    assert isinstance(verdict, Rejection), verdict
    assert verdict.code is code, verdict
    assert verdict.message
    return verdict


def accepted(verdict: Rejection | Plan) -> Plan:
    assert isinstance(verdict, Plan), verdict
    return verdict


# --- each validation code -------------------------------------------------------------------------


def test_unknown_subscription() -> None:
    rejected(validate(request(), None, TODAY), ValidationCode.unknown_subscription)


def test_not_owner() -> None:
    rejected(validate(request(account_id="acc-other"), sub(), TODAY), ValidationCode.not_owner)


@pytest.mark.parametrize("status", ["canceled", "suspended", "expired"])
def test_not_active(status: str) -> None:
    verdict = rejected(validate(request(), sub(status=status), TODAY), ValidationCode.not_active)
    assert status in verdict.message


def test_trial_is_accepted() -> None:
    plan = accepted(validate(request(), sub(status="trial"), TODAY))
    assert plan.full


def test_past_dated_without_date() -> None:
    rejected(validate(request(mode="past_dated"), sub(), TODAY), ValidationCode.invalid_effective_date)


def test_past_dated_in_the_future() -> None:
    verdict = validate(request(mode="past_dated", effective_date=TODAY + timedelta(days=1)), sub(), TODAY)
    rejected(verdict, ValidationCode.invalid_effective_date)


def test_past_dated_before_current_period_start() -> None:
    verdict = validate(request(mode="past_dated", effective_date=PERIOD_START - timedelta(days=1)), sub(), TODAY)
    rejected(verdict, ValidationCode.invalid_effective_date)


@pytest.mark.parametrize("quantity", [0, -1, 5, 6], ids=["zero", "negative", "equal", "above"])
def test_invalid_quantity(quantity: int) -> None:
    rejected(validate(request(quantity=quantity), sub(quantity=5), TODAY), ValidationCode.invalid_quantity)


def test_provisioning_in_progress() -> None:
    verdict = validate(request(), sub(provisioning_status=domain.IN_PROGRESS), TODAY)
    rejected(verdict, ValidationCode.provisioning_in_progress)


# --- the order that protects other accounts ---------------------------------------------------------


@pytest.mark.parametrize("facts", [
    sub(status="canceled"),
    sub(provisioning_status=domain.IN_PROGRESS),
    sub(status="canceled", provisioning_status=domain.IN_PROGRESS),
    sub(quantity=1),
], ids=["canceled", "in_progress", "canceled_in_progress", "one_license"])
def test_not_owner_reveals_nothing_about_the_subscription(facts: SubscriptionFacts) -> None:
    baseline = rejected(validate(request(account_id="acc-other"), sub(), TODAY), ValidationCode.not_owner)
    # Even a request that would fail other checks (bad date, bad quantity) learns only "not yours".
    for req in (request(account_id="acc-other"),
                request(account_id="acc-other", mode="past_dated", effective_date=TODAY + timedelta(days=3)),
                request(account_id="acc-other", quantity=9)):
        verdict = rejected(validate(req, facts, TODAY), ValidationCode.not_owner)
        assert verdict.message == baseline.message
        lowered = verdict.message.lower()
        for leak in ("canceled", "progress", "active", "trial", "quantity", "license", "period"):
            assert leak not in lowered


def test_not_active_comes_before_provisioning_in_progress() -> None:
    verdict = validate(request(), sub(status="canceled", provisioning_status=domain.IN_PROGRESS), TODAY)
    rejected(verdict, ValidationCode.not_active)


# --- accepted plans -------------------------------------------------------------------------------


def test_immediate_uses_today() -> None:
    plan = accepted(validate(request(mode="immediate"), sub(), TODAY))
    assert plan.effective_date == TODAY
    assert plan.access_end_date == TODAY
    assert plan.new_quantity == 0 and plan.full


def test_immediate_ignores_a_supplied_effective_date() -> None:
    plan = accepted(validate(request(mode="immediate", effective_date=PERIOD_START), sub(), TODAY))
    assert plan.effective_date == TODAY


@pytest.mark.parametrize("when", [TODAY, PERIOD_START, date(2026, 11, 10)], ids=["today", "period_start", "between"])
def test_past_dated_accepts_dates_in_range(when: date) -> None:
    plan = accepted(validate(request(mode="past_dated", effective_date=when), sub(), TODAY))
    assert plan.effective_date == when
    assert plan.access_end_date == when


def test_partial_plan_new_quantity() -> None:
    plan = accepted(validate(request(quantity=2), sub(quantity=5), TODAY))
    assert plan.new_quantity == 3
    assert not plan.full


def test_partial_removing_all_but_one() -> None:
    plan = accepted(validate(request(quantity=4), sub(quantity=5), TODAY))
    assert plan.new_quantity == 1


def test_end_of_term_is_effective_at_period_end() -> None:
    plan = accepted(validate(request(mode=Mode.end_of_term), sub(), TODAY))
    assert plan.effective_date == PERIOD_END
    assert plan.access_end_date == PERIOD_END


# --- history texts (seed 002) -----------------------------------------------------------------------


def test_committed_history_full() -> None:
    assert domain.committed_history(0, date(2026, 11, 21)) == "Status is set to canceled with effective date 2026-11-21"


def test_committed_history_partial_names_the_new_quantity() -> None:
    text = domain.committed_history(3, date(2026, 11, 21))
    assert "3" in text and "2026-11-21" in text
    assert "canceled" not in text


def test_vendor_and_platform_history_match_the_seed() -> None:
    assert domain.HISTORY_VENDOR_ERROR == SEED_VENDOR
    assert domain.HISTORY_PLATFORM_ERROR == SEED_PLATFORM
    assert domain.HISTORY_COMMITTED == "Status is set to {status} with effective date {effective_date}"


def test_vendor_error_history_starts_with_the_seed_and_carries_the_description() -> None:
    text = domain.vendor_error_history("Subscription is locked by another operation")
    assert text.startswith(SEED_VENDOR)
    assert text.endswith("Subscription is locked by another operation")
    assert domain.vendor_error_history("") == SEED_VENDOR
