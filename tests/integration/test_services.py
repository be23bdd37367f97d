"""Each service in-process against the real embedded broker, on SQLite and on PostgreSQL, with the real
vendor and gateway sandboxes over HTTP where the service calls out.

A test publishes the events a service consumes (as upstream apps and the other services would) and
reads what it emits from the topics; ids are fresh per test, so records of earlier tests that a
service also reads are simply handled under their own ids.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import aiohttp
import pytest

from cancelflow import topics
from cancelflow.events import (
    CancellationReceived,
    CancellationRequested,
    ChargeCaptured,
    Customer,
    Mode,
    PlatformCommitted,
    RefundIssued,
    RequestedBy,
    SubscriptionActivated,
    SubscriptionSnapshot,
    VendorCancellationRequested,
    VendorProvisioned,
)
from cancelflow_tools.sandboxes.gateway import build_gateway_app
from cancelflow_tools.sandboxes.vendor import build_vendor_app
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(120)

CUSTOMER = RequestedBy(user_id="u-1", role="customer", channel="storefront")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:  # with a deadline, unlike the suite's
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
def ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {"sub": f"sub-{tag}", "account": f"acct-{tag}", "vendor_sub": f"vsub-{tag}",
            "charge": f"chg-{tag}", "gateway_charge": f"gch-{tag}", "request": str(uuid.uuid4())}


def today() -> date:
    return datetime.now(UTC).date()


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


def of_request(event_type: str, request_id: str):  # type: ignore[no-untyped-def]
    return lambda e: e.event_type == event_type and e.payload["request_id"] == request_id


def subscription_facts(ids: dict[str, str], *, start: date, end: date) -> SubscriptionActivated:
    return SubscriptionActivated(
        subscription_id=ids["sub"], account_id=ids["account"],
        customer=Customer(email="jane@example.com", name="Jane Doe"), product_name="Acme CRM",
        vendor="acme", vendor_subscription_id=ids["vendor_sub"], billing_period="monthly",
        unit_price=Decimal("49.95"), currency="USD", quantity=1, status="active",
        current_period_start=start, current_period_end=end, auto_renew=True,
    )


def vendor_command(ids: dict[str, str], *, request_id: str, vendor_sub: str) -> VendorCancellationRequested:
    return VendorCancellationRequested(
        request_id=request_id, account_id=ids["account"], subscription_id=ids["sub"], vendor="acme",
        vendor_subscription_id=vendor_sub, effective_date=today(), current_quantity=1, new_quantity=0,
        snapshot=SubscriptionSnapshot(subscription_status="active", provisioning_status="In Progress"),
    )


def platform_committed(ids: dict[str, str], *, start: date, end: date) -> PlatformCommitted:
    return PlatformCommitted(
        request_id=ids["request"], account_id=ids["account"], subscription_id=ids["sub"],
        mode=Mode.immediate, full=True, trial=False, effective_date=today(), access_end_date=today(),
        period_start=start, period_end=end, quantity_before=1, quantity_after=0, currency="USD",
        refund_due=True, history=f"Status is set to canceled with effective date {today().isoformat()}",
        snapshot=SubscriptionSnapshot(subscription_status="canceled", provisioning_status="Synchronized",
                                      effective_date=today(), access_end_date=today()),
    )


# --- billing ---------------------------------------------------------------------------------------


async def test_billing_validates_and_asks_the_vendor(store, services, publisher, topic_reader, http, ids):
    running = await services.start_service("billing", store("billing"))
    saga = await topic_reader(topics.SAGA)
    subscription_url = f"{running.http_url}/subscriptions/{ids['sub']}"

    await publisher.publish(subscription_facts(ids, start=today() - timedelta(days=10),
                                               end=today() + timedelta(days=20)))
    # Another topic than the request's: wait until billing knows the subscription.
    await eventually(lambda: _status_is(http, subscription_url, 200), message="billing has the subscription")
    request = CancellationRequested(request_id=ids["request"], account_id=ids["account"], requested_by=CUSTOMER,
                                    target="subscription", subscription_id=ids["sub"], mode=Mode.immediate)
    await publisher.publish(request)

    asked = await saga.wait_for(of_request("VendorCancellationRequested", ids["request"]))
    command = asked.payload
    assert (command["subscription_id"], command["vendor"], command["vendor_subscription_id"]) == (
        ids["sub"], "acme", ids["vendor_sub"])
    assert (command["current_quantity"], command["new_quantity"]) == (1, 0)
    assert command["effective_date"] == today().isoformat()
    assert command["snapshot"]["provisioning_status"] == "In Progress"
    assert asked.producer == "billing" and asked.correlation_id == ids["request"]
    assert saga.matching(of_request("CancellationReceived", ids["request"]))
    status, body = await get_json(http, subscription_url)
    assert status == 200 and body["subscription"]["provisioning_status"] == "In Progress"

    # A subscription billing never heard of: rejected by validation, nothing else happens.
    unknown = CancellationRequested(request_id=str(uuid.uuid4()), account_id=ids["account"],
                                    requested_by=CUSTOMER, target="subscription",
                                    subscription_id=f"{ids['sub']}-missing", mode=Mode.immediate)
    await publisher.publish(unknown)
    failed = await saga.wait_for(of_request("Failed", str(unknown.request_id)))
    assert (failed.payload["source"], failed.payload["code"]) == ("validation", "unknown_subscription")
    assert failed.payload["snapshot"] is None
    assert not saga.matching(of_request("VendorCancellationRequested", str(unknown.request_id)))


async def _status_is(http: aiohttp.ClientSession, url: str, expected: int) -> bool:
    async with http.get(url) as response:
        return response.status == expected


# --- provisioning ----------------------------------------------------------------------------------


async def test_provisioning_asks_the_vendor_and_reports(local_apps, store, services, publisher, topic_reader,
                                                        http, ids):
    vendor = await local_apps.start(build_vendor_app(hang_seconds=2))
    await services.start_service("provisioning", store("provisioning"), VENDOR_API_URL=vendor,
                                 VENDOR_TIMEOUT_SECONDS="2", VENDOR_ATTEMPTS="2")
    saga = await topic_reader(topics.SAGA)
    refused_sub, refused_request = f"{ids['vendor_sub']}-locked", str(uuid.uuid4())
    refusal = "Subscription has an unpaid invoice; settle it before cancelling"
    async with http.post(f"{vendor}/_sandbox/rules", json={
        "match": {"vendor_subscription_id": refused_sub}, "respond": {"status": 422, "error": refusal},
        "times": None,
    }) as response:
        assert response.status == 201

    await publisher.publish(vendor_command(ids, request_id=ids["request"], vendor_sub=ids["vendor_sub"]))
    await publisher.publish(vendor_command(ids, request_id=refused_request, vendor_sub=refused_sub))

    provisioned = await saga.wait_for(of_request("VendorProvisioned", ids["request"]))
    assert provisioned.payload["vendor_subscription_id"] == ids["vendor_sub"]
    assert (provisioned.payload["new_quantity"], provisioned.payload["already_applied"]) == (0, False)
    assert provisioned.producer == "provisioning"
    failed = await saga.wait_for(of_request("VendorCancellationFailed", refused_request))
    assert failed.payload["message"] == refusal  # the vendor's own words
    assert (failed.payload["http_status"], failed.payload["code"]) == (422, "vendor_rejected")
    assert failed.payload["retryable"] is False

    _, ledger = await get_json(http, f"{vendor}/_sandbox/ledger")
    cancellations = [e for e in ledger["effects"]
                     if e["type"] == "cancellation" and e["vendor_subscription_id"] == ids["vendor_sub"]]
    assert len(cancellations) == 1 and cancellations[0]["request_id"] == ids["request"]
    assert not [e for e in ledger["effects"] if e.get("vendor_subscription_id") == refused_sub]
    refused_calls = [c for c in ledger["calls"] if refused_sub in c["path"]]
    assert len(refused_calls) == 1, "a 4xx is the vendor's decision: never retried"


# --- payment gateway -------------------------------------------------------------------------------


async def test_payment_gateway_refunds_the_unused_part(local_apps, store, services, publisher, topic_reader,
                                                       http, ids):
    gateway = await local_apps.start(build_gateway_app(hang_seconds=2))
    running = await services.start_service("payment_gateway", store("payment_gateway"), GATEWAY_API_URL=gateway,
                                           GATEWAY_TIMEOUT_SECONDS="2", GATEWAY_ATTEMPTS="2")
    saga = await topic_reader(topics.SAGA)
    start, end = today() - timedelta(days=10), today() + timedelta(days=21)
    captured_at = datetime.now(UTC) - timedelta(days=10)
    paid = Decimal("49.95")
    async with http.post(f"{gateway}/v1/charges", json={
        "amount": str(paid), "currency": "USD", "account_id": ids["account"], "subscription_id": ids["sub"],
        "captured_at": captured_at.isoformat(), "gateway_charge_id": ids["gateway_charge"],
    }) as response:
        assert response.status == 201, await response.text()
    await publisher.publish(ChargeCaptured(
        charge_id=ids["charge"], account_id=ids["account"], subscription_id=ids["sub"], amount=paid,
        currency="USD", captured_at=captured_at, gateway_charge_id=ids["gateway_charge"],
        period_start=start, period_end=end))
    charge_url = f"{running.http_url}/charges/{ids['charge']}"
    await eventually(lambda: _status_is(http, charge_url, 200), message="the service has the charge")

    await publisher.publish(platform_committed(ids, start=start, end=end))

    issued = await saga.wait_for(of_request("RefundIssued", ids["request"]))
    expected = (paid * 21 / 31).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    assert expected == Decimal("33.84")
    key = f"cf-refund-{ids['request']}-{ids['charge']}"
    refund = issued.payload
    assert (Decimal(refund["amount"]), refund["status"], refund["auto_renew_stopped"]) == (expected, "succeeded", True)
    [line] = refund["lines"]
    assert (line["idempotency_key"], Decimal(line["amount"]), line["outcome"]) == (key, expected, "succeeded")

    _, ledger = await get_json(http, f"{gateway}/_sandbox/ledger")
    refunds = [e for e in ledger["effects"] if e["type"] in ("refund", "reversal")
               and e["gateway_charge_id"] == ids["gateway_charge"]]
    assert len(refunds) == 1
    assert (refunds[0]["idempotency_key"], Decimal(refunds[0]["amount"])) == (key, expected)
    stopped = [e for e in ledger["effects"] if e["type"] == "schedule_stopped" and e["subscription_id"] == ids["sub"]]
    assert len(stopped) == 1
    _, charge = await get_json(http, charge_url)
    assert Decimal(charge["refundable"]) == paid - expected


# --- status tracker --------------------------------------------------------------------------------


async def test_status_tracker_folds_the_saga_into_versioned_records(store, services, publisher, topic_reader,
                                                                    http, ids):
    running = await services.start_service("status_tracker", store("status_tracker"))
    status = await topic_reader(topics.STATUS)
    start, end = today() - timedelta(days=10), today() + timedelta(days=21)
    request_id = ids["request"]
    story = [
        CancellationReceived(request_id=request_id, account_id=ids["account"], target="subscription",
                             subscription_id=ids["sub"], mode=Mode.immediate, requested_by=CUSTOMER),
        vendor_command(ids, request_id=request_id, vendor_sub=ids["vendor_sub"]),
        VendorProvisioned(request_id=request_id, subscription_id=ids["sub"], vendor="acme",
                          vendor_subscription_id=ids["vendor_sub"], new_quantity=0),
        platform_committed(ids, start=start, end=end),
        RefundIssued(request_id=request_id, subscription_id=ids["sub"], amount=Decimal("33.84"), currency="USD",
                     status="succeeded", auto_renew_stopped=True),
    ]
    for event in story:
        await publisher.publish(event)

    records = await status.wait_for_count(lambda e: e.payload["request_id"] == request_id, len(story))
    views = [r.payload for r in records]
    assert [v["version"] for v in views] == [1, 2, 3, 4, 5]
    assert [v["state"] for v in views] == ["received", "in_progress", "in_progress", "in_progress", "completed"]
    assert [v["stage"] for v in views] == ["validation", "vendor", "platform", "payment", "notification"]
    assert all(r.event_type == "CancellationStatusChanged" and r.producer == "status_tracker" for r in records)
    assert {status.record_of(r).key for r in records} == {request_id.encode()}
    final = views[-1]
    assert final["refund"] == {"amount": "33.84", "currency": "USD", "status": "succeeded"}
    assert (final["subscription_status"], final["provisioning_status"]) == ("canceled", "Synchronized")
    assert f"Status is set to canceled with effective date {today().isoformat()}" in [
        h["message"] for h in final["history"]]

    code, body = await get_json(http, f"{running.http_url}/requests/{request_id}")
    assert code == 200
    assert (body["state"], body["version"], body["subscription_id"]) == ("completed", 5, ids["sub"])
    code, body = await get_json(http, f"{running.http_url}/requests/{uuid.uuid4()}")
    assert code == 404


async def test_status_tracker_takes_an_event_for_an_unknown_request_in_its_stride(store, services, publisher,
                                                                                  topic_reader, ids):
    running = await services.start_service("status_tracker", store("status_tracker"))
    saga = await topic_reader(topics.SAGA)
    status = await topic_reader(topics.STATUS)
    request_id = ids["request"]
    # The request's first record is gone (retention, a tracker rebuilt on an empty database, ...).
    orphan = await publisher.publish(VendorProvisioned(
        request_id=request_id, subscription_id=ids["sub"], vendor="acme",
        vendor_subscription_id=ids["vendor_sub"], new_quantity=0))
    await publisher.publish(CancellationReceived(
        request_id=request_id, account_id=ids["account"], target="subscription", subscription_id=ids["sub"],
        mode=Mode.immediate, requested_by=CUSTOMER))

    # Same key, same partition: once the second one is folded, the first one was handled.
    await status.wait_for(lambda e: e.payload["request_id"] == request_id and e.payload["state"] == "received")
    record = saga.record_of(await saga.wait_for(lambda e: e.event_id == orphan.event_id))
    async with running.runtime.new_uow() as uow:  # the tracker's inbox keeps the marker of a dead-lettered record
        dead_lettered = await uow.already_processed(f"dlq:{topics.SAGA}:{record.partition}:{record.offset}")
        folded = await uow.already_processed(str(orphan.event_id))
    assert not dead_lettered, "the tracker dead-lettered a valid saga event"
    assert folded, "the tracker did not take the orphan event in its stride"
