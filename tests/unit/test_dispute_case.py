"""dispute.domain.Case, the dispute as an aggregate: each transition legal from its state only (else
IllegalTransition, the case untouched), and the audit steps and events each one records. A property runs
random sequences of transitions, repeated and out of order as redeliveries bring them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cancelflow.contract import dispute_refund_key
from cancelflow.events import (
    ChargesVerificationRequested,
    ChargeVerification,
    DisputeStepRecorded,
    DuplicateRefundRequested,
    Failed,
    RefundIssued,
    RefundLine,
    RequestedBy,
)
from dispute.domain import TRANSITIONS, Case, Charge, IllegalTransition, Outcome, State

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
REQUEST = "11111111-2222-3333-4444-555555555555"
BY = RequestedBy(user_id="u-1", role="customer", channel="storefront")


def charge(charge_id: str, hours: float, amount: str = "30.00", account: str = "acc-1") -> Charge:
    return Charge(charge_id, account, "sub-1", f"gw-{charge_id}", Decimal(amount), "USD",
                  T0 + timedelta(hours=hours))


# a: the original; b, c: its copies within the window; d: another amount; x: another account's.
CHARGES = {c.charge_id: c for c in [charge("a", 0), charge("b", 1), charge("c", 2), charge("d", 3, "12.00"),
                                    charge("x", 1, account="acc-2")]}
ACCOUNT = [c for c in CHARGES.values() if c.account_id == "acc-1"]


def opened(*charge_ids: str) -> Case:
    return Case.open(request_id=REQUEST, account_id="acc-1", requested_by=BY, reason="charged twice",
                     charge_ids=list(charge_ids), window_hours=72, at=T0)


def examined(*charge_ids: str) -> Case:
    case = opened(*charge_ids)
    case.examine(CHARGES, ACCOUNT, 72)
    return case


def seen(charge_id: str, state: str = "captured", *, found: bool = True) -> ChargeVerification:
    c = CHARGES[charge_id]
    return ChargeVerification(charge_id=charge_id, gateway_charge_id=c.gateway_charge_id, found=found, state=state,
                              amount=c.amount, currency=c.currency, refundable=c.amount)


def result(charge_id: str, *, ok: bool = True, error: str | None = None) -> RefundLine:
    c = CHARGES[charge_id]
    return RefundLine(charge_id=charge_id, gateway_charge_id=c.gateway_charge_id, amount=c.amount,
                      currency=c.currency, idempotency_key=dispute_refund_key(REQUEST, charge_id), kind="reversal",
                      outcome="succeeded" if ok else "failed", refund_id=f"re-{charge_id}" if ok else None,
                      error=error)


def kinds(case: Case) -> list[str]:
    return [e.event_type if not isinstance(e, DisputeStepRecorded) else f"step:{e.step}" for e in case.events]


# --- each transition -------------------------------------------------------------------------------


def test_the_stored_strings_stay_as_they_were() -> None:
    # Rows written before the case was an aggregate load as they are: no migration.
    assert {s.value for s in State} == {"validating", "awaiting_facts", "verifying", "refunding", "completed",
                                        "manual_review", "rejected"}
    assert {o.value for o in Outcome} == {"verifying", "refund_requested", "refunded", "manual_review", "rejected"}
    assert set(TRANSITIONS) == set(State)



def test_a_case_opens_validating_with_the_listed_charges_once() -> None:
    case = opened("b", "b", "d")
    assert (case.state, case.charge_ids, case.requested_by) == (State.validating, ["b", "d"],
                                                                "customer u-1 via storefront")
    assert [(s.step, s.published) for s in case.steps] == [("received", False)]
    assert case.events == []


def test_waiting_for_facts_and_resuming() -> None:
    case = opened("b")
    case.wait_for_facts()
    assert case.state is State.awaiting_facts
    with pytest.raises(IllegalTransition, match="is awaiting_facts"):
        case.wait_for_facts()
    with pytest.raises(IllegalTransition):
        case.examine(CHARGES, ACCOUNT, 72)
    case.resume()
    assert case.state is State.validating
    with pytest.raises(IllegalTransition, match="is validating: it cannot resume"):
        case.resume()
    assert case.events == []


def test_a_duplicate_is_sent_to_the_gateway() -> None:
    case = examined("b")
    assert case.state is State.verifying
    assert kinds(case) == ["step:validated", "step:detected", "ChargesVerificationRequested"]
    asked = case.events[-1]
    assert isinstance(asked, ChargesVerificationRequested)
    assert [(c.charge_id, c.amount) for c in asked.charges] == [("b", Decimal("30.00"))]
    assert [(line.charge_id, line.outcome, line.duplicate, line.related_charge_id) for line in case.lines] == [
        ("b", Outcome.verifying, True, "a")]


def test_nothing_provable_goes_straight_to_review() -> None:
    case = examined("a", "d")
    assert case.state is State.manual_review
    assert kinds(case) == ["step:validated", "step:detected", "step:detected", "step:escalated", "Failed"]
    failed = case.events[-1]
    assert isinstance(failed, Failed) and failed.code == "manual_review"
    assert [r["reason"] for r in failed.details["review"]] == ["earliest_of_group", "different_amount"]


@pytest.mark.parametrize(("listed", "code"), [(("b", "x"), "not_owner"), (("b", "nope"), "unknown_charge")])
def test_a_bad_request_is_rejected_and_keeps_nothing_of_another_account(listed: tuple[str, ...], code: str) -> None:
    case = examined(*listed)
    assert (case.state, case.error_code) == (State.rejected, code)
    assert kinds(case) == ["Failed"]  # the validation step is audited only: the Failed tells it
    assert [(s.step, s.published) for s in case.steps][-1] == ("validated", False)
    own, bad = case.lines
    assert (own.outcome, own.reason, own.facts) == (Outcome.rejected, "not_examined", CHARGES["b"])
    assert (bad.outcome, bad.reason, bad.facts) == (Outcome.rejected, code, None)


def test_confirmed_duplicates_are_refunded_under_their_keys() -> None:
    case = examined("b", "c")
    case.events.clear()
    case.verified([seen("b"), seen("c", "disputed")])
    assert case.state is State.refunding
    assert kinds(case) == ["step:gateway_verified", "step:gateway_verified", "step:refund_requested",
                           "DuplicateRefundRequested"]
    asked = case.events[-1]
    assert isinstance(asked, DuplicateRefundRequested)
    assert [(line.charge_id, line.idempotency_key) for line in asked.lines] == [
        ("b", f"cf-dispute-{REQUEST}-b")]
    assert {line.charge_id: (line.outcome, line.gateway_state) for line in case.lines} == {
        "b": (Outcome.refund_requested, "captured"), "c": (Outcome.manual_review, "disputed")}


def test_an_answer_naming_a_charge_twice_asks_for_one_refund() -> None:
    """Found by the property below: the handler used to confirm the charge once per mention."""
    case = examined("b")
    case.verified([seen("b"), seen("b")])
    (asked,) = [e for e in case.events if isinstance(e, DuplicateRefundRequested)]
    assert [line.charge_id for line in asked.lines] == ["b"]


def test_a_duplicate_the_answer_leaves_out_is_reviewed() -> None:
    case = examined("b")
    case.verified([])
    assert case.state is State.manual_review
    assert (case.lines[0].outcome, case.lines[0].reason) == (Outcome.manual_review, "unknown_at_gateway")


def test_everything_refunded_completes() -> None:
    case = examined("b", "c")
    case.verified([seen("b"), seen("c")])
    case.events.clear()
    case.refunds_issued([result("b"), result("c")])
    assert case.state is State.completed
    assert kinds(case) == ["step:refund_issued", "step:refund_issued", "RefundIssued"]
    issued = case.events[-1]
    assert isinstance(issued, RefundIssued)
    assert (issued.amount, issued.status, [line.refund_id for line in issued.lines]) == (
        Decimal("60.00"), "succeeded", ["re-b", "re-c"])


def test_a_refund_the_guard_refused_reads_already_refunded() -> None:
    case = examined("b")
    case.verified([seen("b")])
    case.refunds_issued([result("b", ok=False, error="insufficient_refundable_balance: 0.00 USD left")])
    assert case.state is State.manual_review
    assert (case.lines[0].reason, case.lines[0].refund_error) == (
        "already_refunded", "insufficient_refundable_balance: 0.00 USD left")
    assert isinstance(case.events[-1], Failed)


@pytest.mark.parametrize("listed", [("b",), ("a",), ("b", "x")])
def test_a_concluded_case_takes_no_further_step(listed: tuple[str, ...]) -> None:
    case = examined(*listed)
    if case.state is State.verifying:
        case.verified([seen("b")])
        case.refunds_issued([result("b")])
    assert not TRANSITIONS[case.state]
    before = copy.deepcopy(case)
    for step in (case.wait_for_facts, case.resume, lambda: case.examine(CHARGES, ACCOUNT, 72),
                 lambda: case.verified([seen("b")]), lambda: case.refunds_issued([result("b")])):
        with pytest.raises(IllegalTransition, match=f"is {case.state.value}"):
            step()
    assert case == before


def test_answers_out_of_order_are_illegal() -> None:
    case = opened("b")
    with pytest.raises(IllegalTransition, match="cannot take the gateway's answer"):
        case.verified([seen("b")])
    case.examine(CHARGES, ACCOUNT, 72)
    with pytest.raises(IllegalTransition, match="is verifying: it cannot take the refunds' outcome"):
        case.refunds_issued([result("b")])


# --- a property over random sequences ---------------------------------------------------------------

ACTIONS = st.one_of(
    st.just(("wait",)), st.just(("resume",)), st.just(("examine",)),
    st.just(("verified", [(c, "captured") for c in "abcd"])), st.just(("issued", [(c, "ok") for c in "abcd"])),
    st.tuples(st.just("verified"), st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(
        ["captured", "settled", "refunded", "disputed", "unknown"])), max_size=4)),
    st.tuples(st.just("issued"), st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(
        ["ok", "insufficient_refundable_balance: 0.00 USD left", "charge_disputed: no"])), max_size=4)),
)


# The one state each step is legal from (the model the case is checked against).
LEGAL_FROM = {"wait": State.validating, "resume": State.awaiting_facts, "examine": State.validating,
              "verified": State.verifying, "issued": State.refunding}


def act(case: Case, action: tuple[Any, ...]) -> None:
    if action[0] == "wait":
        case.wait_for_facts()
    elif action[0] == "resume":
        case.resume()
    elif action[0] == "examine":
        case.examine(CHARGES, ACCOUNT, 72)
    elif action[0] == "verified":
        case.verified([seen(c, state, found=state != "unknown") for c, state in action[1]])
    else:
        case.refunds_issued([result(c, ok=e == "ok", error=None if e == "ok" else e) for c, e in action[1]])


@settings(max_examples=300, deadline=None)
@given(listed=st.lists(st.sampled_from("abcd"), min_size=1, max_size=4)
       | st.lists(st.sampled_from(["a", "b", "x", "nope"]), min_size=1, max_size=3),
       actions=st.lists(ACTIONS, max_size=12))
def test_any_sequence_moves_only_by_the_table_and_refunds_each_duplicate_once_at_most(
        listed: list[str], actions: list[tuple[Any, ...]]) -> None:
    case = opened(*listed)
    requested: list[str] = []
    for action in actions:
        before = copy.deepcopy(case)
        try:
            act(case, action)
        except IllegalTransition:
            assert before.state is not LEGAL_FROM[action[0]]
            assert case == before  # an illegal step changes nothing
            continue
        assert before.state is LEGAL_FROM[action[0]]
        assert case.state in TRANSITIONS[before.state]
        new = case.events[len(before.events):]
        requested += [line.charge_id for e in new if isinstance(e, DuplicateRefundRequested) for line in e.lines]
        # The case's outcome is told once, when it concludes.
        ends = [e for e in case.events if isinstance(e, Failed | RefundIssued)]
        assert len(ends) == (0 if TRANSITIONS[case.state] else 1)

    lines = {line.charge_id: line for line in case.lines}
    assert len(requested) == len(set(requested))  # never asked twice
    assert all(lines[c].duplicate and lines[c].idempotency_key == dispute_refund_key(REQUEST, c) for c in requested)
    refunded = [c for c, line in lines.items() if line.outcome is Outcome.refunded]
    assert set(refunded) <= set(requested)
    assert "a" not in requested  # the earliest of its group is never refunded automatically
    for event in case.events:
        if isinstance(event, RefundIssued):
            assert case.state is State.completed and set(refunded) == set(lines)
            assert event.amount == sum((lines[c].charge.amount for c in refunded), Decimal("0"))
