"""Support operators acting through the status service of a running stack (CONTRACT.md section 11):
`cancelflow up` made the operator, whose token the client and the CLI find in the data dir.

Approve a storefront request; retry after a platform failure (one vendor effect in all); retry a
refused refund (one refund in all); cancel on a customer's behalf from the CLI; and nothing without
a token."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from cancelflow_tools.ops import sample_subscription
from tests.e2e.test_cancellation_flow import _effects, _ledger

pytestmark = [pytest.mark.e2e, pytest.mark.broker_agnostic]


async def _act(client, path: str, body: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    code, answer = await client.act(path, body)
    assert code == 202, (path, code, answer)
    return answer  # type: ignore[no-any-return]


async def test_the_status_service_needs_the_operators_token(client) -> None:  # type: ignore[no-untyped-def]
    assert client.token, "cancelflow up made an operator and left its token in the data dir"
    async with aiohttp.ClientSession() as plain:
        async with plain.get(f"{client.endpoints.status}/requests") as response:
            assert response.status == 401
        async with plain.get(f"{client.endpoints.status}/healthz") as response:
            assert response.status == 200
    assert (await client.get_json(f"{client.endpoints.status}/requests"))[0] == 200


async def test_an_operator_approves_a_storefront_request(client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ap-{ids['tag']}", today=today)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            requires_approval=True)
    await watcher.wait_for(rid, lambda s: s["state"] == "pending_approval", timeout=60)

    await _act(client, f"/requests/{rid}/approve", {"note": "customer confirmed by phone"})
    status = await watcher.terminal(rid, timeout=60)
    assert status["state"] == "completed"
    assert "Approved by admin: customer confirmed by phone" in [h["message"] for h in status["history"]]
    code, _ = await client.act(f"/requests/{rid}/approve", {})
    assert code == 409


async def test_a_retry_after_a_platform_failure_completes_without_a_second_vendor_effect(
        client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-rt-{ids['tag']}", today=today,
                                 price="30.00", days_into_period=10, period_days=30)
    await client.load([sample])
    await client.post_json(f"{client.endpoints.billing}/_faults",
                           {"subscription_id": sample.facts.subscription_id, "stage": "commit"})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    failed = await watcher.terminal(rid, timeout=60)
    assert failed["state"] == "failed" and failed["error"]["source"] == "platform"

    answer = await _act(client, f"/requests/{rid}/retry", {"note": "platform fixed"})
    new_id = answer["request_id"]
    done = await watcher.terminal(new_id, timeout=60)
    assert done["state"] == "completed" and done["retry_of"] == rid
    assert done["refund"] == {"amount": "20.00", "currency": "USD", "status": "succeeded"}
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1
    # Not even asked again: provisioning has the change on record as done by the failed request.
    calls = [c for c in vendor["calls"] if sample.facts.vendor_subscription_id in c["path"]]
    assert len(calls) == 1, calls
    assert any("it was already canceled there" in h["message"] for h in done["history"])
    # The failed request stays failed and says what was done about it.
    resolved = await watcher.wait_for(rid, lambda s: s.get("resolution") is not None, timeout=30)
    assert resolved["state"] == "failed"
    assert resolved["resolution"]["action"] == "retry" and resolved["resolution"]["request_id"] == new_id
    assert resolved["resolution"]["by"] == "admin"
    _, audit = await client.get_json(f"{client.endpoints.status}/audit?request_id={rid}")
    assert [(a["action"], a["status"], a["new_request_id"]) for a in audit["items"]] == [("retry", 202, new_id)]


async def test_a_refused_refund_is_retried_once_by_an_operator(client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-rr-{ids['tag']}", today=today,
                                 price="30.00", days_into_period=10, period_days=30)
    await client.load([sample])
    gateway_charge = sample.charges[0].gateway_charge_id
    await client.post_json(f"{client.endpoints.gateway}/_sandbox/rules", {
        "match": {"gateway_charge_id": gateway_charge},
        "respond": {"status": 402, "error": "card_account_closed"}, "times": 1})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    review = await watcher.terminal(rid, timeout=60)
    assert review["state"] == "manual_review" and review["error"]["code"] == "refund_failed"

    answer = await _act(client, f"/requests/{rid}/resolve", {"action": "retry_refund", "note": "new card on file"})
    done = await watcher.terminal(answer["request_id"], timeout=60)
    assert done["state"] == "completed" and done["refund"]["amount"] == "20.00"
    code, _ = await client.act(f"/requests/{rid}/resolve", {"action": "retry_refund"})
    assert code == 409
    gateway = await _ledger(client, client.endpoints.gateway)
    refunds = [e for e in gateway["effects"] if e["type"] in ("refund", "reversal")
               and e.get("gateway_charge_id") == gateway_charge]
    assert [e["amount"] for e in refunds] == ["20.00"]
    resolved = await watcher.wait_for(rid, lambda s: s.get("resolution") is not None, timeout=30)
    assert resolved["state"] == "manual_review" and resolved["resolution"]["action"] == "retry_refund"


def test_cancel_on_a_customers_behalf_from_the_cli(stack, ids, today) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from cancelflow_tools.ops import StackClient

    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ob-{ids['tag']}", today=today)

    async def load() -> None:
        async with StackClient(stack.endpoints, stack.settings) as client:
            await client.load([sample])

    asyncio.run(load())
    run = subprocess.run(
        [sys.executable, "-m", "cancelflow_tools", "cancel", "--on-behalf", "--account", ids["account"],
         "--subscription", sample.facts.subscription_id, "--reason", "customer called support",
         "--opt-out-of-emails", "--wait"],
        capture_output=True, text=True, timeout=120, env={**stack.env, "COLUMNS": "300"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "requested on the customer's behalf" in run.stdout
    assert "requested by operator admin via bss" in run.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "cancelflow_tools", "cancel", "--on-behalf", "--account", ids["account"],
         "--subscription", sample.facts.subscription_id],
        capture_output=True, text=True, timeout=120, env={**stack.env, "COLUMNS": "300"})
    assert refused.returncode == 2 and "reason" in refused.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "cancelflow_tools", "approve", ids["tag"]], capture_output=True, text=True, timeout=120,
        env={**stack.env, "COLUMNS": "300", "CANCELFLOW_TOKEN": "not-the-token-at-all"})
    assert wrong.returncode == 4 and "401" in wrong.stdout


async def test_a_subscription_as_its_owners_see_it(client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    """The support runbook's step 7: after the cancellation, no billing is scheduled any more."""
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-sv-{ids['tag']}", today=today,
                                 price="30.00", days_into_period=10, period_days=30)
    await client.load([sample])
    url = f"{client.endpoints.status}/subscriptions/{sample.facts.subscription_id}"
    _, before = await client.get_json(url)
    assert before["billing"]["subscription"]["status"] == "active"
    assert [b["status"] for b in before["billing"]["billings"]] == ["scheduled"]
    assert before["payments"]["charges"][0]["refundable"] == "30.00"
    assert before["provisioning"]["operations"] == [] and before["requests"] == []

    answer = await _act(client, "/cancellations", {"account_id": ids["account"],
                                                   "subscription_id": sample.facts.subscription_id,
                                                   "reason": "customer called"})
    assert (await watcher.terminal(answer["request_id"], timeout=60))["state"] == "completed"
    _, after = await client.get_json(url)
    sub = after["billing"]["subscription"]
    assert (sub["status"], sub["provisioning_status"], sub["auto_renew"]) == ("canceled", "Synchronized", False)
    assert [b["status"] for b in after["billing"]["billings"]] == ["canceled"]
    assert [(r["amount"], r["status"]) for r in after["payments"]["refunds"]] == [("20.00", "succeeded")]
    assert [o["status"] for o in after["provisioning"]["operations"]] == ["succeeded"]
    assert [r["request_id"] for r in after["requests"]] == [answer["request_id"]]
    _, unknown = await client.get_json(f"{client.endpoints.status}/subscriptions/nope-{ids['tag']}")
    assert unknown["billing"] == {"unknown": True} and unknown["requests"] == []


