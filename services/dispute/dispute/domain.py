"""The multiple-charge rules (CONTRACT.md section 5, "Charges") and the case they decide. Pure: no I/O.

- `Case`: one dispute, from the intake to its outcome; each transition checks the case's `State`
  and records the audit `Step`s and the events it causes.
- `validate`: every listed charge is known and belongs to the account asking.
- `detect`: a listed charge is a duplicate when another charge of the same account and subscription, same
  amount and currency, was captured earlier within the window. The earliest charge of a group is the
  legitimate one and never refunded automatically; anything not provably a duplicate gets the reason.
- `confirm`: whether the gateway's view of a duplicate lets it be refunded automatically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any
from uuid import UUID

from cancelflow import contract, durations
from cancelflow.events import (
    ChargesVerificationRequested,
    ChargeVerification,
    DisputedCharge,
    DisputeStepRecorded,
    DuplicateRefundLine,
    DuplicateRefundRequested,
    Failed,
    Payload,
    RefundIssued,
    RefundLine,
    RequestedBy,
    Source,
    ValidationCode,
)


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


# The idempotency key of a duplicate's refund: derived, so a redelivery or a retry reuses it.


def refund_failure_reason(error: str | None) -> Reason:
    """A failed refund line: the guard found too little left (already refunded), or the gateway refused."""
    return (Reason.already_refunded if contract.GuardCode.insufficient_refundable_balance.refused_in(error)
            else Reason.refund_refused)


# --- the case ----------------------------------------------------------------------------------

ACTOR = "dispute"
GATEWAY_ACTOR = "payment_gateway"


class State(StrEnum):
    """Where a case stands (stored as `disputes.state`)."""

    validating = "validating"
    awaiting_facts = "awaiting_facts"  # some listed charge not known yet: waits for the upstream facts
    verifying = "verifying"  # the gateway is asked about the duplicates
    refunding = "refunding"  # the confirmed duplicates' refunds are asked for
    completed = "completed"
    manual_review = "manual_review"
    rejected = "rejected"


# Where a case may go from each state; a case with nothing to verify goes straight to manual_review.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.validating: frozenset({State.awaiting_facts, State.rejected, State.verifying, State.manual_review}),
    State.awaiting_facts: frozenset({State.validating}),
    State.verifying: frozenset({State.refunding, State.manual_review}),
    State.refunding: frozenset({State.completed, State.manual_review}),
    State.completed: frozenset(),
    State.manual_review: frozenset(),
    State.rejected: frozenset(),
}


class Outcome(StrEnum):
    """What became of one listed charge (stored as `dispute_charges.outcome`)."""

    verifying = "verifying"
    refund_requested = "refund_requested"
    refunded = "refunded"
    manual_review = "manual_review"
    rejected = "rejected"


class IllegalTransition(Exception):
    """A case was asked for a step its state does not allow."""

    def __init__(self, request_id: str, state: State, step: str) -> None:
        super().__init__(f"dispute {request_id} is {state.value}: it cannot {step}")
        self.request_id, self.state, self.step = request_id, state, step


@dataclass(frozen=True)
class Step:
    """An audit record; `published` ones are also told in the request's status history."""

    step: str
    message: str
    actor: str = ACTOR
    charge_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    published: bool = True


