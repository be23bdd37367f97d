"""The subscription as billing sees it, and the rules of the vendor-first cancellation.

Pure functions over plain values: no database, no broker. Handlers load, call these, store, emit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from cancelflow.events import CancellationRequested, Mode, ValidationCode

IN_PROGRESS = "In Progress"
SYNCHRONIZED = "Synchronized"
CANCELED = "canceled"

# The history records of the seed release note (002), word for word.
HISTORY_COMMITTED = "Status is set to {status} with effective date {effective_date}"
HISTORY_QUANTITY = "Quantity is set to {quantity} with effective date {effective_date}"
HISTORY_VENDOR_ERROR = ("Subscription failed to cancel due to Provisioning Error. "
                        "Please try to cancel the subscription again.")
HISTORY_SCHEDULED = "Auto-renew is set to off; the subscription will be canceled with effective date {effective_date}"
HISTORY_SCHEDULED_PARTIAL = "Quantity will be set to {quantity} with effective date {effective_date}"
HISTORY_PLATFORM_ERROR = ("The subscription cancellation process has encountered an error on our "
                          "Platform. Please contact your administrator")
# A request set aside as stuck while it held the lock (its vendor answer never came back, e.g. lost with
# the embedded broker's memory): the subscription is unlocked so that it can be canceled again.
HISTORY_STUCK = ("The cancellation did not finish: no answer came back from the vendor step, so it was set "
                 "aside for manual review and the subscription unlocked. The vendor may already have canceled "
                 "it. Please try to cancel the subscription again.")
HISTORY_LATE_VENDOR = ("The vendor confirmed the cancellation after the request was set aside. Please cancel "
                       "the subscription again to finish it on our platform.")


@dataclass(frozen=True)
class SubscriptionFacts:
    subscription_id: str
    account_id: str
    status: str
    provisioning_status: str
    quantity: int
    current_period_start: date
    current_period_end: date


@dataclass(frozen=True)
class Rejection:
    code: ValidationCode
    message: str


@dataclass(frozen=True)
class Plan:
    """What an accepted request will do."""

    effective_date: date
    access_end_date: date
    new_quantity: int  # 0: the whole subscription
    run_on: date | None = None  # end_of_term: the day the vendor-first steps run

    @property
    def full(self) -> bool:
        return self.new_quantity == 0


def validate(request: CancellationRequested, sub: SubscriptionFacts | None, today: date, *,
             other_in_flight: bool = False) -> Rejection | Plan:
    """CONTRACT.md section 5, in an order that reveals nothing about another account's subscription.

    `other_in_flight`: another request for this subscription is scheduled or under way."""
    if sub is None:
        return Rejection(ValidationCode.unknown_subscription, "No such subscription for this account.")
    if sub.account_id != request.account_id:
        # Same wording whatever the subscription's state: nothing about it leaks to the caller.
        return Rejection(ValidationCode.not_owner, "The subscription does not belong to this account.")
    if sub.status not in ("active", "trial"):
        return Rejection(ValidationCode.not_active, f"The subscription is {sub.status}, not active or trial.")
    effective = _effective_date(request, sub, today)
    if isinstance(effective, Rejection):
        return effective
    new_quantity = 0
    if request.quantity is not None:
        if not 1 <= request.quantity < sub.quantity:
            return Rejection(
                ValidationCode.invalid_quantity,
                f"Licenses to remove must be between 1 and {sub.quantity - 1} "
                f"(the subscription has {sub.quantity}; to remove all, cancel the whole subscription).",
            )
        new_quantity = sub.quantity - request.quantity
    if sub.provisioning_status == IN_PROGRESS or other_in_flight:
        return Rejection(ValidationCode.provisioning_in_progress,
                         "A provisioning action for this subscription is ongoing; try again when it ends.")
    if request.mode is Mode.end_of_term:
        return Plan(effective_date=effective, access_end_date=sub.current_period_end, new_quantity=new_quantity,
                    run_on=sub.current_period_end)
    return Plan(effective_date=effective, access_end_date=effective, new_quantity=new_quantity)


def _effective_date(request: CancellationRequested, sub: SubscriptionFacts, today: date) -> date | Rejection:
    if request.mode is Mode.immediate:
        return today
    if request.mode is Mode.end_of_term:
        return sub.current_period_end
    when = request.effective_date
    if when is None:
        return Rejection(ValidationCode.invalid_effective_date, "A past-dated cancellation needs effective_date.")
    if when > today:
        return Rejection(ValidationCode.invalid_effective_date,
                         f"effective_date {when} is in the future; use end_of_term or a date up to {today}.")
    if when < sub.current_period_start:
        return Rejection(ValidationCode.invalid_effective_date,
                         f"effective_date {when} is before the current period started ({sub.current_period_start}).")
    return when


def committed_history(plan_new_quantity: int, effective_date: date) -> str:
    if plan_new_quantity == 0:
        return HISTORY_COMMITTED.format(status=CANCELED, effective_date=effective_date.isoformat())
    return HISTORY_QUANTITY.format(quantity=plan_new_quantity, effective_date=effective_date.isoformat())


def vendor_error_history(description: str) -> str:
    return f"{HISTORY_VENDOR_ERROR} Vendor error: {description}" if description else HISTORY_VENDOR_ERROR


class PlatformCommitError(Exception):
    """The platform could not commit after the vendor succeeded (scenario 3 of the seed)."""
