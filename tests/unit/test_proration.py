"""payment_gateway.domain: the proration formula of CONTRACT.md section 5, allocation, refund keys."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payment_gateway.domain import ChargeBalance, allocate, prorated_refund, refund_key

START = date(2026, 11, 1)
END = date(2026, 12, 1)  # 30 days


def refund(paid: str, effective: date, *, start: date = START, end: date = END,
           removed: int = 1, quantity: int = 1) -> Decimal:
    return prorated_refund(paid=Decimal(paid), period_start=start, period_end=end, effective_date=effective,
                           removed=removed, quantity=quantity)


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


def test_partial_licenses_removed_over_quantity() -> None:
    # 100.00 for 4 licenses, 1 removed, whole period unused: 25.00
    assert refund("100.00", START, removed=1, quantity=4) == Decimal("25.00")
    # 100.00 * 15/30 * 3/4 = 37.50
    assert refund("100.00", START + timedelta(days=15), removed=3, quantity=4) == Decimal("37.50")


def test_full_cancellation_is_removed_equals_quantity() -> None:
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
        prorated_refund(paid=10.01, period_start=START, period_end=END, effective_date=START,  # type: ignore[arg-type]
                        removed=1, quantity=1)


# --- property: bounded and monotone -----------------------------------------------------------------


@st.composite
def refund_cases(draw: st.DrawFn) -> tuple[Decimal, date, date, date, date, int, int]:
    paid = Decimal(draw(st.integers(min_value=0, max_value=10**9))) / 100
    start = date(2024, 1, 1) + timedelta(days=draw(st.integers(0, 1000)))
    period_days = draw(st.integers(1, 400))
    end = start + timedelta(days=period_days)
    a, b = sorted(draw(st.lists(st.integers(-60, period_days + 60), min_size=2, max_size=2)))
    quantity = draw(st.integers(1, 100))
    removed = draw(st.integers(1, quantity))
    return paid, start, end, start + timedelta(days=a), start + timedelta(days=b), removed, quantity


@given(refund_cases())
def test_refund_is_bounded_and_monotone_in_effective_date(case: tuple) -> None:
    paid, start, end, earlier, later, removed, quantity = case

    def at(effective: date) -> Decimal:
        return prorated_refund(paid=paid, period_start=start, period_end=end, effective_date=effective,
                               removed=removed, quantity=quantity)

    first, second = at(earlier), at(later)
    for value in (first, second):
        assert isinstance(value, Decimal)
        assert Decimal("0") <= value <= paid
        assert value.as_tuple().exponent == -2
    assert second <= first


# --- allocation over the period's charges -------------------------------------------------------------


def charge(charge_id: str, refundable: str) -> ChargeBalance:
    return ChargeBalance(charge_id, f"gw-{charge_id}", Decimal(refundable), "USD")


def test_allocate_within_one_charge() -> None:
    lines = allocate(Decimal("20.00"), [charge("c1", "49.95"), charge("c2", "49.95")])
    assert [(c.charge_id, amount) for c, amount in lines] == [("c1", Decimal("20.00"))]


def test_allocate_splits_across_charges_in_order() -> None:
    lines = allocate(Decimal("70.00"), [charge("c1", "49.95"), charge("c2", "49.95")])
    assert [(c.charge_id, amount) for c, amount in lines] == [("c1", Decimal("49.95")), ("c2", Decimal("20.05"))]


def test_allocate_skips_exhausted_charges() -> None:
    lines = allocate(Decimal("10.00"), [charge("c1", "0.00"), charge("c2", "49.95")])
    assert [(c.charge_id, amount) for c, amount in lines] == [("c2", Decimal("10.00"))]


def test_allocate_never_exceeds_what_is_left() -> None:
    lines = allocate(Decimal("500.00"), [charge("c1", "49.95"), charge("c2", "10.00")])
    assert [(c.charge_id, amount) for c, amount in lines] == [("c1", Decimal("49.95")), ("c2", Decimal("10.00"))]


def test_allocate_nothing() -> None:
    assert allocate(Decimal("0.00"), [charge("c1", "49.95")]) == []
    assert allocate(Decimal("5.00"), []) == []


@given(st.integers(0, 10**6), st.lists(st.integers(0, 10**5), max_size=6))
def test_allocate_property(amount_cents: int, balances_cents: list[int]) -> None:
    amount = Decimal(amount_cents) / 100
    charges = [charge(f"c{i}", str(Decimal(c) / 100)) for i, c in enumerate(balances_cents)]
    lines = allocate(amount, charges)
    for balance, part in lines:
        assert Decimal("0") < part <= balance.refundable
    assert len({b.charge_id for b, _ in lines}) == len(lines)
    total = sum((part for _, part in lines), Decimal("0"))
    assert total == min(amount, sum((c.refundable for c in charges), Decimal("0")))


# --- idempotency keys -------------------------------------------------------------------------------


def test_refund_key_is_deterministic_and_specific() -> None:
    key = refund_key("req-1", "c1")
    assert key == refund_key("req-1", "c1")
    assert key != refund_key("req-1", "c2")
    assert key != refund_key("req-2", "c1")
    assert "req-1" in key and "c1" in key
