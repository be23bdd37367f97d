"""Every cancellation mode end to end (end of term, partial, approval, trial) and the money side
under gateway faults: states, history text, ledgers and emails, on SQLite and PostgreSQL stores."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from decimal import Decimal

import pytest

from cancelflow.events import CancellationApproved, CancellationDeclined
from cancelflow_tools.ops import sample_subscription
from tests.conftest import eventually
from tests.e2e.conftest import SUPPORT, awaiting_approval, gateway_answers, loaded_subscription
from tests.e2e.test_cancellation_flow import _effects, _finish, _ledger, _mails

pytestmark = pytest.mark.e2e


def _refund_effects(ledger: dict, request_id: str) -> list[dict]:
    return [e for e in ledger["effects"] if e["type"] in ("refund", "reversal") and e.get("request_id") == request_id]


async def _set_clock(client, days: int) -> None:  # type: ignore[no-untyped-def]
    await client.post_json(f"{client.endpoints.billing}/_clock", {"offset_days": days})


async def _kill_and_wait_restart(client, url: str) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL a service and wait until the supervisor has it answering again (a new pid)."""
    _, health = await client.get_json(f"{url}/healthz")
    os.kill(health["pid"], signal.SIGKILL)
    for _ in range(600):
        try:
            code, now = await client.get_json(f"{url}/healthz")
            if code == 200 and now["pid"] != health["pid"]:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not come back")


async def test_end_of_term_stops_auto_renew_now_and_cancels_when_the_period_ends(client, watcher, smtp, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-eot-{ids['tag']}", today=today,
                                 days_into_period=10, period_days=30)
    period_end = sample.facts.current_period_end
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            mode="end_of_term")

    scheduled = await watcher.wait_for(rid, lambda s: s["state"] == "scheduled" and any(
        h["message"] == "Auto-renew stopped at the payment gateway" for h in s["history"]))
    assert scheduled["access_end_date"] == scheduled["effective_date"] == period_end.isoformat()
    assert (f"Auto-renew is set to off; the subscription will be canceled with effective date "
            f"{period_end.isoformat()}") in [h["message"] for h in scheduled["history"]]
    gateway = await _ledger(client, client.endpoints.gateway)
    assert len(_effects(gateway, "schedule_stopped", subscription_id=sample.facts.subscription_id)) == 1
    _, view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{sample.facts.subscription_id}")
    assert view["subscription"]["auto_renew"] is False and view["subscription"]["status"] == "active"
    vendor = await _ledger(client, client.endpoints.vendor)
    assert _effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id) == []

    # A second request meanwhile is refused: the scheduled one is in flight.
    other = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    assert (await watcher.terminal(other))["error"]["code"] == "provisioning_in_progress"

    # Billing is killed and restarted while the cancellation waits: nothing is lost or repeated.
    await _kill_and_wait_restart(client, client.endpoints.billing)
    try:
        await _set_clock(client, (period_end - today).days)
        status = await _finish(watcher, rid)
    finally:
        await _set_clock(client, 0)

    assert status["state"] == "completed"
    assert status["refund"] == {"amount": "0.00", "currency": "USD", "status": "not_due"}
    assert f"Status is set to canceled with effective date {period_end.isoformat()}" in [
        h["message"] for h in status["history"]]
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1
    assert _refund_effects(await _ledger(client, client.endpoints.gateway), rid) == []
    mail = await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == rid)
    assert mail["Subject"] == "Subscription Cancellation Request Completed"
    assert "no refund is due" in mail.get_body(("plain",)).get_content().lower()


async def test_end_of_term_of_a_period_that_already_ended_runs_at_once(client, watcher, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-eot0-{ids['tag']}", today=today,
                                 days_into_period=30, period_days=30)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            mode="end_of_term")
    status = await _finish(watcher, rid)
    assert status["state"] == "completed" and status["effective_date"] == today.isoformat()
    assert "scheduled" not in [r["state"] for r in watcher.history_of(rid)]


