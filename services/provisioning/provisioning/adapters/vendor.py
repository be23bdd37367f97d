"""The vendor's provisioning API, as every answer turned into a `VendorOutcome`.

Cancelling and setting a quantity are idempotent at the vendor (a second cancel is 409 `already_canceled`,
the same quantity again is a no-op), so a call whose answer was lost (5xx, timeout, dropped connection)
is simply sent again within a small budget. A 4xx is the vendor's decision and is never retried.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from cancelflow.http_client import Exchange, JsonApiClient

T = TypeVar("T")


@dataclass(frozen=True)
class VendorOutcome:
    ok: bool
    already_done: bool
    http_status: int | None
    code: str  # ok | already_canceled | vendor_timeout | vendor_unavailable | vendor_rejected
    message: str  # the vendor's own description when it gave one
    retryable: bool
    attempts: int = 1
    vendor_code: str | None = None  # the vendor's error code, e.g. "invalid_quantity"
    reference: str | None = None

    @classmethod
    def succeeded(
        cls, *, already_done: bool = False, http_status: int | None = 200, message: str = "", **extra: Any
    ) -> VendorOutcome:
        """A success; `extra` takes `attempts` and `reference`."""
        code = "already_canceled" if already_done else "ok"
        return cls(True, already_done, http_status, code, message, False, **extra)

    @classmethod
    def failed(
        cls, code: str, message: str, *, retryable: bool, http_status: int | None = None, **extra: Any
    ) -> VendorOutcome:
        """A failure; `extra` takes `attempts` and `vendor_code`."""
        return cls(False, False, http_status, code, message, retryable, **extra)


# --- one exchange and what it means --------------------------------------------------------------


def classify(exchange: Exchange, *, cancelling: bool = True) -> VendorOutcome:
    """What an exchange means. `already_canceled` is success only when cancelling: a quantity change on a
    canceled subscription did not happen as asked."""
    if exchange.failure == "timeout":
        return VendorOutcome.failed("vendor_timeout", exchange.detail, retryable=True)
    if exchange.failure:
        return VendorOutcome.failed("vendor_unavailable", exchange.detail, retryable=True)
    status, body = exchange.status or 0, exchange.body
    vendor_code, message = body.get("error"), body.get("message") or f"The vendor answered HTTP {status}"
    if 200 <= status < 300:
        return VendorOutcome.succeeded(http_status=status, reference=body.get("reference"))
    if status == 409 and vendor_code == "already_canceled" and cancelling:
        # What we asked for is already true at the vendor (often our own earlier, unanswered call).
        return VendorOutcome.succeeded(already_done=True, http_status=status, message=message)
    retryable = status >= 500
    code = "vendor_unavailable" if retryable else "vendor_rejected"
    return VendorOutcome.failed(
        code, message, retryable=retryable, http_status=status, vendor_code=vendor_code
    )


def _cancel_body(subscription_id: str, request_id: str, effective_date: date) -> dict[str, Any]:
    return {
        "subscription_id": subscription_id,
        "request_id": request_id,
        "effective_date": effective_date.isoformat(),
    }


def _quantity_body(
    subscription_id: str, request_id: str, quantity: int, current_quantity: int | None
) -> dict[str, Any]:
    return {
        "subscription_id": subscription_id,
        "request_id": request_id,
        "quantity": quantity,
        "current_quantity": current_quantity,
    }


# --- the client ----------------------------------------------------------------------------------


class AbstractVendorClient(Protocol):
    async def cancel(
        self, vendor_subscription_id: str, *, subscription_id: str, request_id: str, effective_date: date
    ) -> VendorOutcome: ...

    async def set_quantity(
        self,
        vendor_subscription_id: str,
        *,
        subscription_id: str,
        request_id: str,
        quantity: int,
        current_quantity: int | None,
    ) -> VendorOutcome: ...


class VendorClient(JsonApiClient):
    """The vendor's provisioning API; see `JsonApiClient` for the session, timeout and retry budget."""

    target = "vendor"

    async def cancel(
        self, vendor_subscription_id: str, *, subscription_id: str, request_id: str, effective_date: date
    ) -> VendorOutcome:
        path = f"/v1/subscriptions/{quote(vendor_subscription_id, safe='')}/cancel"
        return await self._post(
            path, _cancel_body(subscription_id, request_id, effective_date), cancelling=True
        )

    async def set_quantity(
        self,
        vendor_subscription_id: str,
        *,
        subscription_id: str,
        request_id: str,
        quantity: int,
        current_quantity: int | None,
    ) -> VendorOutcome:
        path = f"/v1/subscriptions/{quote(vendor_subscription_id, safe='')}/quantity"
        body = _quantity_body(subscription_id, request_id, quantity, current_quantity)
        return await self._post(path, body, cancelling=False)

    async def _post(self, path: str, body: dict[str, Any], *, cancelling: bool) -> VendorOutcome:
        async def once() -> VendorOutcome:
            operation = "cancel" if cancelling else "set_quantity"
            return classify(await self.exchange("POST", path, body, operation=operation), cancelling=cancelling)

        outcome, attempts = await self.with_retries(once, lambda outcome: outcome.retryable)
        return replace(outcome, attempts=attempts)
