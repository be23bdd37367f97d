"""Payment-gateway killed (kill -9; the stack restarts it) while upstream publishes subscriptions with
their charges and the cancellations go through billing and the vendor: it comes back to a backlog of
charges and `PlatformCommitted`, and every refund owed is paid in full. A refund met before the charges
published ahead of it waits for them (payment_gateway.waits) instead of ending `not_due`, 0.00."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from decimal import Decimal

import pytest

from cancelflow_tools.ops import sample_subscription
from tests.e2e.conftest import publish_with_charges, service_back

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FILLER = 8000



async def test_refunds_committed_while_payment_gateway_restarts_are_paid_in_full(
        stack, client, watcher, ids, today) -> None:  # type: ignore[no-untyped-def]
    """Two rounds of 10: payment-gateway killed, 10 subscriptions and their charges published, their
    immediate cancellations a second later. Every request completes with its refund of 20.00 (30.00 a
    month, 10 days used), none `not_due`."""
    request_ids = []
    for round_ in range(2):
        killed = stack.service_pid("payment_gateway")
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        samples = [sample_subscription(account_id=ids["account"], subscription_id=f"sub-p{round_}-{i}-{ids['tag']}",
                                       today=today) for i in range(10)]
        # A backlog of other charges ahead of theirs: more than one fetch of the charges' partition (4 MiB)
        # brings, so the first polls after the restart hold the saga's records but not these charges.
        filler = sample_subscription(account_id=f"{ids['account']}-other", subscription_id=f"sub-other-{round_}",
                                     today=today).charges[0]
        for n in range(FILLER):
            await client.publisher.publish(filler.model_copy(update={"charge_id": f"ch-other-{round_}-{n}"}),
                                           correlation_id=f"ch-other-{round_}-{n}", wait=False)
        for sample in samples:
            await publish_with_charges(client, sample)
        await client.publisher.flush()
        await asyncio.sleep(1)  # the cancellations follow their subscriptions a second later
        for sample in samples:
            request_ids.append(await client.request_cancellation(
                account_id=ids["account"], subscription_id=sample.facts.subscription_id, wait=False))
        await client.publisher.flush()
        await service_back(stack, client, "payment_gateway", killed)

    outcomes = Counter()
    for rid in request_ids:
        status = await watcher.terminal(rid, timeout=120)
        refund = status["refund"] or {}
        outcomes[(status["state"], refund.get("status"), str(Decimal(str(refund.get("amount", "0")))))] += 1
    assert outcomes == {("completed", "succeeded", "20.00"): 20}, outcomes