async def test_partial_cancellation_reduces_licenses_and_refunds_the_removed_share(client, watcher, smtp, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-part-{ids['tag']}", today=today,
                                 price="10.00", quantity=5, days_into_period=10, period_days=30)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            quantity=2)

    status = await _finish(watcher, rid)

    assert status["state"] == "completed"
    assert status["subscription_status"] == "active"
    assert f"Quantity is set to 3 with effective date {today.isoformat()}" in [h["message"] for h in status["history"]]
    assert status["refund"]["amount"] == "13.33"  # 50.00 * 20/30 * 2/5, half-even
    vendor = await _ledger(client, client.endpoints.vendor)
    changes = _effects(vendor, "quantity_change", vendor_subscription_id=sample.facts.vendor_subscription_id)
    assert [(c["from"], c["to"]) for c in changes] == [(5, 3)]
    assert _effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id) == []
    _, view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{sample.facts.subscription_id}")
    assert view["subscription"]["quantity"] == 3 and view["subscription"]["auto_renew"] is True
    mail = await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == rid)
    assert "13.33" in mail.get_body(("plain",)).get_content()

    whole = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                              quantity=3)
    assert (await watcher.terminal(whole))["error"]["code"] == "invalid_quantity"


async def test_approval_waits_without_side_effects_then_runs(client, watcher, ids, today):
    sample, rid, pending = await awaiting_approval(client, watcher, account_id=ids["account"],
                                           subscription_id=f"sub-appr-{ids['tag']}", today=today)
    assert pending["provisioning_status"] == "Synchronized"
    vendor = await _ledger(client, client.endpoints.vendor)
    assert not [c for c in vendor["calls"] if sample.facts.vendor_subscription_id in c["path"]]

    await client.publisher.publish(CancellationApproved(request_id=uuid.UUID(rid), decided_by="op-jane",
                                                        note="ok"))
    status = await _finish(watcher, rid)
    assert status["state"] == "completed" and status["refund"]["status"] == "succeeded"


async def test_declined_request_ends_declined_and_the_customer_is_told(client, watcher, smtp, ids, today):
    sample, rid, _ = await awaiting_approval(client, watcher, account_id=ids["account"],
                                           subscription_id=f"sub-decl-{ids['tag']}", today=today)
    await client.publisher.publish(CancellationDeclined(request_id=uuid.UUID(rid), decided_by="op-jane",
                                                        note="contract term not over"))

    status = await watcher.terminal(rid, emails=1)
    assert status["state"] == "declined" and status["subscription_status"] == "active"
    mail = await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == rid)
    assert mail["X-Cancelflow-Kind"] == "declined"
    assert "contract term not over" in mail.get_body(("plain",)).get_content()
    vendor = await _ledger(client, client.endpoints.vendor)
    assert not [c for c in vendor["calls"] if sample.facts.vendor_subscription_id in c["path"]]


async def test_trial_is_cancelled_vendor_first_and_never_refunded(client, watcher, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-trial-{ids['tag']}", today=today,
                                 status="trial")
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    status = await _finish(watcher, rid)
    assert status["state"] == "completed" and status["refund"]["status"] == "not_due"
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1
    assert _refund_effects(await _ledger(client, client.endpoints.gateway), rid) == []


async def test_lost_gateway_answer_is_resolved_by_key_lookup_not_a_second_refund(client, watcher, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-drop-{ids['tag']}",
                                       today=today)
    await gateway_answers(client, sample.charges[0].gateway_charge_id, {"succeed_then_drop": True})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    status = await _finish(watcher, rid)

    assert status["state"] == "completed" and status["refund"]["amount"] == "20.00"
    refunds = _refund_effects(await _ledger(client, client.endpoints.gateway), rid)
    assert len(refunds) == 1 and Decimal(refunds[0]["amount"]) == Decimal("20.00")


async def test_gateway_refusal_ends_in_manual_review_with_the_cancellation_kept(client, watcher, smtp, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-402-{ids['tag']}",
                                       today=today)
    await gateway_answers(client, sample.charges[0].gateway_charge_id, {"status": 402, "error": "card_account_closed"})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    status = await _finish(watcher, rid)

    assert status["state"] == "manual_review" and status["error"]["source"] == "payment"
    assert status["subscription_status"] == "canceled"
    assert status["refund"] == {"amount": "20.00", "currency": "USD", "status": "failed"}
    assert _refund_effects(await _ledger(client, client.endpoints.gateway), rid) == []
    _, alert = await _manual_review_mails(smtp, rid)
    assert f"cf-refund-{rid}-{sample.charges[0].charge_id}" in alert


