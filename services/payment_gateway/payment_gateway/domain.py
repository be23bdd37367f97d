"""Proration: what a cancellation refunds of each charge that paid for the period (CONTRACT.md section 5).

Per charge, `round_half_even(captured * removed / licenses_paid * unused_days / period_days, 2)`, with
`captured` what the charge captured before any refund. Steps are counted in license-days (licenses
removed times days unused), so removing licenses in several requests refunds what removing them in one
would, and the used part of a license is never refunded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from fractions import Fraction

ZERO = Decimal("0.00")


def unused_days(period_start: date, period_end: date, effective_date: date) -> int:
    """Days of the period after the effective date, clamped to the period."""
    period_days = (period_end - period_start).days
    return min(max((period_end - effective_date).days, 0), max(period_days, 0))


def to_cents(exact: Fraction) -> Decimal:
    """An exact amount rounded half-even to cents (`round` of a Fraction rounds ties to even)."""
    return Decimal(round(exact * 100)).scaleb(-2).quantize(Decimal("0.01"))


@dataclass(frozen=True)
class ChargeTerms:
    """What a charge paid for: the basis of every refund of it."""

    captured: Decimal
    licenses_paid: int
    period_days: int


@dataclass(frozen=True)
class EarlierRefunds:
    """What earlier cancellation refunds of the same charge took (failed ones are not counted)."""

    licenses: int = 0
    license_days: int = 0
    amount: Decimal = ZERO
    licenses_paid: int | None = None  # what the first of them counted the charge as paying for


@dataclass(frozen=True)
class Share:
    licenses: int  # licenses refunded by this step (after the licenses-paid cap)
    amount: Decimal


def fair_share(terms: ChargeTerms, earlier: EarlierRefunds, *, removed: int, unused: int) -> Share:
    """This step's refund of the charge: `removed` licenses, `unused` days of the period unused.

    The licenses refunded in a period never exceed `licenses_paid`. The amount is the formula's, with
    the rounding of earlier steps carried: the steps together refund the rounded sum of their exact
    shares, so never a cent more than one request removing the same licenses would."""
    if isinstance(terms.captured, float):
        raise TypeError("money is Decimal, never float")
    if terms.captured <= 0 or terms.licenses_paid <= 0 or terms.period_days <= 0:
        return Share(0, ZERO)
    licenses = max(min(removed, terms.licenses_paid - earlier.licenses), 0)
    license_days = earlier.license_days + licenses * unused
    together = to_cents(Fraction(terms.captured) * license_days / (terms.licenses_paid * terms.period_days))
    return Share(licenses, max(together - earlier.amount, ZERO))


@dataclass(frozen=True)
class ChargeBalance:
    """A gateway charge as the refund guard sees it: the record that stands for it, and what is left."""

    charge_id: str
    gateway_charge_id: str
    refundable: Decimal
    currency: str
    captured: Decimal = ZERO
    quantity: int | None = None  # the licenses it paid for, when upstream said
    period_start: date | None = None
    period_end: date | None = None


def short_of_charges(quantities: list[int | None], *, period_quantity: int | None, quantity_before: int) -> bool:
    """Whether the charges known for a period (their licenses, None: the subscription's) pay for fewer
    licenses than the subscription had in it: some may not be read yet. A charge without a quantity of
    its own pays for the quantity when the period began (billing's, else the one before the request)."""
    whole = period_quantity or quantity_before
    return sum(q or whole for q in quantities) < max(whole, quantity_before)


