"""The payment-gateway sandbox: charges, refunds with Stripe-like idempotency keys, renewal schedules.

The gateway, not the caller, decides between a `reversal` (the charge is still unsettled, less than 24 h
old, and nothing was refunded yet) and a `refund`. A key used again with the same parameters replays the
first answer and changes nothing; with other parameters it is refused. Only successful refunds are kept
under their key, so `GET /v1/refunds/{key}` tells a client whether an unanswered call took effect.
The actions are pure (see common.py) so `FakeGatewayClient` reuses them.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from cancelflow_tools.sandboxes.common import (
    DEFAULT_HANG_SECONDS,
    SANDBOX,
    Reject,
    Reply,
    Sandbox,
    State,
    dispatch,
    error_reply,
    json_response,
    new_sandbox_app,
    rfc3339,
    run_action,
    utc_now,
)

CENT = Decimal("0.01")
SETTLEMENT_DELAY = timedelta(hours=24)
CHARGE_STATES = ("captured", "settled", "partially_refunded", "refunded", "disputed")
CURRENCY = Field(pattern=r"^[A-Za-z]{3}$")


class CaptureBody(BaseModel):
    amount: Decimal
    currency: str = CURRENCY
    account_id: str
    subscription_id: str
    captured_at: datetime | None = None
    gateway_charge_id: str | None = None


class RefundBody(BaseModel):
    gateway_charge_id: str
    amount: Decimal
    currency: str = CURRENCY
    reason: str | None = None
    request_id: str | None = None
    subscription_id: str | None = None


class ScheduleBody(BaseModel):
    request_id: str | None = None


class ForceStateBody(BaseModel):
    state: str


def empty_state() -> State:
    return {"charges": {}, "refunds": {}, "schedules": {}}


def money(amount: Decimal) -> str:
    return str(amount.quantize(CENT))


def _check_amount(amount: Decimal) -> None:
    if not amount.is_finite() or amount <= 0:
        raise Reject(422, "invalid_amount", "Amount must be greater than 0")
    if amount != amount.quantize(CENT):
        raise Reject(422, "invalid_amount", "Amount must have at most two decimal places")


# --- charges -------------------------------------------------------------------------------------


def _settled(charge: dict[str, Any], now: datetime) -> bool:
    forced = charge["forced_state"]
    if forced:
        return forced != "captured"
    return now - datetime.fromisoformat(charge["captured_at"]) >= SETTLEMENT_DELAY


def charge_state(charge: dict[str, Any], now: datetime) -> str:
    forced, refunded = charge["forced_state"], Decimal(charge["refunded"])
    if forced == "disputed":
        return "disputed"
    if forced == "refunded" or refunded >= Decimal(charge["amount"]):
        return "refunded"
    if forced == "partially_refunded" or refunded > 0:
        return "partially_refunded"
    return "settled" if _settled(charge, now) else "captured"


def refundable(charge: dict[str, Any], state: str) -> Decimal:
    if state in ("disputed", "refunded"):
        return Decimal("0.00")
    return Decimal(charge["amount"]) - Decimal(charge["refunded"])


def charge_view(charge: dict[str, Any], now: datetime) -> dict[str, Any]:
    state = charge_state(charge, now)
    public = {k: v for k, v in charge.items() if k != "forced_state"}
    return {**public, "state": state, "refundable": money(refundable(charge, state))}


def _known_charge(state: State, gateway_charge_id: str) -> dict[str, Any]:
    charge = state["charges"].get(gateway_charge_id)
    if charge is None:
        raise Reject(404, "unknown_charge", f"No such charge: {gateway_charge_id}")
    return charge


def capture(state: State, body: dict[str, Any]) -> Reply:
    request = CaptureBody.model_validate(body)
    _check_amount(request.amount)
    charge_id = request.gateway_charge_id or f"ch_{uuid.uuid4().hex[:24]}"
    captured_at = request.captured_at or utc_now()
    charge = {
        "gateway_charge_id": charge_id,
        "account_id": request.account_id,
        "subscription_id": request.subscription_id,
        "amount": money(request.amount),
        "currency": request.currency.upper(),
        "captured_at": rfc3339(captured_at if captured_at.tzinfo else captured_at.replace(tzinfo=UTC)),
        "refunded": "0.00",
        "forced_state": None,
    }
    existing = state["charges"].get(charge_id)
    if existing:
        return _recapture(existing, charge)
    state["charges"][charge_id] = charge
    effect = {"type": "charge_captured", **{k: charge[k] for k in charge if k != "forced_state"}}
    return Reply(201, charge_view(charge, utc_now()), [effect])


def _recapture(existing: dict[str, Any], charge: dict[str, Any]) -> Reply:
    # Loaders may run again after a restart: the same charge again is a no-op, a different one a conflict.
    same = ("account_id", "subscription_id", "amount", "currency")
    if all(existing[k] == charge[k] for k in same):
        return Reply(200, charge_view(existing, utc_now()))
    raise Reject(409, "charge_exists", f"Charge {charge['gateway_charge_id']} exists with other details")


def get_charge(state: State, gateway_charge_id: str, body: dict[str, Any]) -> Reply:
    return Reply(200, charge_view(_known_charge(state, gateway_charge_id), utc_now()))


def force_charge_state(state: State, gateway_charge_id: str, body: dict[str, Any]) -> Reply:
    request = ForceStateBody.model_validate(body)
    if request.state not in CHARGE_STATES:
        raise Reject(422, "invalid_state", f"state must be one of {', '.join(CHARGE_STATES)}")
    charge = _known_charge(state, gateway_charge_id)
    charge["forced_state"] = request.state
    return Reply(200, charge_view(charge, utc_now()))


# --- refunds -------------------------------------------------------------------------------------


def _refund_params(request: RefundBody) -> dict[str, Any]:
    # What "the same request" means for a key: every parameter, amounts compared by value.
    params = request.model_dump(mode="json")
    return {**params, "amount": str(request.amount.normalize()), "currency": request.currency.upper()}


def refund(state: State, key: str | None, body: dict[str, Any]) -> Reply:
    if not key:
        raise Reject(400, "missing_idempotency_key", "The Idempotency-Key header is required")
    request = RefundBody.model_validate(body)
    prior = state["refunds"].get(key)
    if prior:
        return _replay(prior, _refund_params(request))
    _check_amount(request.amount)
    charge = _known_charge(state, request.gateway_charge_id)
    kind = _refund_kind(charge, request)
    created = _issue(state, charge, key, request, kind)
    effect = {
        "type": kind,
        **{
            k: created[k] for k in ("idempotency_key", "refund_id", "gateway_charge_id", "amount", "currency")
        },
        "request_id": request.request_id,
        "subscription_id": request.subscription_id,
    }
    return Reply(201, created, [effect])


def _replay(prior: dict[str, Any], params: dict[str, Any]) -> Reply:
    if prior["params"] != params:
        raise Reject(422, "idempotency_key_reuse", "This idempotency key was used with other parameters")
    return Reply(200, prior["response"], headers={"Idempotent-Replayed": "true"})


def _refund_kind(charge: dict[str, Any], request: RefundBody) -> str:
    """Check the refund is possible and say whether the gateway reverses or refunds it."""
    if request.currency.upper() != charge["currency"]:
        raise Reject(422, "currency_mismatch", f"Charge is in {charge['currency']}, not {request.currency}")
    state = charge_state(charge, utc_now())
    if state == "disputed":
        raise Reject(409, "charge_disputed", "The charge is disputed and cannot be refunded")
    left = refundable(charge, state)
    if request.amount > left:
        message = f"Refund of {money(request.amount)} exceeds the {money(left)} still refundable"
        raise Reject(422, "amount_exceeds_refundable", message)
    # Unsettled and untouched: the gateway voids the capture instead of moving money back.
    return "reversal" if state == "captured" else "refund"


def _issue(state: State, charge: dict[str, Any], key: str, request: RefundBody, kind: str) -> dict[str, Any]:
    charge["refunded"] = money(Decimal(charge["refunded"]) + request.amount)
    created = {
        "refund_id": f"re_{uuid.uuid4().hex[:24]}",
        "idempotency_key": key,
        "gateway_charge_id": charge["gateway_charge_id"],
        "amount": money(request.amount),
        "currency": charge["currency"],
        "kind": kind,
        "status": "succeeded",
        "reason": request.reason,
        "request_id": request.request_id,
        "created_at": rfc3339(utc_now()),
    }
    state["refunds"][key] = {"params": _refund_params(request), "response": created}
    return created


def get_refund(state: State, key: str, body: dict[str, Any]) -> Reply:
    prior = state["refunds"].get(key)
    if prior is None:
        raise Reject(404, "not_found", f"No refund was created with idempotency key {key}")
    return Reply(200, prior["response"])


# --- schedules -----------------------------------------------------------------------------------


def stop_schedule(state: State, subscription_id: str, body: dict[str, Any]) -> Reply:
    request = ScheduleBody.model_validate(body)
    prior = state["schedules"].get(subscription_id)
    answer = {"subscription_id": subscription_id, "status": "stopped", "already_stopped": prior is not None}
    if prior:
        return Reply(200, {**answer, "stopped_at": prior["stopped_at"]})
    stopped = {"stopped_at": rfc3339(utc_now()), "request_id": request.request_id}
    state["schedules"][subscription_id] = stopped
    effect = {
        "type": "schedule_stopped",
        "subscription_id": subscription_id,
        "request_id": request.request_id,
    }
    return Reply(200, {**answer, **stopped}, [effect])


# --- HTTP ----------------------------------------------------------------------------------------

KeyedAction = Callable[[State, str, dict[str, Any]], Reply]


def _route(action: KeyedAction, param: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        value = request.match_info[param]
        # An idempotency key is not something fault rules match on.
        path_values = {} if param == "idempotency_key" else {param: value}
        return await dispatch(request, lambda state, body: action(state, value, body), path_values)

    return handler


async def _capture(request: web.Request) -> web.StreamResponse:
    # Capturing is how tests and loaders set the scene, so fault rules do not apply to it.
    return await dispatch(request, capture, faults=False)


async def _refund(request: web.Request) -> web.StreamResponse:
    key = request.headers.get("Idempotency-Key")
    return await dispatch(request, lambda state, body: refund(state, key, body))


async def _force_state(request: web.Request) -> web.Response:
    """Test hook: make the gateway report a charge as disputed, settled, ... (not a recorded call)."""
    sandbox = request.app[SANDBOX]
    charge_id = request.match_info["gateway_charge_id"]
    try:
        body = await request.json()
    except ValueError:
        return json_response(error_reply(400, "invalid_json", "The request body must be a JSON object"))
    async with sandbox.lock:
        reply = run_action(lambda state, b: force_charge_state(state, charge_id, b), sandbox.state, body)
        sandbox.save()
    return json_response(reply)


def build_gateway_app(
    state_file: Path | None = None, *, hang_seconds: float = DEFAULT_HANG_SECONDS
) -> web.Application:
    sandbox = Sandbox("gateway", empty_state, state_file=state_file, hang_seconds=hang_seconds)
    app = new_sandbox_app(sandbox)
    app.router.add_post("/v1/charges", _capture)
    app.router.add_get("/v1/charges/{gateway_charge_id}", _route(get_charge, "gateway_charge_id"))
    app.router.add_post("/_sandbox/charges/{gateway_charge_id}/state", _force_state)
    app.router.add_post("/v1/refunds", _refund)
    app.router.add_get("/v1/refunds/{idempotency_key}", _route(get_refund, "idempotency_key"))
    app.router.add_post("/v1/schedules/{subscription_id}/cancel", _route(stop_schedule, "subscription_id"))
    return app
