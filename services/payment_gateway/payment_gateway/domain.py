"""Proration and the allocation of a refund over the charges that paid for the period."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal

CENT = Decimal("0.01")


def prorated_refund(*, paid: Decimal, period_start: date, period_end: date, effective_date: date,
                    removed: int, quantity: int) -> Decimal:
    """CONTRACT.md section 5:
    round_half_even(paid * unused_days / period_days * removed / quantity, 2)."""
    period_days = (period_end - period_start).days
    if period_days <= 0 or quantity <= 0 or paid <= 0:
        return Decimal("0.00")
    unused_days = min(max((period_end - effective_date).days, 0), period_days)
    # One division at the end: the only rounding is the final half-even to cents.
    exact = paid * unused_days * removed / (Decimal(period_days) * quantity)
    return exact.quantize(CENT, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class ChargeBalance:
    charge_id: str
    gateway_charge_id: str
    refundable: Decimal
    currency: str


def allocate(amount: Decimal, charges: list[ChargeBalance]) -> list[tuple[ChargeBalance, Decimal]]:
    """Spread `amount` over the charges in the order given, never past what a charge has left."""
    lines: list[tuple[ChargeBalance, Decimal]] = []
    left = amount
    for charge in charges:
        if left <= 0:
            break
        take = min(left, charge.refundable)
        if take > 0:
            lines.append((charge, take))
            left -= take
    return lines


def refund_key(request_id: str, charge_id: str) -> str:
    """Derived from the request and the charge: a redelivery or a retry reuses it, never a new one."""
    return f"cf-refund-{request_id}-{charge_id}"


def dispute_refund_key(request_id: str, charge_id: str) -> str:
    """The key of a duplicate charge's refund (the multiple-charge flow): one per request and charge.
    The dispute service derives the same; a line carrying another key is refused."""
    return f"cf-dispute-{request_id}-{charge_id}"


# The error a refund line gets when the guard finds too little left of the charge (already refunded,
# or reserved by a refund in flight); the dispute service reads it as "already refunded".
INSUFFICIENT_BALANCE = "insufficient_refundable_balance"