@dataclass
class Line:
    """One listed charge of a case: its facts (none kept of another account's charge) and what became
    of it."""

    charge_id: str
    position: int
    outcome: Outcome
    duplicate: bool
    reason: str  # a Reason, or the rejection's code
    detail: str
    facts: Charge | None = None
    related_charge_id: str | None = None  # what it duplicates / is compared with
    gateway_state: str | None = None
    idempotency_key: str | None = None
    refund_kind: str | None = None
    refund_id: str | None = None
    refund_error: str | None = None

    @classmethod
    def found(cls, position: int, finding: Finding) -> Line:
        return cls(finding.charge.charge_id, position,
                   Outcome.verifying if finding.duplicate else Outcome.manual_review, finding.duplicate,
                   finding.reason.value, finding.detail, finding.charge,
                   finding.related.charge_id if finding.related else None)

    @property
    def charge(self) -> Charge:
        assert self.facts is not None, f"charge {self.charge_id} of another account: no facts kept"
        return self.facts

    @property
    def money(self) -> str:
        return _money(self.charge)

    def refund_request(self) -> DuplicateRefundLine:
        assert self.idempotency_key is not None
        return DuplicateRefundLine(charge_id=self.charge_id, gateway_charge_id=self.charge.gateway_charge_id,
                                   amount=self.charge.amount, currency=self.charge.currency,
                                   idempotency_key=self.idempotency_key, duplicate_of=self.related_charge_id)

    def refund_line(self) -> RefundLine:
        assert self.idempotency_key is not None
        return RefundLine(charge_id=self.charge_id, gateway_charge_id=self.charge.gateway_charge_id,
                          amount=self.charge.amount, currency=self.charge.currency,
                          idempotency_key=self.idempotency_key, kind=self.refund_kind, outcome="succeeded",
                          refund_id=self.refund_id)

    def view(self) -> dict[str, Any]:
        """The charge as the emails show it: what it was and what became of it."""
        refunded = self.outcome is Outcome.refunded
        facts = self._facts()
        return {"charge_id": self.charge_id, "amount": facts.get("amount"), "currency": facts.get("currency"),
                "captured_at": facts.get("captured_at"), "kind": self.refund_kind if refunded else None,
                "status": "refunded" if refunded else "under review", "reason": None if refunded else self.detail}

    def transaction(self) -> dict[str, Any]:
        """Every detail support needs to act on the charge by hand."""
        values = {
            "charge_id": self.charge_id, **self._facts(), "duplicate": "yes" if self.duplicate else "no",
            "related_charge": self.related_charge_id, "gateway_state": self.gateway_state,
            "outcome": self.outcome.value, "reason": self.reason, "idempotency_key": self.idempotency_key,
            "refund_kind": self.refund_kind, "refund_id": self.refund_id, "refund_error": self.refund_error,
        }
        return {k: v for k, v in values.items() if v is not None}

    def _facts(self) -> dict[str, Any]:
        return {} if self.facts is None else self.facts.transaction()

    def review(self) -> dict[str, Any]:
        return {"charge_id": self.charge_id, "reason": self.reason, "detail": self.detail}


