"""VendorClient and GatewayClient against the real sandboxes over loopback HTTP, plus their fakes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import date
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from cancelflow.events import TEXT_CHARS
from cancelflow.http_client import json_object
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.fakes.vendor import FakeVendorClient
from payment_gateway.adapters.gateway import (
    AbstractGatewayClient,
    GatewayClient,
    GatewayError,
    RefundOutcome,
)
from provisioning.adapters.vendor import VendorClient, VendorOutcome

# Small budgets so a test that spends all of it still takes well under a second.
FAST = {"timeout": 0.3, "attempts": 3, "backoff_base": 0.01, "backoff_cap": 0.05}
EFFECTIVE = date(2026, 11, 21)


@pytest.mark.parametrize(("raw", "body"), [
    (b'{"id": "re_1", "amount": "4.99"}', {"id": "re_1", "amount": "4.99"}),
    (b"", {}),
    (b"<html>Bad Gateway</html>", {"message": "<html>Bad Gateway</html>"}),
    (b"[1, 2]", {"message": "[1, 2]"}),
    (b"\xff not utf-8", {"message": "\ufffd not utf-8"}),
    (b"x" * 600, {"message": "x" * 500}),
    # A text in an answer is clipped: what a service derives from it must fit a record (issue 24).
    (orjson.dumps({"message": "m" * 2_000_000, "details": ["d" * 5000]}),
     {"message": "m" * TEXT_CHARS, "details": ["d" * TEXT_CHARS]}),
])
def test_a_response_body_is_a_json_object_or_what_came_instead(raw, body) -> None:  # type: ignore[no-untyped-def]
    assert json_object(raw) == body


@pytest.fixture
async def vendor(vendor_url: str) -> AsyncIterator[VendorClient]:
    async with VendorClient(vendor_url, **FAST) as client:
        yield client


@pytest.fixture
async def gateway(gateway_url: str) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(gateway_url, **FAST) as client:
        yield client


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


async def add_rule(
    http: aiohttp.ClientSession, base: str, match: dict, respond: dict, times: int | None
) -> None:
    body = {"match": match, "respond": respond, "times": times}
    async with http.post(f"{base}/_sandbox/rules", json=body) as response:
        assert response.status == 201


async def ledger(http: aiohttp.ClientSession, base: str) -> dict[str, list[dict[str, Any]]]:
    async with http.get(f"{base}/_sandbox/ledger") as response:
        return await response.json()


def responses(book: dict, path_part: str) -> list[Any]:
    return [c["response"] for c in book["calls"] if path_part in c["path"]]


def effects(book: dict, *kinds: str) -> list[dict]:
    return [e for e in book["effects"] if e["type"] in kinds]


async def cancel(vendor: VendorClient, vendor_subscription_id: str = "v-1") -> VendorOutcome:
    return await vendor.cancel(
        vendor_subscription_id, subscription_id="sub-1", request_id="req-1", effective_date=EFFECTIVE
    )


# --- vendor --------------------------------------------------------------------------------------


async def test_vendor_cancel_succeeds(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.already_done, outcome.code, outcome.http_status, outcome.attempts) == (
        True,
        False,
        "ok",
        200,
        1,
    )
    [effect] = effects(await ledger(http, vendor_url), "cancellation")
    assert (effect["subscription_id"], effect["request_id"], effect["effective_date"]) == (
        "sub-1",
        "req-1",
        "2026-11-21",
    )


async def test_vendor_5xx_is_retried_then_succeeds(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    await add_rule(
        http, vendor_url, {"vendor_subscription_id": "v-1"}, {"status": 503, "error": "Maintenance"}, 2
    )

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.attempts) == (True, 3)
    book = await ledger(http, vendor_url)
    assert responses(book, "/cancel") == [503, 503, 200]
    assert len(effects(book, "cancellation")) == 1


async def test_vendor_5xx_beyond_the_budget_is_unavailable(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    await add_rule(
        http, vendor_url, {"subscription_id": "sub-1"}, {"status": 500, "error": "Internal error"}, None
    )

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.code, outcome.http_status, outcome.retryable) == (
        False,
        "vendor_unavailable",
        500,
        True,
    )
    assert (outcome.message, outcome.attempts) == ("Internal error", 3)
    assert responses(await ledger(http, vendor_url), "/cancel") == [500, 500, 500]


async def test_vendor_4xx_is_not_retried(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    error = "Subscription is locked by a pending order"
    await add_rule(http, vendor_url, {"vendor_subscription_id": "v-1"}, {"status": 400, "error": error}, None)

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.code, outcome.http_status, outcome.retryable) == (
        False,
        "vendor_rejected",
        400,
        False,
    )
    assert (outcome.message, outcome.attempts) == (error, 1)
    book = await ledger(http, vendor_url)
    assert len(book["calls"]) == 1 and book["effects"] == []


async def test_vendor_own_validation_error_is_kept(vendor: VendorClient) -> None:
    outcome = await vendor.set_quantity(
        "v-1", subscription_id="sub-1", request_id="r", quantity=0, current_quantity=2
    )

    assert (outcome.code, outcome.vendor_code, outcome.http_status) == (
        "vendor_rejected",
        "invalid_quantity",
        422,
    )
    assert outcome.message == "Quantity must be at least 1"


async def test_vendor_timeout_is_retried_within_the_budget(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    await add_rule(http, vendor_url, {"vendor_subscription_id": "v-1"}, {"timeout": True}, None)

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.code, outcome.retryable, outcome.attempts) == (
        False,
        "vendor_timeout",
        True,
        3,
    )
    assert outcome.http_status is None and "0.3 s" in outcome.message
    book = await ledger(http, vendor_url)
    assert responses(book, "/cancel") == ["timeout"] * 3 and book["effects"] == []


async def test_vendor_timeout_once_then_success(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    await add_rule(http, vendor_url, {"vendor_subscription_id": "v-1"}, {"timeout": True}, 1)

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.code, outcome.attempts) == (True, "ok", 2)


async def test_vendor_already_canceled_counts_as_success(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    await cancel(vendor)

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.already_done, outcome.code, outcome.http_status) == (
        True,
        True,
        "already_canceled",
        409,
    )
    assert len(effects(await ledger(http, vendor_url), "cancellation")) == 1


async def test_vendor_dropped_answer_is_retried_and_found_done(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    await add_rule(http, vendor_url, {"vendor_subscription_id": "v-1"}, {"succeed_then_drop": True}, 1)

    outcome = await cancel(vendor)

    assert (outcome.ok, outcome.already_done, outcome.attempts) == (True, True, 2)
    book = await ledger(http, vendor_url)
    assert responses(book, "/cancel") == ["dropped", 409]
    assert len(effects(book, "cancellation")) == 1


async def test_vendor_quantity_change(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession
) -> None:
    first = await vendor.set_quantity(
        "v-1", subscription_id="sub-1", request_id="r", quantity=2, current_quantity=5
    )
    again = await vendor.set_quantity(
        "v-1", subscription_id="sub-1", request_id="r", quantity=2, current_quantity=5
    )

    assert first.ok and again.ok
    [change] = effects(await ledger(http, vendor_url), "quantity_change")
    assert (change["from"], change["to"]) == (5, 2)


async def test_vendor_quantity_change_on_a_canceled_subscription_fails(vendor: VendorClient) -> None:
    await cancel(vendor)

    outcome = await vendor.set_quantity(
        "v-1", subscription_id="sub-1", request_id="r", quantity=2, current_quantity=5
    )

    assert (outcome.ok, outcome.code, outcome.vendor_code, outcome.http_status) == (
        False,
        "vendor_rejected",
        "already_canceled",
        409,
    )


async def test_vendor_unreachable(closed_port_url: str) -> None:
    async with VendorClient(closed_port_url, **FAST) as vendor:
        outcome = await cancel(vendor)

    assert (outcome.ok, outcome.code, outcome.retryable, outcome.attempts) == (
        False,
        "vendor_unavailable",
        True,
        3,
    )


# --- gateway -------------------------------------------------------------------------------------


async def charge(gateway: AbstractGatewayClient, amount: str = "49.95") -> str:
    captured = await gateway.capture(
        amount=Decimal(amount), currency="USD", account_id="acc-1", subscription_id="sub-1"
    )
    return captured["gateway_charge_id"]


async def refund(
    gateway: AbstractGatewayClient, key: str, charge_id: str, amount: str = "10.00"
) -> RefundOutcome:
    return await gateway.refund(
        key,
        gateway_charge_id=charge_id,
        amount=Decimal(amount),
        currency="USD",
        reason="cancellation",
        request_id="req-1",
        subscription_id="sub-1",
    )


async def test_refund_succeeds(gateway: GatewayClient) -> None:
    charge_id = await charge(gateway)

    outcome = await refund(gateway, "refund:req-1:1", charge_id)

    assert (outcome.status, outcome.code, outcome.amount, outcome.currency) == (
        "succeeded",
        "ok",
        Decimal("10.00"),
        "USD",
    )
    assert (outcome.kind, outcome.http_status, outcome.attempts, outcome.replayed) == (
        "reversal",
        201,
        1,
        False,
    )
    assert outcome.refund_id and outcome.ok


async def test_refund_again_with_the_same_key_replays(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    charge_id = await charge(gateway)

    first = await refund(gateway, "refund:req-1:1", charge_id)
    second = await refund(gateway, "refund:req-1:1", charge_id)

    assert second.replayed and second.refund_id == first.refund_id and second.http_status == 200
    assert len(effects(await ledger(http, gateway_url), "refund", "reversal")) == 1


async def test_refund_dropped_answer_is_found_by_key(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    charge_id = await charge(gateway)
    await add_rule(http, gateway_url, {"gateway_charge_id": charge_id}, {"succeed_then_drop": True}, None)

    outcome = await refund(gateway, "refund:req-1:1", charge_id)

    assert (outcome.status, outcome.found_by_lookup, outcome.attempts) == ("succeeded", True, 1)
    book = await ledger(http, gateway_url)
    [effect] = effects(book, "refund", "reversal")
    assert effect["idempotency_key"] == "refund:req-1:1" and outcome.refund_id == effect["refund_id"]
    assert responses(book, "/v1/refunds") == ["dropped", 200]  # the refund, then the look-up by key


async def test_refund_timeout_stays_unknown_and_refunds_nothing(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    charge_id = await charge(gateway)
    await add_rule(http, gateway_url, {"gateway_charge_id": charge_id}, {"timeout": True}, None)

    outcome = await refund(gateway, "refund:req-1:1", charge_id)

    assert (outcome.status, outcome.code, outcome.retryable, outcome.attempts) == (
        "unknown",
        "gateway_timeout",
        True,
        3,
    )
    book = await ledger(http, gateway_url)
    posts = [c for c in book["calls"] if c["method"] == "POST" and c["path"] == "/v1/refunds"]
    assert {c["idempotency_key"] for c in posts} == {"refund:req-1:1"} and len(posts) == 3
    assert responses(book, "/v1/refunds/") == [404, 404, 404]  # looked up after every lost answer
    assert effects(book, "refund", "reversal") == []
    assert await gateway.lookup_refund("refund:req-1:1") is None


async def test_refund_5xx_is_retried_with_the_same_key(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    charge_id = await charge(gateway)
    await add_rule(http, gateway_url, {"subscription_id": "sub-1"}, {"status": 503, "error": "Try later"}, 1)

    outcome = await refund(gateway, "refund:req-1:1", charge_id)

    assert (outcome.status, outcome.attempts) == ("succeeded", 2)
    book = await ledger(http, gateway_url)
    assert responses(book, "/v1/refunds") == [503, 201]
    assert len(effects(book, "refund", "reversal")) == 1


async def test_refund_4xx_fails_without_retry(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    charge_id = await charge(gateway, "5.00")

    outcome = await refund(gateway, "refund:req-1:1", charge_id, "10.00")

    assert (outcome.status, outcome.code, outcome.http_status, outcome.attempts) == (
        "failed",
        "amount_exceeds_refundable",
        422,
        1,
    )
    assert "5.00" in outcome.message and not outcome.retryable
    assert responses(await ledger(http, gateway_url), "/v1/refunds") == [422]


async def test_refund_disputed_charge_fails(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    charge_id = await charge(gateway)
    async with http.post(
        f"{gateway_url}/_sandbox/charges/{charge_id}/state", json={"state": "disputed"}
    ) as response:
        assert response.status == 200

    outcome = await refund(gateway, "refund:req-1:1", charge_id)

    assert (outcome.status, outcome.code, outcome.http_status) == ("failed", "charge_disputed", 409)
    assert (await gateway.get_charge(charge_id))["state"] == "disputed"


async def test_lookup_refund_and_get_charge(gateway: GatewayClient) -> None:
    charge_id = await charge(gateway)
    created = await refund(gateway, "refund:req-1:1", charge_id)

    found = await gateway.lookup_refund("refund:req-1:1")

    assert found is not None and (found.status, found.refund_id) == ("succeeded", created.refund_id)
    seen = await gateway.get_charge(charge_id)
    assert seen is not None and (seen["refunded"], seen["refundable"]) == ("10.00", "39.95")
    assert await gateway.get_charge("ch_unknown") is None


async def test_stop_schedule_is_idempotent(
    gateway: GatewayClient, gateway_url: str, http: aiohttp.ClientSession
) -> None:
    first = await gateway.stop_schedule("sub-1", request_id="req-1")
    second = await gateway.stop_schedule("sub-1", request_id="req-1")

    assert (first.ok, first.already_done, second.ok, second.already_done) == (True, False, True, True)
    assert len(effects(await ledger(http, gateway_url), "schedule_stopped")) == 1


async def test_gateway_unreachable(closed_port_url: str) -> None:
    async with GatewayClient(closed_port_url, **FAST) as gateway:
        outcome = await refund(gateway, "refund:req-1:1", "ch_1")
        schedule = await gateway.stop_schedule("sub-1", request_id="req-1")
        with pytest.raises(GatewayError):
            await gateway.lookup_refund("refund:req-1:1")

    assert (outcome.status, outcome.code, outcome.attempts) == ("unknown", "gateway_unavailable", 3)
    assert (schedule.ok, schedule.retryable, schedule.code) == (False, True, "gateway_unavailable")


# --- fakes answer as the sandboxes do ------------------------------------------------------------


async def test_fake_vendor_follows_the_sandbox_rules() -> None:
    fake = FakeVendorClient()
    fake.script(VendorOutcome.failed("vendor_timeout", "no answer", retryable=True))

    first = await fake.cancel("v-1", subscription_id="sub-1", request_id="r", effective_date=EFFECTIVE)
    second = await fake.cancel("v-1", subscription_id="sub-1", request_id="r", effective_date=EFFECTIVE)
    third = await fake.cancel("v-1", subscription_id="sub-1", request_id="r", effective_date=EFFECTIVE)

    assert (first.code, second.code, third.code) == ("vendor_timeout", "ok", "already_canceled")
    assert third.ok and third.already_done and len(fake.calls) == 3 and len(fake.effects) == 1


async def test_fake_gateway_follows_the_sandbox_rules() -> None:
    fake = FakeGatewayClient()
    charge_id = await charge(fake)

    first = await refund(fake, "k1", charge_id)
    replay = await refund(fake, "k1", charge_id)
    too_much = await refund(fake, "k2", charge_id, "45.00")
    fake.force_state(charge_id, "disputed")
    disputed = await refund(fake, "k3", charge_id, "1.00")

    assert (first.kind, replay.replayed, replay.refund_id) == ("reversal", True, first.refund_id)
    assert (too_much.status, too_much.code) == ("failed", "amount_exceeds_refundable")
    assert (disputed.status, disputed.code) == ("failed", "charge_disputed")
    found = await fake.lookup_refund("k1")
    assert found is not None and found.refund_id == first.refund_id
    assert await fake.lookup_refund("k2") is None
    assert len([e for e in fake.effects if e["type"] in ("refund", "reversal")]) == 1


# --- metrics: every attempt is timed, by operation and outcome ----------------------------------------


def call_count(target: str, operation: str, outcome: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"target": target, "operation": operation, "outcome": outcome}
    return REGISTRY.get_sample_value("cancelflow_external_call_seconds_count", labels) or 0.0


async def test_vendor_calls_are_timed_by_outcome(
    vendor: VendorClient, vendor_url: str, http: aiohttp.ClientSession, closed_port_url: str
) -> None:
    before = {o: call_count("vendor", "cancel", o) for o in ("2xx", "5xx", "unreachable")}
    await add_rule(http, vendor_url, {"vendor_subscription_id": "v-m"}, {"status": 503, "error": "x"}, 1)
    await cancel(vendor, "v-m")
    async with VendorClient(closed_port_url, **FAST) as unreachable:
        await cancel(unreachable)
    moved = {o: call_count("vendor", "cancel", o) - before[o] for o in before}
    assert moved == {"2xx": 1, "5xx": 1, "unreachable": FAST["attempts"]}


async def test_gateway_calls_are_timed_by_operation(gateway: GatewayClient) -> None:
    operations = ("capture", "refund", "lookup_refund", "stop_schedule", "get_charge")
    before = {op: call_count("gateway", op, "2xx") for op in operations}
    charge_id = await charge(gateway)
    await refund(gateway, "refund:req-m:1", charge_id)
    await gateway.lookup_refund("refund:req-m:1")
    await gateway.stop_schedule("sub-m", request_id="req-m")
    await gateway.get_charge(charge_id)
    assert {op: call_count("gateway", op, "2xx") - before[op] for op in operations} == dict.fromkeys(operations, 1)
