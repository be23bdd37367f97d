"""The multiple-charge flow (target `charges`) end to end, on SQLite and PostgreSQL stores: duplicates
detected, confirmed with the gateway and refunded once; everything else sent to support with the reason.

Each case is checked through the status records on `cancellations.status`, the gateway sandbox's ledger,
the emails the SMTP server received, and the dispute service's audit trail (GET /disputes/{id}).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from cancelflow import topics
from cancelflow.events import CancellationRequested, ChargeCaptured
from cancelflow_tools.ops import SampleSubscription, sample_subscription
from tests.e2e.conftest import SUPPORT, id_on_same_saga_partition
from tests.e2e.test_cancellation_flow import (
    _finish,
    _ledger,
    _mails,
    _read_saga_record,
    _versions_step_by_one,
)

pytestmark = pytest.mark.e2e


def _scene(ids: dict[str, str], today, name: str, charges: list[tuple[str, float, str]], *,  # type: ignore[no-untyped-def]
           account: str | None = None, days_into_period: int = 10) -> SampleSubscription:
    """A subscription of the account and its charges: (name, hours ago, amount) each."""
    account = account or ids["account"]
    sample = sample_subscription(account_id=account, subscription_id=f"sub-{name}-{ids['tag']}", today=today,
                                 days_into_period=days_into_period)
    now = datetime.now(UTC).replace(microsecond=0)
    captured = [ChargeCaptured(
        charge_id=f"ch-{name}-{ids['tag']}-{label}", account_id=account, subscription_id=sample.facts.subscription_id,
        amount=amount, currency="USD", captured_at=now - timedelta(hours=hours),
        gateway_charge_id=f"gw-{name}-{ids['tag']}-{label}", period_start=sample.facts.current_period_start,
        period_end=sample.facts.current_period_end) for label, hours, amount in charges]
    return SampleSubscription(sample.facts, captured)


def _by_label(scene: SampleSubscription) -> dict[str, ChargeCaptured]:
    return {c.charge_id.rsplit("-", 1)[1]: c for c in scene.charges}


def _refunds(ledger: dict, gateway_charge_id: str) -> list[dict]:
    return [e for e in ledger["effects"] if e["type"] in ("refund", "reversal")
            and e["gateway_charge_id"] == gateway_charge_id]


def _refund_calls(ledger: dict, gateway_charge_id: str) -> list[dict]:
    return [c for c in ledger["calls"] if c["path"] == "/v1/refunds"
            and (c["body"] or {}).get("gateway_charge_id") == gateway_charge_id]


async def _dispute(client, rid: str) -> dict:  # type: ignore[no-untyped-def]
    found = await client.dispute(rid)
    assert found is not None, f"no dispute {rid}"
    return found


def _steps(found: dict) -> list[tuple[str, str | None]]:
    return [(a["step"], a["charge_id"]) for a in found["audit"]]


def _outcomes(found: dict) -> dict[str, tuple[str, str]]:
    return {c["charge_id"]: (c["outcome"], c["reason"]) for c in found["charges"]}


def _history(status: dict) -> list[str]:
    return [h["message"] for h in status["history"]]


def _text(mail) -> str:  # type: ignore[no-untyped-def]
    return " ".join(mail.get_body(("plain",)).get_content().split())


async def _mails_of(smtp, rid: str, count: int) -> dict:  # type: ignore[no-untyped-def]
    await smtp.wait_until(lambda msgs: len([m for m in msgs if m["X-Cancelflow-Request-Id"] == rid]) >= count)
    mails = _mails(smtp, rid)
    assert len(mails) == count, [m["X-Cancelflow-Kind"] for m in mails]
    return {m["X-Cancelflow-Kind"]: m for m in mails}


async def test_two_identical_charges_the_later_is_refunded_once(client, watcher, smtp, stack, ids, today):
    scene = _scene(ids, today, "dup", [("a", 3, "30.00"), ("b", 2, "30.00")])
    a, b = _by_label(scene)["a"], _by_label(scene)["b"]
    await client.load_for_dispute([scene])

    rid = await client.request_cancellation(account_id=ids["account"], charge_ids=[b.charge_id],
                                            reason="charged twice")
    status = await _finish(watcher, rid)

    assert status["state"] == "completed" and status["error"] is None
    assert status["target"] == "charges" and status["charge_ids"] == [b.charge_id]
    assert status["refund"] == {"amount": "30.00", "currency": "USD", "status": "succeeded"}
    _versions_step_by_one(watcher, rid)
    gateway = await _ledger(client, client.endpoints.gateway)
    refunds = _refunds(gateway, b.gateway_charge_id)
    assert [(r["type"], r["amount"], r["idempotency_key"]) for r in refunds] == [
        ("reversal", "30.00", f"cf-dispute-{rid}-{b.charge_id}")]  # unsettled: the gateway reverses it
    assert _refunds(gateway, a.gateway_charge_id) == []
    _, guard = await client.get_json(f"{client.endpoints.payment_gateway}/charges/{b.charge_id}")
    assert guard["refundable"] == "0.00"

    found = await _dispute(client, rid)
    assert found["dispute"]["state"] == "completed"
    assert _steps(found) == [("received", None), ("validated", None), ("detected", b.charge_id),
                             ("gateway_verified", b.charge_id), ("refund_requested", b.charge_id),
                             ("refund_issued", b.charge_id), ("completed", None)]
    assert {a["actor"] for a in found["audit"]} == {"customer cli via storefront", "dispute", "payment_gateway"}
    assert all(a["at"] for a in found["audit"])
    detected = next(a for a in found["audit"] if a["step"] == "detected")
    assert detected["data"]["related_charge_id"] == a.charge_id and detected["data"]["duplicate"] is True
    history = _history(status)
    for step in found["audit"]:
        if step["step"] not in ("received", "completed"):
            assert step["message"] in history, step
    assert "customer@example.com" not in str(found)  # no PII over HTTP

    mails = await _mails_of(smtp, rid, 1)
    mail = mails["charges_refunded"]
    assert mail["Subject"] == "Duplicate Charges Refunded" and mail["To"] == "customer@example.com"
    body = _text(mail)
    assert b.charge_id in body and "30.00 USD" in body and "Reversal" in body and rid in body
    assert a.charge_id not in body

    # Support reads the same trail with `cancelflow dispute REQUEST_ID`.
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cancelflow_tools", "dispute", rid, env={**stack.env, "COLUMNS": "250"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = (await asyncio.wait_for(cli.communicate(), 60))[0].decode()
    assert cli.returncode == 0, output
    for text in ("completed", b.charge_id, "refund_requested", "gateway_verified", "refund_issued", "reversal",
                 f"cf-dispute-{rid}-{b.charge_id}"):
        assert text in output, text


async def test_triple_charge_refunds_the_two_copies(client, watcher, smtp, ids, today):
    scene = _scene(ids, today, "tri", [("a", 30, "19.99"), ("b", 29.5, "19.99"), ("c", 28, "19.99")])
    a, b, c = (_by_label(scene)[k] for k in "abc")
    await client.load_for_dispute([scene])

    rid = await client.request_cancellation(account_id=ids["account"], charge_ids=[b.charge_id, c.charge_id])
    status = await _finish(watcher, rid)

    assert status["state"] == "completed"
    assert status["refund"] == {"amount": "39.98", "currency": "USD", "status": "succeeded"}
    gateway = await _ledger(client, client.endpoints.gateway)
    for charge in (b, c):  # more than 24 h old: settled, so refunded rather than reversed
        assert [(r["type"], r["amount"]) for r in _refunds(gateway, charge.gateway_charge_id)] == [
            ("refund", "19.99")]
    assert _refunds(gateway, a.gateway_charge_id) == []
    found = await _dispute(client, rid)
    assert _outcomes(found) == {b.charge_id: ("refunded", "duplicate"), c.charge_id: ("refunded", "duplicate")}
    assert [c["related_charge_id"] for c in found["charges"]] == [a.charge_id, a.charge_id]

    body = _text((await _mails_of(smtp, rid, 1))["charges_refunded"])
    assert b.charge_id in body and c.charge_id in body and "39.98 USD" in body


async def test_earliest_of_its_group_goes_to_review_and_the_copy_is_refunded(client, watcher, smtp, ids, today):
    scene = _scene(ids, today, "first", [("a", 5, "30.00"), ("b", 4, "30.00")])
    a, b = _by_label(scene)["a"], _by_label(scene)["b"]
    await client.load_for_dispute([scene])

    rid = await client.request_cancellation(account_id=ids["account"], charge_ids=[a.charge_id, b.charge_id])
    status = await _finish(watcher, rid)

    assert status["state"] == "manual_review"
    assert status["error"]["source"] == "payment" and status["error"]["code"] == "manual_review"
    assert a.charge_id in status["error"]["message"] and "first of its group" in status["error"]["message"]
    # The part that was refunded stays visible.
    assert status["refund"] == {"amount": "30.00", "currency": "USD", "status": "succeeded"}
    gateway = await _ledger(client, client.endpoints.gateway)
    assert len(_refunds(gateway, b.gateway_charge_id)) == 1
    assert _refunds(gateway, a.gateway_charge_id) == []
    found = await _dispute(client, rid)
    assert _outcomes(found) == {a.charge_id: ("manual_review", "earliest_of_group"),
                                b.charge_id: ("refunded", "duplicate")}
    assert ("escalated", None) in _steps(found)
    assert any(m.startswith("Escalated to support") for m in _history(status))

    mails = await _mails_of(smtp, rid, 2)
    assert set(mails) == {"manual_review", "support_manual_review"}
    customer = _text(mails["manual_review"])
    assert "We have refunded 1 of the charges you reported" in customer
    assert a.charge_id in customer and b.charge_id in customer and "Under review" in customer
    support = mails["support_manual_review"]
    assert support["To"] == SUPPORT
    alert = _text(support)
    for fact in (rid, ids["account"], a.charge_id, a.gateway_charge_id, b.gateway_charge_id,
                 f"cf-dispute-{rid}-{b.charge_id}", "earliest_of_group", "30.00"):
        assert fact in alert, fact


@pytest.mark.parametrize(("case", "charges", "reason"), [
    ("outside_window", [("a", 100, "30.00"), ("b", 1, "30.00")], "outside_window"),
    ("different_amount", [("a", 3, "30.00"), ("b", 2, "35.00")], "different_amount"),
])
async def test_not_provably_a_duplicate_goes_to_review_untouched(client, watcher, smtp, ids, today, case, charges,
                                                                 reason):
    scene = _scene(ids, today, case.replace("_", ""), charges)
    a, b = _by_label(scene)["a"], _by_label(scene)["b"]
    await client.load_for_dispute([scene])

    rid = await client.request_cancellation(account_id=ids["account"], charge_ids=[b.charge_id])
    status = await _finish(watcher, rid)

    assert status["state"] == "manual_review" and status["refund"] is None
    gateway = await _ledger(client, client.endpoints.gateway)
    assert _refund_calls(gateway, b.gateway_charge_id) == [] and _refund_calls(gateway, a.gateway_charge_id) == []
    found = await _dispute(client, rid)
    assert _outcomes(found) == {b.charge_id: ("manual_review", reason)}
    assert [s for s, _ in _steps(found)] == ["received", "validated", "detected", "escalated"]
    mails = await _mails_of(smtp, rid, 2)
    assert "passed to our support team for review" in _text(mails["manual_review"])
    assert reason in _text(mails["support_manual_review"])


@pytest.mark.parametrize("state", ["refunded", "disputed"])
async def test_charge_the_gateway_reports_refunded_or_disputed_goes_to_review(client, watcher, smtp, ids, today,
                                                                            state):
    scene = _scene(ids, today, f"gw{state[:4]}", [("a", 3, "30.00"), ("b", 2, "30.00")])
    b = _by_label(scene)["b"]
    await client.load_for_dispute([scene])
    await client.post_json(f"{client.endpoints.gateway}/_sandbox/charges/{b.gateway_charge_id}/state",
                           {"state": state})

    rid = await client.request_cancellation(account_id=ids["account"], charge_ids=[b.charge_id])
    status = await _finish(watcher, rid)

    assert status["state"] == "manual_review"
    gateway = await _ledger(client, client.endpoints.gateway)
    assert _refund_calls(gateway, b.gateway_charge_id) == []
    found = await _dispute(client, rid)
    expected = "already_refunded" if state == "refunded" else "disputed"
    assert _outcomes(found) == {b.charge_id: ("manual_review", expected)}
    assert found["charges"][0]["gateway_state"] == state
    verified = next(a for a in found["audit"] if a["step"] == "gateway_verified")
    assert verified["actor"] == "payment_gateway" and verified["data"]["state"] == state
    mails = await _mails_of(smtp, rid, 2)
    assert state in _text(mails["support_manual_review"])


@pytest.mark.parametrize("case", ["not_owner", "unknown_charge"])
async def test_another_accounts_or_unknown_charge_is_rejected(client, watcher, smtp, ids, today, case):
    mine = _scene(ids, today, f"own{case[:3]}", [("a", 3, "30.00"), ("b", 2, "30.00")])
    theirs = _scene(ids, today, f"their{case[:3]}", [("x", 2, "99.00")], account=ids["other_account"])
    await client.load_for_dispute([mine, theirs])
    b, x = _by_label(mine)["b"], _by_label(theirs)["x"]
    listed = [b.charge_id, x.charge_id if case == "not_owner" else f"ch-missing-{ids['tag']}"]

    rid = await client.request_cancellation(account_id=ids["account"], charge_ids=listed)
    status = await watcher.terminal(rid)

    assert status["state"] == "rejected"
    assert status["error"]["source"] == "validation" and status["error"]["code"] == case
    assert "99.00" not in str(status) and ids["other_account"] not in str(status)
    gateway = await _ledger(client, client.endpoints.gateway)
    touched = [c for c in gateway["calls"] if c["path"] != "/v1/charges"  # captures set the scene
               and (b.gateway_charge_id in str(c) or x.gateway_charge_id in str(c))]
    assert touched == []  # nothing asked of the gateway: validation comes before any side effect
    found = await _dispute(client, rid)
    assert found["dispute"]["state"] == "rejected" and found["dispute"]["error_code"] == case
    assert "99.00" not in str(found)
    # A marker request behind it on the same partition (same account key): no email came for the rejection.
    marker = await client.request_cancellation(account_id=ids["account"], charge_ids=[f"ch-none-{ids['tag']}"])
    await watcher.terminal(marker)
    assert _mails(smtp, rid) == []


async def test_redelivered_request_refunds_and_mails_once(client, watcher, smtp, stack, ids, today):
    scene = _scene(ids, today, "redeliver", [("a", 3, "30.00"), ("b", 2, "30.00")])
    b = _by_label(scene)["b"]
    await client.load_for_dispute([scene])
    request = CancellationRequested(
        request_id=uuid.uuid4(), account_id=ids["account"], target="charges", charge_ids=[b.charge_id],
        requested_by={"user_id": "u", "role": "customer", "channel": "storefront"})
    rid = str(request.request_id)
    await client.publisher.publish(request)
    done = await _finish(watcher, rid)
    assert done["state"] == "completed"

    # The same request again (new event id), and the saga's records re-delivered byte for byte.
    await client.publisher.publish(request)
    for event_type in ("CancellationReceived", "DuplicateRefundRequested", "DuplicateRefundsIssued", "RefundIssued"):
        record = await _read_saga_record(stack.endpoints.bootstrap, rid, event_type)
        await client.publisher.send_raw(topics.SAGA, record, key=rid)
    # A marker dispute behind them on the same saga partition proves every service consumed them.
    marker = str(id_on_same_saga_partition(rid))
    await client.request_cancellation(account_id=ids["account"], charge_ids=[b.charge_id],
                                      request_id=uuid.UUID(marker))
    marked = await _finish(watcher, marker)
    assert marked["state"] == "manual_review"  # b is refunded already: the gateway says so

    assert watcher.latest[rid]["version"] == done["version"]
    gateway = await _ledger(client, client.endpoints.gateway)
    assert len(_refunds(gateway, b.gateway_charge_id)) == 1
    assert len(_mails(smtp, rid)) == 1
    found = await _dispute(client, rid)
    assert [s for s, _ in _steps(found)].count("refund_issued") == 1
    assert _outcomes(await _dispute(client, marker)) == {b.charge_id: ("manual_review", "already_refunded")}


async def test_dispute_and_cancellation_race_for_the_same_charge(client, watcher, smtp, ids, today):
    """A duplicate of this period's charge is disputed while the subscription is cancelled: both refunds
    draw on the same charges through one guard, so nothing is refunded twice or beyond what was paid."""
    scene = _scene(ids, today, "race", [("a", 50, "30.00"), ("b", 49, "30.00")])
    a, b = _by_label(scene)["a"], _by_label(scene)["b"]
    await client.load_for_dispute([scene])

    cancellation, dispute = await asyncio.gather(
        client.request_cancellation(account_id=ids["account"], subscription_id=scene.facts.subscription_id),
        client.request_cancellation(account_id=ids["account"], charge_ids=[b.charge_id]))
    cancelled = await _finish(watcher, cancellation)
    disputed = await _finish(watcher, dispute)

    assert cancelled["state"] == "completed"
    gateway = await _ledger(client, client.endpoints.gateway)
    on_a = [Decimal(r["amount"]) for r in _refunds(gateway, a.gateway_charge_id)]
    on_b = [Decimal(r["amount"]) for r in _refunds(gateway, b.gateway_charge_id)]
    assert len(on_b) == 1  # b is refunded once, by one of them
    assert sum(on_a) <= Decimal("30.00")
    # Our guard stopped the loser before the gateway: it never had to refuse an amount.
    assert not [c for c in gateway["calls"] if c["path"] == "/v1/refunds"
                and isinstance(c["response"], int) and c["response"] >= 400]
    found = await _dispute(client, dispute)
    _, guard_b = await client.get_json(f"{client.endpoints.payment_gateway}/charges/{b.charge_id}")
    if disputed["state"] == "completed":
        # The dispute won (b refunded in full): the cancellation refunded the unused part of a only.
        assert on_b == [Decimal("30.00")] and guard_b["refundable"] == "0.00"
        assert cancelled["refund"]["amount"] == "20.00" and on_a == [Decimal("20.00")]
        assert _outcomes(found) == {b.charge_id: ("refunded", "duplicate")}
    else:
        # The cancellation won: 20 of 30 days unused of each charge (section 5, per charge); what is left
        # of b is not the duplicate's full amount: the dispute is reviewed.
        assert disputed["state"] == "manual_review"
        assert on_b == [Decimal("20.00")] and guard_b["refundable"] == "10.00"
        assert cancelled["refund"]["amount"] == "40.00" and on_a == [Decimal("20.00")]
        assert _outcomes(found) == {b.charge_id: ("manual_review", "already_refunded")}
    _, guard_a = await client.get_json(f"{client.endpoints.payment_gateway}/charges/{a.charge_id}")
    assert Decimal(guard_a["refundable"]) == Decimal("30.00") - sum(on_a)
