"""The multiple-charge rules (CONTRACT.md section 5, "Charges"). Pure: no I/O.

- `validate`: every listed charge is known and belongs to the account asking.
- `detect`: a listed charge is a duplicate when another charge of the same account and subscription, same
  amount and currency, was captured earlier within the window. The earliest charge of a group is the
  legitimate one and never refunded automatically; anything not provably a duplicate gets the reason.
- `confirm`: whether the gateway's view of a duplicate lets it be refunded automatically.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from cancelflow import durations
from cancelflow.events import ChargeVerification, RequestedBy, ValidationCode


class Reason(StrEnum):
    duplicate = "duplicate"
    # not provably a duplicate (detection)
    earliest_of_group = "earliest_of_group"
    outside_window = "outside_window"
    different_amount = "different_amount"
    no_matching_charge = "no_matching_charge"
    # the gateway says no (verification, refund)
    already_refunded = "already_refunded"
    disputed = "disputed"
    unknown_at_gateway = "unknown_at_gateway"
    gateway_mismatch = "gateway_mismatch"
    refund_refused = "refund_refused"


@dataclass(frozen=True)
class Charge:
    charge_id: str
    account_id: str
    subscription_id: str
    gateway_charge_id: str
    amount: Decimal
    currency: str
    captured_at: datetime

    @property
    def order(self) -> tuple[datetime, str]:
        # Two captures at the same instant: the charge id decides which one is "earlier".
        return (self.captured_at, self.charge_id)

    def same_payment(self, other: Charge) -> bool:
        return (self.account_id, self.subscription_id, self.amount, self.currency) == (
            other.account_id, other.subscription_id, other.amount, other.currency)

    def transaction(self) -> dict[str, Any]:
        """The charge's facts as support reads them."""
        return {"charge_id": self.charge_id, "gateway_charge_id": self.gateway_charge_id,
                "subscription_id": self.subscription_id, "amount": f"{self.amount:.2f}",
                "currency": self.currency, "captured_at": self.captured_at.isoformat()}


@dataclass(frozen=True)
class Rejection:
    code: ValidationCode
    message: str
    charge_ids: tuple[str, ...]


@dataclass(frozen=True)
class Finding:
    """The detection verdict for one listed charge."""

    charge: Charge
    reason: Reason
    detail: str
    related: Charge | None = None  # the charge it duplicates, or the one it was compared with

    @property
    def duplicate(self) -> bool:
        return self.reason is Reason.duplicate


@dataclass(frozen=True)
class Confirmation:
    ok: bool
    reason: Reason | None
    detail: str


def requester(by: RequestedBy) -> str:
    """Who asked, as the case and its audit keep it (at most events.ACTOR_CHARS)."""
    return f"{by.role} {by.user_id} via {by.channel}"


def unique(charge_ids: list[str]) -> list[str]:
    """The listed charge ids, each once, in the order given."""
    return list(dict.fromkeys(charge_ids))


def validate(account_id: str, charge_ids: list[str], known: dict[str, Charge]) -> Rejection | None:
    """None when every listed charge is known and the account's; else the rejection (unknown first).
    Nothing about another account's charge is said beyond its id."""
    unknown = tuple(c for c in charge_ids if c not in known)
    if unknown:
        return Rejection(ValidationCode.unknown_charge, f"Unknown charge(s): {', '.join(unknown)}", unknown)
    foreign = tuple(c for c in charge_ids if known[c].account_id != account_id)
    if foreign:
        return Rejection(ValidationCode.not_owner,
                         f"Charge(s) {', '.join(foreign)} do not belong to account {account_id}", foreign)
    return None


def human_delta(delta: timedelta) -> str:
    """'45 min', '2 h', '3 h 5 min', '4 d 2 h'."""
    return durations.text(delta.total_seconds())


def _money(charge: Charge) -> str:
    return f"{charge.amount:.2f} {charge.currency}"


def detect(listed: list[Charge], account_charges: list[Charge], window: timedelta) -> list[Finding]:
    """The verdict for each listed charge, in the order listed. `account_charges` are every charge of
    the account we know (listed ones included)."""
    hours = f"{window.total_seconds() / 3600:g} h"
    return [_finding(charge, account_charges, window, hours) for charge in listed]


