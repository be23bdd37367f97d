"""A charge with a negative or zero amount on payments.charges is bad input (CONTRACT.md sections 5 and
7): payment-gateway dead-letters it with a readable reason, records nothing of it, and the valid charge
behind it on the partition is recorded. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, date, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from cancelflow import topics
from cancelflow.events import ChargeCaptured, envelope_for
from cancelflow.messaging.codec import encode
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(120)


def charge(account: str, charge_id: str, amount: str) -> bytes:
    valid = ChargeCaptured(charge_id=charge_id, account_id=account, subscription_id=f"sub-{account}", amount="30.00",
                           currency="USD", captured_at=datetime(2026, 11, 1, tzinfo=UTC),
                           gateway_charge_id=f"gw-{charge_id}", period_start=date(2026, 11, 1),
                           period_end=date(2026, 12, 1))
    envelope = orjson.loads(encode(envelope_for(valid, producer="platform", correlation_id=account,
                                                causation_id=None)))
    envelope["payload"]["amount"] = amount
    return orjson.dumps(envelope)


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status


async def test_a_negative_or_zero_charge_is_dead_lettered_and_nothing_is_recorded(
        store: Any, services: Any, publisher: Any, topic_reader: Any) -> None:
    running = await services.start_service("payment_gateway", store("payment_gateway"),
                                           GATEWAY_API_URL="http://127.0.0.1:9")
    dlq = await topic_reader(topics.DLQ)
    account = f"acct-{uuid.uuid4().hex[:10]}"
    bad = {f"ch-neg-{account}": "-30.00", f"ch-zero-{account}": "0.00"}
    for charge_id, amount in bad.items():
        await publisher.send_raw(topics.PAYMENTS_CHARGES, charge(account, charge_id, amount), key=account)
    good = f"ch-ok-{account}"
    await publisher.send_raw(topics.PAYMENTS_CHARGES, charge(account, good, "30.00"), key=account)

    async def recorded() -> bool:
        return await status_of(f"{running.http_url}/charges/{good}") == 200

    await eventually(recorded, message="the valid charge behind the bad ones recorded")
    for charge_id, amount in bad.items():
        entry = await dlq.wait_for(lambda e, c=charge_id: e.event_type == "RecordDeadLettered"
                                   and e.payload["consumer_group"] == running.group_id
                                   and c.encode() in base64.b64decode(e.payload["original_base64"] or ""))
        assert entry.payload["reason"] == "invalid_payload"
        assert "amount" in entry.payload["detail"], entry.payload["detail"]
        assert entry.payload["original_key"] == account
        assert await status_of(f"{running.http_url}/charges/{charge_id}") == 404, amount