@dataclass
class Case:
    """One dispute (target `charges`). Every transition checks the state (IllegalTransition otherwise),
    and records its audit `steps` and the `events` to emit, in order."""

    request_id: str
    account_id: str
    requested_by: str  # `requester`: role, user id, channel
    reason: str | None
    charge_ids: list[str]
    window_hours: int
    opened_at: datetime
    state: State = State.validating
    error_code: str | None = None
    lines: list[Line] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    events: list[Payload] = field(default_factory=list)

    @classmethod
    def open(cls, *, request_id: str, account_id: str, requested_by: RequestedBy, reason: str | None,
             charge_ids: list[str], window_hours: int, at: datetime) -> Case:
        listed, by = unique(charge_ids), requester(requested_by)
        case = cls(request_id, account_id, by, reason or None, listed, window_hours, at)
        # Already in the status history through CancellationReceived: kept for the audit only.
        case._record(Step("received", f"Dispute of charges {', '.join(listed)} received", actor=by,
                          data={"account_id": account_id, "charge_ids": listed, "reason": reason},
                          published=False))
        return case

    @property
    def uuid(self) -> UUID:
        return UUID(self.request_id)

    # --- transitions ---------------------------------------------------------------------------

    def wait_for_facts(self) -> None:
        """Some listed charge is not known yet, and its facts may be behind in a backlog."""
        self._move(State.awaiting_facts, "wait for its charges' facts")

    def resume(self) -> None:
        """The facts it waited for have come (or the wait is over): it is validated now."""
        self._move(State.validating, "resume")

    def examine(self, known: dict[str, Charge], account_charges: list[Charge], window_hours: int) -> None:
        """Validate the listed charges (`known`: those we know of the listed ids); then detect the
        duplicates among the account's charges and ask the gateway about them."""
        self._expect(State.validating, "be examined")
        rejection = validate(self.account_id, self.charge_ids, known)
        if rejection is not None:
            self._reject(rejection, known)
            return
        self._record(Step("validated", f"Validated: {len(self.charge_ids)} listed charge(s) of account "
                                       f"{self.account_id}, all known",
                          data={"outcome": "accepted", "charge_ids": self.charge_ids}))
        findings = detect([known[c] for c in self.charge_ids], account_charges, timedelta(hours=window_hours))
        for position, finding in enumerate(findings):
            line = Line.found(position, finding)
            self.lines.append(line)
            verdict = ":" if finding.duplicate else " is not a duplicate:"
            self._record(Step("detected", f"Charge {line.charge_id} ({line.money}){verdict} {finding.detail}",
                              charge_id=line.charge_id,
                              data={"duplicate": finding.duplicate, "reason": finding.reason.value,
                                    "related_charge_id": line.related_charge_id, "window_hours": window_hours,
                                    "transaction": finding.charge.transaction()}))
        candidates = [f.charge for f in findings if f.duplicate]
        if not candidates:
            self._conclude()
            return
        self._move(State.verifying, "ask the gateway")
        self.events.append(ChargesVerificationRequested(
            request_id=self.uuid, account_id=self.account_id,
            charges=[DisputedCharge(charge_id=c.charge_id, gateway_charge_id=c.gateway_charge_id, amount=c.amount,
                                    currency=c.currency) for c in candidates]))

    def _reject(self, rejection: Rejection, known: dict[str, Charge]) -> None:
        for position, charge_id in enumerate(self.charge_ids):
            if charge_id in rejection.charge_ids:  # nothing of it is kept but its id
                self.lines.append(Line(charge_id, position, Outcome.rejected, False, rejection.code.value,
                                       rejection.message))
                continue
            self.lines.append(Line(charge_id, position, Outcome.rejected, False, "not_examined",
                                   "not examined: the request was rejected", known[charge_id]))
        self._move(State.rejected, "be rejected")
        self.error_code = rejection.code.value
        # The status history gets this from the Failed event itself.
        self._record(Step("validated", f"Rejected ({rejection.code.value}): {rejection.message}",
                          data={"outcome": "rejected", "code": rejection.code.value,
                                "charge_ids": list(rejection.charge_ids)}, published=False))
        self.events.append(Failed(request_id=self.uuid, source=Source.validation, code=rejection.code.value,
                                  message=rejection.message, retryable=False))

    def verified(self, answers: list[ChargeVerification]) -> None:
        """The gateway's view of the duplicates: confirmed ones are refunded, the others reviewed."""
        self._expect(State.verifying, "take the gateway's answer")
        lines = {line.charge_id: line for line in self.lines}
        confirmed: list[Line] = []
        for seen in answers:
            line = lines.get(seen.charge_id)
            if line is None or line.outcome is not Outcome.verifying:
                continue
            verdict = confirm(line.charge, seen)
            line.gateway_state = seen.state
            data = {"confirmed": verdict.ok, **seen.model_dump(mode="json")}
            if verdict.ok:  # from now on the line waits for its refund (a repeated answer is skipped)
                line.outcome = Outcome.refund_requested
                confirmed.append(line)
                message = f"Gateway confirmed charge {seen.charge_id}: {verdict.detail}"
            else:
                assert verdict.reason is not None
                line.outcome, line.reason, line.detail = Outcome.manual_review, verdict.reason.value, verdict.detail
                data["reason"] = verdict.reason.value
                message = f"Gateway check of charge {seen.charge_id}: {verdict.detail}; not refunded automatically"
            self._record(Step("gateway_verified", message, actor=GATEWAY_ACTOR, charge_id=seen.charge_id, data=data))
        answered = {seen.charge_id for seen in answers}
        for line in self.lines:
            if line.outcome is Outcome.verifying and line.charge_id not in answered:
                # Not in the answer (should not happen): a person looks at it.
                line.outcome, line.reason = Outcome.manual_review, Reason.unknown_at_gateway.value
                line.detail = "the gateway's answer did not cover this charge"
        if not confirmed:
            self._conclude()
            return
        for line in confirmed:
            key = line.idempotency_key = contract.dispute_refund_key(self.request_id, line.charge_id)
            self._record(Step("refund_requested", f"Refund of {line.money} requested for charge {line.charge_id} "
                                                  f"(idempotency key {key})",
                              charge_id=line.charge_id,
                              data={"amount": f"{line.charge.amount:.2f}", "currency": line.charge.currency,
                                    "gateway_charge_id": line.charge.gateway_charge_id, "idempotency_key": key,
                                    "duplicate_of": line.related_charge_id}))
        self._move(State.refunding, "ask for refunds")
        self.events.append(DuplicateRefundRequested(
            request_id=self.uuid, account_id=self.account_id,
            lines=[line.refund_request() for line in confirmed]))

    def refunds_issued(self, results: list[RefundLine]) -> None:
        """Payment-gateway's outcome per refund: the case concludes."""
        self._expect(State.refunding, "take the refunds' outcome")
        lines = {line.charge_id: line for line in self.lines}
        for result in results:
            line = lines.get(result.charge_id)
            if line is None or line.outcome is not Outcome.refund_requested:
                continue
            data = result.model_dump(mode="json")
            if result.outcome == "succeeded":
                line.outcome, line.refund_kind, line.refund_id = Outcome.refunded, result.kind, result.refund_id
                self._record(Step("refund_issued",
                                  f"Gateway returned {result.amount:.2f} {result.currency} of charge "
                                  f"{result.charge_id} as a {result.kind or 'refund'}"
                                  + (f" ({result.refund_id})" if result.refund_id else ""),
                                  actor=GATEWAY_ACTOR, charge_id=result.charge_id, data=data))
                continue
            reason = refund_failure_reason(result.error)
            line.outcome, line.reason, line.refund_error = Outcome.manual_review, reason.value, result.error
            line.detail = (f"already refunded (by another request): {result.error}"
                           if reason is Reason.already_refunded else f"the gateway refused the refund: {result.error}")
            self._record(Step("refund_failed", f"Refund of charge {result.charge_id} not issued: {line.detail}",
                              actor=GATEWAY_ACTOR, charge_id=result.charge_id, data={**data, "reason": reason.value}))
        self._conclude()

    def _conclude(self) -> None:
        """Everything listed refunded: completed; anything else: support reviews it."""
        refunded = [line.refund_line() for line in self.lines if line.outcome is Outcome.refunded]
        review = [line for line in self.lines if line.outcome is not Outcome.refunded]
        if not review:
            self._move(State.completed, "complete")
            total = sum((line.amount for line in refunded), Decimal("0"))
            self._record(Step("completed", f"Every listed charge was refunded: {total:.2f} {refunded[0].currency}",
                              data={"refunded": [line.model_dump(mode="json") for line in refunded]},
                              published=False))  # the status history shows the RefundIssued
            self.events.append(RefundIssued(request_id=self.uuid, amount=total, currency=refunded[0].currency,
                                            status="succeeded", lines=refunded))
            return
        self._move(State.manual_review, "go to review")
        reasons = "; ".join(f"{line.charge_id}: {line.detail}" for line in review)
        message = (f"{len(review)} of {len(self.lines)} listed charge(s) could not be refunded automatically "
                   f"and need a review by support: {reasons}")
        if refunded:
            message += ". Refunded: " + ", ".join(
                f"{line.charge_id} ({line.amount:.2f} {line.currency})" for line in refunded)
        self._record(Step("escalated", f"Escalated to support: {reasons}",
                          data={"review": [line.review() for line in review],
                                "refunded": [line.charge_id for line in refunded]}))
        self.events.append(Failed(
            request_id=self.uuid, source=Source.payment, code="manual_review", message=message,
            retryable=False,
            details={
                "dispute": True, "account_id": self.account_id, "charge_ids": self.charge_ids,
                "refunded": [line.model_dump(mode="json") for line in refunded],
                "review": [line.review() for line in review],
                "charges": [line.view() for line in self.lines],
                "transactions": [line.transaction() for line in self.lines],
            }))

    # --- bookkeeping ---------------------------------------------------------------------------

    def _expect(self, state: State, step: str) -> None:
        if self.state is not state:
            raise IllegalTransition(self.request_id, self.state, step)

    def _move(self, to: State, step: str) -> None:
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.request_id, self.state, step)
        self.state = to

    def _record(self, step: Step) -> None:
        self.steps.append(step)
        if step.published:
            self.events.append(DisputeStepRecorded(request_id=self.uuid, step=step.step, actor=step.actor,
                                                   charge_id=step.charge_id, message=step.message, data=step.data))