def _finding(charge: Charge, account_charges: list[Charge], window: timedelta, hours: str) -> Finding:
    others = [o for o in account_charges if o.charge_id != charge.charge_id]
    same = [o for o in others if o.same_payment(charge)]
    earlier = [o for o in same if o.order < charge.order]
    within = [o for o in earlier if charge.captured_at - o.captured_at <= window]
    if within:
        original = min(within, key=lambda o: o.order)
        return Finding(charge, Reason.duplicate,
                       f"duplicate of {original.charge_id}: same amount {_money(charge)}, captured "
                       f"{human_delta(charge.captured_at - original.captured_at)} later, within the "
                       f"{hours} window", original)
    later = [o for o in same if o.order > charge.order and o.captured_at - charge.captured_at <= window]
    if later:
        copy = min(later, key=lambda o: o.order)
        return Finding(charge, Reason.earliest_of_group,
                       f"the first of its group of identical charges ({copy.charge_id} was captured "
                       f"{human_delta(copy.captured_at - charge.captured_at)} later): it is kept as the "
                       f"legitimate payment", copy)
    if earlier:
        previous = max(earlier, key=lambda o: o.order)
        return Finding(charge, Reason.outside_window,
                       f"captured {human_delta(charge.captured_at - previous.captured_at)} after "
                       f"{previous.charge_id} of the same amount, outside the {hours} duplicate window",
                       previous)
    near = [o for o in others if (o.account_id, o.subscription_id) == (charge.account_id, charge.subscription_id)
            and abs(charge.captured_at - o.captured_at) <= window]
    if near:
        closest = min(near, key=lambda o: (abs(charge.captured_at - o.captured_at), o.charge_id))
        when = "earlier" if closest.order < charge.order else "later"
        return Finding(charge, Reason.different_amount,
                       f"no other charge of {_money(charge)}: {closest.charge_id} of the same subscription, "
                       f"captured {human_delta(charge.captured_at - closest.captured_at)} {when}, was "
                       f"{_money(closest)}", closest)
    return Finding(charge, Reason.no_matching_charge,
                   f"no other charge of the same subscription within the {hours} window")


def confirm(charge: Charge, seen: ChargeVerification) -> Confirmation:
    """Whether a detected duplicate can be refunded in full automatically, by what the gateway (and our
    refund guard) say of it now. Already refunded, disputed or unknown charges go to review."""
    if not seen.found:
        why = f" ({seen.error})" if seen.error else ""
        return Confirmation(False, Reason.unknown_at_gateway, f"the gateway could not confirm the charge{why}")
    if seen.state == "disputed":
        return Confirmation(False, Reason.disputed,
                            "the gateway reports the charge as disputed (a chargeback is open)")
    if seen.state in ("refunded", "partially_refunded"):
        refunded = f" ({seen.refunded:.2f} {seen.currency})" if seen.refunded is not None else ""
        return Confirmation(False, Reason.already_refunded,
                            f"the gateway reports the charge as {seen.state.replace('_', ' ')}{refunded}")
    if seen.amount is not None and (seen.amount != charge.amount or (seen.currency or "") != charge.currency):
        return Confirmation(False, Reason.gateway_mismatch,
                            f"the gateway has the charge as {seen.amount:.2f} {seen.currency}, "
                            f"not {_money(charge)}")
    if seen.refundable is not None and seen.refundable < charge.amount:
        return Confirmation(False, Reason.already_refunded,
                            f"the gateway would refund only {seen.refundable:.2f} {charge.currency} of it")
    if seen.guard_refundable is not None and seen.guard_refundable < charge.amount:
        return Confirmation(False, Reason.already_refunded,
                            f"{charge.amount - seen.guard_refundable:.2f} {charge.currency} of it is already "
                            f"refunded or being refunded by another request")
    return Confirmation(True, None, f"the gateway reports the charge as {seen.state}, "
                                    f"{_money(charge)} refundable")


def refund_key(request_id: str, charge_id: str) -> str:
    """The idempotency key of a duplicate's refund: derived, so a redelivery or a retry reuses it.
    Payment-gateway derives the same (payment_gateway.domain.dispute_refund_key) and refuses others."""
    return f"cf-dispute-{request_id}-{charge_id}"


REFUND_REFUSED_BY_GUARD = "insufficient_refundable_balance"


def refund_failure_reason(error: str | None) -> Reason:
    """A failed refund line: the guard found too little left (already refunded), or the gateway refused."""
    return Reason.already_refunded if (error or "").startswith(REFUND_REFUSED_BY_GUARD) else Reason.refund_refused
