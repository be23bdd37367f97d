"""The vendor sandbox: a SaaS vendor's provisioning API (cancel a subscription, change its quantity).

The vendor knows every subscription we sell, so one it has never been asked about is created as active
on first use. Cancelling twice answers 409 `already_canceled`; setting the quantity it already has is a
200 with no new effect. The actions are pure (see common.py) so `FakeVendorClient` reuses them.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from cancelflow_tools.sandboxes.common import (
    DEFAULT_HANG_SECONDS,
    Reject,
    Reply,
    Sandbox,
    State,
    dispatch,
    new_sandbox_app,
)


class CancelBody(BaseModel):
    subscription_id: str
    request_id: str
    effective_date: date


class QuantityBody(BaseModel):
    subscription_id: str
    request_id: str
    quantity: int
    # Only used the first time the vendor sees the subscription, to know where the change starts.
    current_quantity: int | None = None


def empty_state() -> State:
    return {"subscriptions": {}}


def _subscription(
    state: State, vendor_subscription_id: str, subscription_id: str, quantity: int | None
) -> dict:
    return state["subscriptions"].setdefault(
        vendor_subscription_id,
        {
            "vendor_subscription_id": vendor_subscription_id,
            "subscription_id": subscription_id,
            "status": "active",
            "quantity": quantity,
            "effective_date": None,
        },
    )


def _refuse_if_canceled(state: State, vendor_subscription_id: str) -> None:
    known = state["subscriptions"].get(vendor_subscription_id)
    if known and known["status"] == "canceled":
        raise Reject(409, "already_canceled", "Subscription is already canceled")


def cancel(state: State, vendor_subscription_id: str, body: dict[str, Any]) -> Reply:
    request = CancelBody.model_validate(body)
    _refuse_if_canceled(state, vendor_subscription_id)
    sub = _subscription(state, vendor_subscription_id, request.subscription_id, None)
    sub.update(status="canceled", effective_date=request.effective_date.isoformat())
    reference = f"vcan_{uuid.uuid4().hex[:16]}"
    effect = {
        "type": "cancellation",
        "vendor_subscription_id": vendor_subscription_id,
        "subscription_id": request.subscription_id,
        "request_id": request.request_id,
        "effective_date": request.effective_date.isoformat(),
        "reference": reference,
    }
    answer = {"vendor_subscription_id": vendor_subscription_id, "status": "canceled", "reference": reference}
    return Reply(200, answer, [effect])


def set_quantity(state: State, vendor_subscription_id: str, body: dict[str, Any]) -> Reply:
    request = QuantityBody.model_validate(body)
    if request.quantity < 1:
        raise Reject(422, "invalid_quantity", "Quantity must be at least 1")
    _refuse_if_canceled(state, vendor_subscription_id)
    sub = _subscription(state, vendor_subscription_id, request.subscription_id, request.current_quantity)
    answer = {"vendor_subscription_id": vendor_subscription_id, "quantity": request.quantity}
    if sub["quantity"] == request.quantity:
        return Reply(200, answer)  # already there: idempotent, nothing changes
    effect = {
        "type": "quantity_change",
        "vendor_subscription_id": vendor_subscription_id,
        "subscription_id": request.subscription_id,
        "request_id": request.request_id,
        "from": sub["quantity"],
        "to": request.quantity,
    }
    sub["quantity"] = request.quantity
    return Reply(200, answer, [effect])


def get_subscription(state: State, vendor_subscription_id: str, body: dict[str, Any]) -> Reply:
    known = state["subscriptions"].get(vendor_subscription_id)
    if known is None:
        raise Reject(404, "not_found", f"Unknown subscription {vendor_subscription_id}")
    return Reply(200, dict(known))


# --- HTTP ----------------------------------------------------------------------------------------


SubscriptionAction = Callable[[State, str, dict[str, Any]], Reply]


def _route(action: SubscriptionAction) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        vendor_subscription_id = request.match_info["vendor_subscription_id"]
        return await dispatch(
            request,
            lambda state, body: action(state, vendor_subscription_id, body),
            {"vendor_subscription_id": vendor_subscription_id},
        )

    return handler


def build_vendor_app(
    state_file: Path | None = None, *, hang_seconds: float = DEFAULT_HANG_SECONDS
) -> web.Application:
    sandbox = Sandbox("vendor", empty_state, state_file=state_file, hang_seconds=hang_seconds)
    app = new_sandbox_app(sandbox)
    app.router.add_post("/v1/subscriptions/{vendor_subscription_id}/cancel", _route(cancel))
    app.router.add_post("/v1/subscriptions/{vendor_subscription_id}/quantity", _route(set_quantity))
    app.router.add_get("/v1/subscriptions/{vendor_subscription_id}", _route(get_subscription))
    return app
