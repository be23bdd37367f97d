"""The vendor and gateway sandboxes over real HTTP on loopback: behaviour, fault rules, ledger, restarts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cancelflow_tools.sandboxes.gateway import build_gateway_app
from cancelflow_tools.sandboxes.vendor import build_vendor_app
from tests.conftest import LocalApps


@pytest.fixture
def vendor(vendor_url: str) -> str:  # short names: every test here speaks to the sandboxes
    return vendor_url


@pytest.fixture
def gateway(gateway_url: str) -> str:
    return gateway_url


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, json=body, **kwargs) as response:
        return response.status, await response.json()


async def ledger(http: aiohttp.ClientSession, base: str) -> dict[str, list[dict[str, Any]]]:
    return (await call(http, "GET", f"{base}/_sandbox/ledger"))[1]


async def add_rule(
    http: aiohttp.ClientSession, base: str, match: dict, respond: dict, times: int | None
) -> dict:
    status, rule = await call(
        http, "POST", f"{base}/_sandbox/rules", {"match": match, "respond": respond, "times": times}
    )
    assert status == 201, rule
    return rule


def cancel_body(subscription_id: str = "sub-1", request_id: str = "req-1") -> dict[str, str]:
    return {"subscription_id": subscription_id, "request_id": request_id, "effective_date": "2026-11-21"}


def effects(book: dict, kind: str) -> list[dict]:
    return [e for e in book["effects"] if e["type"] == kind]


# --- common --------------------------------------------------------------------------------------


async def test_both_answer_health(http: aiohttp.ClientSession, vendor: str, gateway: str) -> None:
    assert (await call(http, "GET", f"{vendor}/healthz"))[0] == 200
    assert (await call(http, "GET", f"{gateway}/healthz"))[0] == 200


async def test_status_rule_applies_times_then_expires(http: aiohttp.ClientSession, vendor: str) -> None:
    await add_rule(
        http, vendor, {"vendor_subscription_id": "v-1"}, {"status": 503, "error": "Vendor is down"}, 1
    )
    url = f"{vendor}/v1/subscriptions/v-1/cancel"

    assert await call(http, "POST", url, cancel_body()) == (
        503,
        {"error": "service_unavailable", "message": "Vendor is down"},
    )
    status, answer = await call(http, "POST", url, cancel_body())

    assert (status, answer["status"]) == (200, "canceled")
    book = await ledger(http, vendor)
    assert [c["response"] for c in book["calls"]] == [503, 200]
    assert len(effects(book, "cancellation")) == 1
    assert (await call(http, "GET", f"{vendor}/_sandbox/rules"))[1] == {"rules": []}


async def test_rules_list_and_clear(http: aiohttp.ClientSession, vendor: str) -> None:
    rule = await add_rule(http, vendor, {"subscription_id": "sub-1"}, {"status": 500, "error": "boom"}, None)
    assert rule["id"] and rule["times"] is None

    assert [r["id"] for r in (await call(http, "GET", f"{vendor}/_sandbox/rules"))[1]["rules"]] == [
        rule["id"]
    ]
    assert (await call(http, "DELETE", f"{vendor}/_sandbox/rules"))[0] == 200
    assert (await call(http, "GET", f"{vendor}/_sandbox/rules"))[1] == {"rules": []}


async def test_rule_without_match_or_respond_is_refused(http: aiohttp.ClientSession, vendor: str) -> None:
    bad = {"match": {}, "respond": {"status": 503, "error": "x"}, "times": 1}
    assert (await call(http, "POST", f"{vendor}/_sandbox/rules", bad))[0] == 422
    bad = {"match": {"subscription_id": "s"}, "respond": {"explode": True}, "times": 1}
    assert (await call(http, "POST", f"{vendor}/_sandbox/rules", bad))[0] == 422


async def test_timeout_rule_holds_the_call_and_applies_nothing(
    http: aiohttp.ClientSession, vendor: str
) -> None:
    await add_rule(http, vendor, {"vendor_subscription_id": "v-1"}, {"timeout": True}, 1)

    with pytest.raises(TimeoutError):
        await call(
            http,
            "POST",
            f"{vendor}/v1/subscriptions/v-1/cancel",
            cancel_body(),
            timeout=aiohttp.ClientTimeout(total=0.3),
        )

    book = await ledger(http, vendor)
    assert [c["response"] for c in book["calls"]] == ["timeout"]
    assert book["effects"] == []


async def test_succeed_then_drop_applies_the_effect_without_answering(
    http: aiohttp.ClientSession, vendor: str
) -> None:
    await add_rule(http, vendor, {"vendor_subscription_id": "v-1"}, {"succeed_then_drop": True}, 1)

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body())

    book = await ledger(http, vendor)
    assert [c["response"] for c in book["calls"]] == ["dropped"]
    assert len(effects(book, "cancellation")) == 1
    assert (await call(http, "GET", f"{vendor}/v1/subscriptions/v-1"))[1]["status"] == "canceled"


async def test_subscription_rule_matches_both_sandboxes(
    http: aiohttp.ClientSession, vendor: str, gateway: str
) -> None:
    charge = await capture(http, gateway)
    for base in (vendor, gateway):
        await add_rule(
            http, base, {"subscription_id": "sub-1"}, {"status": 502, "error": "Bad gateway"}, None
        )

    status, _ = await call(http, "POST", f"{vendor}/v1/subscriptions/v-9/cancel", cancel_body("sub-1"))
    assert status == 502
    status, _ = await call(
        http, "POST", f"{gateway}/v1/refunds", refund_body(charge), headers={"Idempotency-Key": "k1"}
    )
    assert status == 502
    status, _ = await call(http, "POST", f"{vendor}/v1/subscriptions/v-9/cancel", cancel_body("sub-2"))
    assert status == 200


async def test_ledger_reset_forgets_calls_effects_and_state(http: aiohttp.ClientSession, vendor: str) -> None:
    assert (await call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body()))[0] == 200

    assert (await call(http, "DELETE", f"{vendor}/_sandbox/ledger"))[0] == 200

    assert await ledger(http, vendor) == {"calls": [], "effects": []}
    assert (await call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body()))[0] == 200


# --- vendor --------------------------------------------------------------------------------------


async def test_vendor_refuses_a_second_cancellation(http: aiohttp.ClientSession, vendor: str) -> None:
    url = f"{vendor}/v1/subscriptions/v-1/cancel"
    status, first = await call(http, "POST", url, cancel_body())
    assert status == 200 and first["vendor_subscription_id"] == "v-1" and first["reference"]

    assert await call(http, "POST", url, cancel_body(request_id="req-2")) == (
        409,
        {"error": "already_canceled", "message": "Subscription is already canceled"},
    )
    book = await ledger(http, vendor)
    [effect] = effects(book, "cancellation")
    assert effect["request_id"] == "req-1" and effect["effective_date"] == "2026-11-21"


async def test_vendor_quantity_change_is_idempotent(http: aiohttp.ClientSession, vendor: str) -> None:
    url = f"{vendor}/v1/subscriptions/v-1/quantity"
    body = {"subscription_id": "sub-1", "request_id": "req-1", "quantity": 3, "current_quantity": 5}

    assert await call(http, "POST", url, body) == (200, {"vendor_subscription_id": "v-1", "quantity": 3})
    assert await call(http, "POST", url, body) == (200, {"vendor_subscription_id": "v-1", "quantity": 3})

    [change] = effects(await ledger(http, vendor), "quantity_change")
    assert (change["from"], change["to"]) == (5, 3)
    status, sub = await call(http, "GET", f"{vendor}/v1/subscriptions/v-1")
    assert (status, sub["status"], sub["quantity"]) == (200, "active", 3)


async def test_vendor_quantity_refusals(http: aiohttp.ClientSession, vendor: str) -> None:
    url = f"{vendor}/v1/subscriptions/v-1/quantity"
    status, error = await call(
        http, "POST", url, {"subscription_id": "sub-1", "request_id": "r", "quantity": 0}
    )
    assert (status, error["error"]) == (422, "invalid_quantity")

    await call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body())
    status, error = await call(
        http, "POST", url, {"subscription_id": "sub-1", "request_id": "r", "quantity": 2}
    )
    assert (status, error["error"]) == (409, "already_canceled")


async def test_vendor_unknown_subscription_and_bad_body(http: aiohttp.ClientSession, vendor: str) -> None:
    assert (await call(http, "GET", f"{vendor}/v1/subscriptions/never-seen"))[0] == 404
    status, error = await call(
        http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", {"subscription_id": "s"}
    )
    assert (status, error["error"]) == (422, "invalid_request")


# --- gateway -------------------------------------------------------------------------------------


async def capture(
    http: aiohttp.ClientSession,
    gateway: str,
    amount: str = "49.95",
    age: timedelta | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {"amount": amount, "currency": "USD", "account_id": "acc-1", "subscription_id": "sub-1", **extra}
    if age is not None:
        body["captured_at"] = (datetime.now(UTC) - age).isoformat()
    status, charge = await call(http, "POST", f"{gateway}/v1/charges", body)
    assert status == 201, charge
    return charge


def refund_body(charge: dict[str, Any], amount: str = "10.00", **changes: Any) -> dict[str, Any]:
    body = {
        "gateway_charge_id": charge["gateway_charge_id"],
        "amount": amount,
        "currency": "USD",
        "reason": "requested_by_customer",
        "request_id": "req-1",
        "subscription_id": "sub-1",
    }
    return {**body, **changes}


async def refund(http: aiohttp.ClientSession, gateway: str, key: str | None, body: dict) -> tuple[int, dict]:
    headers = {"Idempotency-Key": key} if key else {}
    return await call(http, "POST", f"{gateway}/v1/refunds", body, headers=headers)


async def test_capture_and_charge_states(http: aiohttp.ClientSession, gateway: str) -> None:
    fresh = await capture(http, gateway)
    old = await capture(http, gateway, age=timedelta(days=3), gateway_charge_id="ch_old")

    assert fresh["gateway_charge_id"].startswith("ch_")
    assert (fresh["state"], fresh["refunded"], fresh["refundable"]) == ("captured", "0.00", "49.95")
    status, seen = await call(http, "GET", f"{gateway}/v1/charges/ch_old")
    assert (status, seen["state"], seen["amount"]) == (200, "settled", "49.95")
    assert old["gateway_charge_id"] == "ch_old"
    assert (await call(http, "GET", f"{gateway}/v1/charges/ch_nope"))[0] == 404


async def test_gateway_decides_reversal_or_refund(http: aiohttp.ClientSession, gateway: str) -> None:
    fresh = await capture(http, gateway)
    settled = await capture(http, gateway, age=timedelta(hours=25))

    first = await refund(http, gateway, "k1", refund_body(fresh, "10.00"))
    second = await refund(http, gateway, "k2", refund_body(fresh, "5.00"))
    old = await refund(http, gateway, "k3", refund_body(settled, "49.95"))

    assert [(s, r["kind"]) for s, r in (first, second, old)] == [
        (201, "reversal"),
        (201, "refund"),
        (201, "refund"),
    ]
    charge = (await call(http, "GET", f"{gateway}/v1/charges/{fresh['gateway_charge_id']}"))[1]
    assert (charge["state"], charge["refunded"], charge["refundable"]) == (
        "partially_refunded",
        "15.00",
        "34.95",
    )
    charge = (await call(http, "GET", f"{gateway}/v1/charges/{settled['gateway_charge_id']}"))[1]
    assert (charge["state"], charge["refundable"]) == ("refunded", "0.00")
    book = await ledger(http, gateway)
    assert len(effects(book, "reversal")) == 1 and len(effects(book, "refund")) == 2


async def test_same_key_same_parameters_replays(http: aiohttp.ClientSession, gateway: str) -> None:
    charge = await capture(http, gateway)
    status, first = await refund(http, gateway, "refund:req-1:ch", refund_body(charge))

    async with http.post(
        f"{gateway}/v1/refunds", json=refund_body(charge), headers={"Idempotency-Key": "refund:req-1:ch"}
    ) as response:
        assert response.status == 200
        assert response.headers["Idempotent-Replayed"] == "true"
        assert await response.json() == first

    assert status == 201 and first["status"] == "succeeded" and first["idempotency_key"] == "refund:req-1:ch"
    assert len((await ledger(http, gateway))["effects"]) == 2  # the capture and one reversal


async def test_same_key_other_parameters_is_refused(http: aiohttp.ClientSession, gateway: str) -> None:
    charge = await capture(http, gateway)
    await refund(http, gateway, "k1", refund_body(charge, "10.00"))

    status, error = await refund(http, gateway, "k1", refund_body(charge, "11.00"))

    assert (status, error["error"]) == (422, "idempotency_key_reuse")
    assert len(effects(await ledger(http, gateway), "reversal")) == 1


async def test_refund_refusals(http: aiohttp.ClientSession, gateway: str) -> None:
    charge = await capture(http, gateway)
    cases = [
        ("k1", refund_body(charge, "49.96"), 422, "amount_exceeds_refundable"),
        ("k2", refund_body(charge, currency="EUR"), 422, "currency_mismatch"),
        ("k3", refund_body(charge, "0.00"), 422, "invalid_amount"),
        ("k4", refund_body(charge, "-1.00"), 422, "invalid_amount"),
        ("k5", refund_body({"gateway_charge_id": "ch_nope"}), 404, "unknown_charge"),
        (None, refund_body(charge), 400, "missing_idempotency_key"),
    ]
    for key, body, expected_status, expected_error in cases:
        status, error = await refund(http, gateway, key, body)
        assert (status, error["error"]) == (expected_status, expected_error), key

    book = await ledger(http, gateway)
    assert effects(book, "refund") == effects(book, "reversal") == []


async def test_disputed_charge_cannot_be_refunded(http: aiohttp.ClientSession, gateway: str) -> None:
    charge = await capture(http, gateway)
    url = f"{gateway}/_sandbox/charges/{charge['gateway_charge_id']}/state"
    assert (await call(http, "POST", url, {"state": "disputed"}))[1]["state"] == "disputed"

    status, error = await refund(http, gateway, "k1", refund_body(charge))

    assert (status, error["error"]) == (409, "charge_disputed")
    assert (await call(http, "POST", url, {"state": "lost"}))[0] == 422


async def test_refund_lookup_by_key(http: aiohttp.ClientSession, gateway: str) -> None:
    charge = await capture(http, gateway)
    _, created = await refund(http, gateway, "refund:req-1", refund_body(charge))

    assert await call(http, "GET", f"{gateway}/v1/refunds/refund:req-1") == (200, created)
    status, error = await call(http, "GET", f"{gateway}/v1/refunds/refund:req-2")
    assert (status, error["error"]) == (404, "not_found")


async def test_schedule_stop_is_idempotent(http: aiohttp.ClientSession, gateway: str) -> None:
    url = f"{gateway}/v1/schedules/sub-1/cancel"
    body = {"subscription_id": "sub-1", "request_id": "req-1"}

    first = await call(http, "POST", url, body)
    second = await call(http, "POST", url, body)

    assert (first[0], first[1]["status"], first[1]["already_stopped"]) == (200, "stopped", False)
    assert (second[0], second[1]["status"], second[1]["already_stopped"]) == (200, "stopped", True)
    assert len(effects(await ledger(http, gateway), "schedule_stopped")) == 1


async def test_concurrent_refunds_never_exceed_the_charge(http: aiohttp.ClientSession, gateway: str) -> None:
    charge = await capture(http, gateway)
    same_key = [refund(http, gateway, "same", refund_body(charge)) for _ in range(5)]
    other_keys = [refund(http, gateway, f"k{i}", refund_body(charge)) for i in range(8)]

    results = await asyncio.gather(*same_key, *other_keys)

    statuses = sorted(status for status, _ in results)
    assert statuses.count(201) == 4  # 49.95 holds four refunds of 10.00, whichever keys win
    assert len({answer["refund_id"] for status, answer in results[:5] if status < 300}) == 1
    book = await ledger(http, gateway)
    assert len(effects(book, "reversal") + effects(book, "refund")) == 4


# --- persistence ---------------------------------------------------------------------------------


async def test_state_file_survives_a_restart(
    http: aiohttp.ClientSession, local_apps: LocalApps, tmp_path: Path
) -> None:
    vendor_file, gateway_file = tmp_path / "vendor.json", tmp_path / "gateway.json"
    vendor = await local_apps.start(build_vendor_app(vendor_file))
    gateway = await local_apps.start(build_gateway_app(gateway_file))
    await call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body())
    charge = await capture(http, gateway)
    _, created = await refund(http, gateway, "k1", refund_body(charge))
    await add_rule(http, gateway, {"subscription_id": "sub-9"}, {"status": 503, "error": "x"}, None)

    await local_apps.stop_all()
    vendor = await local_apps.start(build_vendor_app(vendor_file))
    gateway = await local_apps.start(build_gateway_app(gateway_file))

    assert (await call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body()))[0] == 409
    assert await refund(http, gateway, "k1", refund_body(charge)) == (200, created)
    assert len((await call(http, "GET", f"{gateway}/_sandbox/rules"))[1]["rules"]) == 1
    assert len(effects(await ledger(http, vendor), "cancellation")) == 1


async def test_hanging_calls_are_released_on_shutdown(http: aiohttp.ClientSession, local_apps: LocalApps) -> None:
    vendor = await local_apps.start(build_vendor_app(hang_seconds=60))
    await add_rule(http, vendor, {"vendor_subscription_id": "v-1"}, {"timeout": True}, None)
    pending = asyncio.ensure_future(
        call(http, "POST", f"{vendor}/v1/subscriptions/v-1/cancel", cancel_body())
    )
    while not (await ledger(http, vendor))["calls"]:
        pass  # each ledger read is a round trip, so the held call gets its turn

    await asyncio.wait_for(local_apps.stop_all(), timeout=5)

    [outcome] = await asyncio.gather(pending, return_exceptions=True)
    assert isinstance(outcome, aiohttp.ClientError) or outcome[0] == 504
