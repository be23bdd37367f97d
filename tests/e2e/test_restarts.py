"""Restarts that must lose nothing (issue 24): billing killed while upstream keeps publishing."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from cancelflow.ops import sample_subscription

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def _billing_back(stack, client, killed: int) -> None:  # type: ignore[no-untyped-def]
    """Until the restarted billing (another pid) is ready: consuming again."""
    deadline = asyncio.get_running_loop().time() + 90
    while asyncio.get_running_loop().time() < deadline:
        pid = stack.service_pid("billing")
        if pid is not None and pid != killed:
            try:
                code, _ = await client.get_json(f"{client.endpoints.billing}/readyz")
            except OSError:
                code = 0
            if code == 200:
                return
        await asyncio.sleep(0.2)
    raise AssertionError("billing did not come back")


async def test_requests_published_while_billing_restarts_are_not_rejected_as_unknown(
        stack, client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    """Billing killed (kill -9; the stack restarts it); while it is down, 10 subscriptions are published,
    and 1 s later their cancellations. Three rounds: every request completes, none is rejected as
    `unknown_subscription` (billing met the requests before the facts published ahead of them)."""
    request_ids = []
    for round_ in range(3):
        killed = stack.service_pid("billing")
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        samples = [sample_subscription(account_id=ids["account"], subscription_id=f"sub-r{round_}-{i}-{ids['tag']}",
                                       today=today) for i in range(10)]
        for sample in samples:
            await client.publisher.publish(sample.facts, correlation_id=sample.facts.subscription_id, wait=False)
            for charge in sample.charges:
                await client.post_json(f"{client.endpoints.gateway}/v1/charges", {
                    "amount": f"{charge.amount:.2f}", "currency": charge.currency,
                    "account_id": charge.account_id, "subscription_id": charge.subscription_id,
                    "gateway_charge_id": charge.gateway_charge_id, "captured_at": charge.captured_at.isoformat()})
                await client.publisher.publish(charge, correlation_id=charge.charge_id, wait=False)
        await client.publisher.flush()
        await asyncio.sleep(1)  # the scenario: the cancellations follow their subscriptions a second later
        for sample in samples:
            request_ids.append(await client.request_cancellation(
                account_id=ids["account"], subscription_id=sample.facts.subscription_id, wait=False))
        await client.publisher.flush()
        await _billing_back(stack, client, killed)

    outcomes = {}
    for rid in request_ids:
        status = await watcher.terminal(rid, timeout=120)
        outcomes[rid] = (status["state"], (status["error"] or {}).get("code"))
    assert sorted(outcomes.values()) == [("completed", None)] * 30, outcomes