async def test_concurrent_requests_for_one_subscription_refund_exactly_once(client, watcher, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-race-{ids['tag']}",
                                       today=today)
    rids = await asyncio.gather(*[
        client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
        for _ in range(20)])

    finals = [await watcher.terminal(rid) for rid in rids]

    assert sorted(f["state"] for f in finals) == ["completed"] + ["rejected"] * 19
    assert {f["error"]["code"] for f in finals if f["state"] == "rejected"} <= {"provisioning_in_progress",
                                                                                 "not_active"}
    winner = next(r for r, f in zip(rids, finals, strict=True) if f["state"] == "completed")
    await _finish(watcher, winner)
    gateway = await _ledger(client, client.endpoints.gateway)
    refunds = [e for e in gateway["effects"] if e["type"] in ("refund", "reversal")
               and e["gateway_charge_id"] == sample.charges[0].gateway_charge_id]
    assert len(refunds) == 1
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1


async def test_past_dated_before_the_period_started_is_rejected_but_period_start_is_fine(client, watcher, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-pds-{ids['tag']}",
                                       today=today)
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            mode="past_dated",
                                            effective_date=sample.facts.current_period_start)
    status = await _finish(watcher, rid)
    assert status["state"] == "completed" and status["refund"]["amount"] == "30.00"


async def test_licenses_removed_in_steps_with_a_refresh_between_refund_what_one_request_would(
        client, watcher, ids, today):
    """5 licenses at 30.00, a third used: remove 2, the upstream platform refreshes with 5, remove 4,
    cancel the rest. 100.00 of 150.00 (it was 132.89)."""
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-steps-{ids['tag']}", today=today,
                                 price="30.00", quantity=5, days_into_period=10, period_days=30)
    subscription_id = sample.facts.subscription_id
    await client.load([sample])
    first = await client.request_cancellation(account_id=ids["account"], subscription_id=subscription_id, quantity=2)
    assert (await _finish(watcher, first))["refund"]["amount"] == "40.00"

    _, before = await client.get_json(f"{client.endpoints.billing}/subscriptions/{subscription_id}")

    async def refreshed() -> bool:
        _, view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{subscription_id}")
        return view["subscription"]["updated_at"] > before["subscription"]["updated_at"]

    await client.publisher.publish(sample.facts, correlation_id=subscription_id)  # quantity 5 again, upstream
    await eventually(refreshed, message="billing applied the refresh")
    _, view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{subscription_id}")
    assert view["subscription"]["quantity"] == 3  # the licenses our cancellation removed stay removed

    four = await client.request_cancellation(account_id=ids["account"], subscription_id=subscription_id, quantity=4)
    assert (await watcher.terminal(four))["error"]["code"] == "invalid_quantity"
    rest = await client.request_cancellation(account_id=ids["account"], subscription_id=subscription_id)
    assert (await _finish(watcher, rest))["refund"]["amount"] == "60.00"
    gateway = await _ledger(client, client.endpoints.gateway)
    refunded = [Decimal(e["amount"]) for e in gateway["effects"] if e["type"] in ("refund", "reversal")
                and e["gateway_charge_id"] == sample.charges[0].gateway_charge_id]
    assert sum(refunded) == Decimal("100.00")


async def test_a_charge_in_another_currency_ends_in_manual_review_with_support_alerted(
        client, watcher, smtp, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-eur-{ids['tag']}", today=today)
    charge = sample.charges[0].model_copy(update={"currency": "EUR"})
    await client.load([type(sample)(sample.facts, [charge])])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    status = await _finish(watcher, rid)

    assert status["state"] == "manual_review"  # was completed, "No refund is due"
    assert (status["error"]["source"], status["error"]["code"]) == ("payment", "currency_mismatch")
    assert status["subscription_status"] == "canceled"
    assert _refund_effects(await _ledger(client, client.endpoints.gateway), rid) == []
    told, alert = await _manual_review_mails(smtp, rid)
    assert charge.charge_id in alert and "EUR" in alert
    assert "No refund is due" not in told


async def _manual_review_mails(smtp, rid: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The two emails of a request set aside, as plain text: the customer's, and support's alert (to SUPPORT)."""
    await smtp.wait_until(lambda msgs: len([m for m in msgs if m["X-Cancelflow-Request-Id"] == rid]) == 2)
    kinds = {m["X-Cancelflow-Kind"]: m for m in _mails(smtp, rid)}
    assert set(kinds) == {"manual_review", "support_manual_review"}
    assert kinds["support_manual_review"]["To"] == SUPPORT
    plain = {kind: mail.get_body(("plain",)).get_content() for kind, mail in kinds.items()}
    return plain["manual_review"], plain["support_manual_review"]