def _cli(stack, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "cancelflow_tools", *args], capture_output=True, text=True, timeout=120,
                          env={**stack.env, "COLUMNS": "300"})


async def test_decline_and_close_from_the_cli(stack, client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    pending = sample_subscription(account_id=ids["account"], subscription_id=f"sub-dc-{ids['tag']}", today=today)
    refused = sample_subscription(account_id=ids["account"], subscription_id=f"sub-cl-{ids['tag']}", today=today)
    await client.load([pending, refused])
    await client.post_json(f"{client.endpoints.gateway}/_sandbox/rules", {
        "match": {"gateway_charge_id": refused.charges[0].gateway_charge_id},
        "respond": {"status": 402, "error": "card_account_closed"}, "times": 1})
    waiting = await client.request_cancellation(account_id=ids["account"],
                                                subscription_id=pending.facts.subscription_id, requires_approval=True)
    review = await client.request_cancellation(account_id=ids["account"], subscription_id=refused.facts.subscription_id)
    await watcher.wait_for(waiting, lambda s: s["state"] == "pending_approval", timeout=60)
    await watcher.terminal(review, timeout=60)

    run = await asyncio.to_thread(_cli, stack, "decline", waiting, "--note", "duplicate of another request")
    assert run.returncode == 0 and "decline accepted" in run.stdout, run.stdout + run.stderr
    declined = await watcher.terminal(waiting, timeout=60)
    assert declined["state"] == "declined"
    assert "Declined by admin: duplicate of another request" in [h["message"] for h in declined["history"]]

    wrong = await asyncio.to_thread(_cli, stack, "retry", review)  # manual_review is not failed
    assert wrong.returncode == 1 and "409" in wrong.stdout
    run = await asyncio.to_thread(_cli, stack, "resolve", review, "--action", "close", "--note", "refunded by hand")
    assert run.returncode == 0, run.stdout + run.stderr
    closed = await watcher.wait_for(review, lambda s: s.get("resolution") is not None, timeout=30)
    assert closed["state"] == "manual_review"
    assert (closed["resolution"]["action"], closed["resolution"]["note"]) == ("close", "refunded by hand")
    assert "Closed by admin: refunded by hand" in [h["message"] for h in closed["history"]]
