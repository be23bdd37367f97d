"""payment_gateway.domain: the refund per charge of CONTRACT.md section 5, and refund keys."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cancelflow.contract import cancellation_refund_key as refund_key
from payment_gateway.domain import ChargeTerms, EarlierRefunds, fair_share, unused_days

START = date(2026, 11, 1)
END = date(2026, 12, 1)  # 30 days


def refund(paid: str, effective: date, *, start: date = START, end: date = END,
           removed: int = 1, quantity: int = 1) -> Decimal:
    terms = ChargeTerms(Decimal(paid), quantity, (end - start).days)
    return fair_share(terms, EarlierRefunds(), removed=removed, unused=unused_days(start, end, effective)).amount


def test_full_period_unused_refunds_everything() -> None:
    assert refund("49.95", START) == Decimal("49.95")


def test_effective_at_period_end_refunds_nothing() -> None:
    assert refund("49.95", END) == Decimal("0.00")


def test_effective_after_period_end_clamps_to_zero() -> None:
    assert refund("49.95", END + timedelta(days=10)) == Decimal("0.00")


def test_effective_before_period_start_clamps_to_period_days() -> None:
    assert refund("49.95", START - timedelta(days=10)) == Decimal("49.95")


def test_part_of_the_period() -> None:
    # 30.00 * 20 / 30 = 20.00
    assert refund("30.00", START + timedelta(days=10)) == Decimal("20.00")
    # 100.00 * 19 / 30 = 63.333... -> 63.33
    assert refund("100.00", date(2026, 11, 12)) == Decimal("63.33")


def test_partial_licenses_removed_over_licenses_paid() -> None:
    # 100.00 for 4 licenses, 1 removed, whole period unused: 25.00
    assert refund("100.00", START, removed=1, quantity=4) == Decimal("25.00")
    # 100.00 * 15/30 * 3/4 = 37.50
    assert refund("100.00", START + timedelta(days=15), removed=3, quantity=4) == Decimal("37.50")


def test_full_cancellation_is_removed_equals_licenses_paid() -> None:
    assert refund("90.00", START + timedelta(days=10), removed=3, quantity=3) == Decimal("60.00")


def two_day_period(paid: str, *, removed: int = 1, quantity: int = 1) -> Decimal:
    start = date(2026, 11, 1)
    # One of two days unused: exactly half of paid.
    return refund(paid, start + timedelta(days=1), start=start, end=start + timedelta(days=2),
                  removed=removed, quantity=quantity)


def test_half_even_rounds_a_trailing_five_down_to_even() -> None:
    # exact 5.005: half-even gives 5.00, half-up would give 5.01
    assert two_day_period("10.01") == Decimal("5.00")


def test_half_even_rounds_a_trailing_five_up_to_even() -> None:
    # exact 5.015: half-even gives 5.02 (2 is even), half-down would give 5.01
    assert two_day_period("10.03") == Decimal("5.02")


@pytest.mark.parametrize(("paid", "expected"), [("0.05", "0.02"), ("0.07", "0.04"), ("0.09", "0.04")])
def test_half_even_through_the_license_share(paid: str, expected: str) -> None:
    # paid * 2/2 days * 1/2 licenses: exact x.xx5 values
    start = date(2026, 11, 1)
    got = refund(paid, start, start=start, end=start + timedelta(days=2), removed=1, quantity=2)
    assert got == Decimal(expected)


def test_zero_paid_refunds_nothing() -> None:
    assert refund("0.00", START) == Decimal("0.00")


def test_result_is_a_two_place_decimal() -> None:
    got = refund("100.00", date(2026, 11, 12))
    assert type(got) is Decimal
    assert got.as_tuple().exponent == -2
    zero = refund("0.00", START)
    assert type(zero) is Decimal and zero.as_tuple().exponent == -2


def test_float_money_is_refused() -> None:
    with pytest.raises(TypeError):
        fair_share(ChargeTerms(10.01, 1, 30), EarlierRefunds(), removed=1, unused=30)  # type: ignore[arg-type]


# --- steps: licenses removed in several requests ----------------------------------------------------


def in_steps(paid: str, licenses_paid: int, steps: list[tuple[int, int]], period_days: int = 30) -> list[Decimal]:
    """Each step (licenses removed, days unused) refunded in turn, as payment-gateway counts earlier ones."""
    terms = ChargeTerms(Decimal(paid), licenses_paid, period_days)
    earlier = EarlierRefunds()
    amounts = []
    for removed, unused in steps:
        share = fair_share(terms, earlier, removed=removed, unused=unused)
        amounts.append(share.amount)
        earlier = EarlierRefunds(earlier.licenses + share.licenses, earlier.license_days + share.licenses * unused,
                                 earlier.amount + share.amount)
    return amounts


def test_ten_licenses_removed_one_by_one_refund_what_one_request_would() -> None:
    # 300.00 for 10 licenses, a third of the period used: nine requests of one, then the rest.
    steps = in_steps("300.00", 10, [(1, 20)] * 9 + [(1, 20)])
    assert steps == [Decimal("20.00")] * 10
    assert sum(steps) == Decimal("200.00")  # the formula on what each had left refunded 276.14


def test_two_then_the_rest_of_five() -> None:
    assert sum(in_steps("150.00", 5, [(2, 20), (3, 20)])) == Decimal("100.00")  # not 113.33


def test_one_at_a_time_out_of_a_hundred() -> None:
    assert sum(in_steps("3000.00", 100, [(1, 20)] * 100)) == Decimal("2000.00")  # not 2,948.08


def test_licenses_refunded_never_exceed_licenses_paid() -> None:
    # An upstream refresh brought 2 removed licenses back: removing 4 of "5" refunds the 3 still paid for.
    steps = in_steps("150.00", 5, [(2, 20), (4, 20), (1, 20)])
    assert steps == [Decimal("40.00"), Decimal("60.00"), Decimal("0.00")]


def test_the_rounding_of_earlier_steps_is_carried() -> None:
    # 2.00 for 3 licenses, 25 of 30 days unused: one license is 0.5555... Rounded step by step the three
    # would refund 1.68, a cent more than one request removing them all (1.67).
    steps = in_steps("2.00", 3, [(1, 25)] * 3)
    assert sum(steps) == Decimal("1.67") == refund("2.00", END - timedelta(days=25), removed=3, quantity=3)
    assert steps == [Decimal("0.56"), Decimal("0.55"), Decimal("0.56")]


@st.composite
def step_sequences(draw: st.DrawFn) -> tuple[Decimal, int, int, list[tuple[int, int]]]:
    paid = Decimal(draw(st.integers(1, 10**8))) / 100
    licenses_paid = draw(st.integers(1, 50))
    period_days = draw(st.integers(1, 400))
    steps = draw(st.lists(st.tuples(st.integers(1, 60), st.integers(0, period_days)), min_size=1, max_size=12))
    return paid, licenses_paid, period_days, steps


@given(step_sequences())
def test_steps_refund_the_rounded_sum_of_their_exact_shares(case: tuple) -> None:
    """Whatever the steps and their dates: the total is the rounded sum of each step's exact share (its
    licenses capped at what is still paid for), each step within a cent of its own share, and never more
    than one request removing everything on the earliest date."""
    paid, licenses_paid, period_days, steps = case
    amounts = in_steps(str(paid), licenses_paid, steps, period_days)
    exact, left = Fraction(0), licenses_paid
    for (removed, unused), amount in zip(steps, amounts, strict=True):
        licenses = min(removed, left)
        left -= licenses
        share = Fraction(paid) * licenses * unused / (licenses_paid * period_days)
        exact += share
        assert abs(amount - round_cents(share)) <= Decimal("0.01")
        assert amount >= 0 and amount.as_tuple().exponent == -2
    assert sum(amounts) == round_cents(exact)
    earliest = max(unused for _, unused in steps)
    assert sum(amounts) <= round_cents(Fraction(paid) * earliest / period_days) <= paid


def round_cents(exact: Fraction) -> Decimal:
    return Decimal(round(exact * 100)) / 100


# --- idempotency keys -------------------------------------------------------------------------------


def test_refund_key_is_deterministic_and_specific() -> None:
    key = refund_key("req-1", "c1")
    assert key == refund_key("req-1", "c1")
    assert key != refund_key("req-1", "c2")
    assert key != refund_key("req-2", "c1")
    assert "req-1" in key and "c1" in key
