"""The payment gateway's API: refunds that can never be issued twice, schedules, charges.

A refund carries an idempotency key derived from the request, and every retry re-sends the same key, so
the gateway replays instead of refunding again. When a call times out or the connection drops, the
refund may exist without us knowing, so the key is looked up before sending again (and once more when
the budget is spent): a refund found there is the answer. What stays unresolved comes back `unknown`,
never as a failure the caller might "fix" with a new key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote

from cancelflow.http_client import Exchange, JsonApiClient

T = TypeVar("T")
CENT = Decimal("0.01")


class GatewayError(Exception):
    """The gateway could not answer a read (or refused a capture) within the budget."""

    def __init__(
        self, code: str, message: str, *, http_status: int | None = None, retryable: bool = True
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.http_status, self.retryable = code, message, http_status, retryable


@dataclass(frozen=True)
class RefundOutcome:
    status: Literal["succeeded", "failed", "unknown"]
    idempotency_key: str
    code: str  # ok | the gateway's error code (amount_exceeds_refundable, ...) | gateway_timeout | gateway_unavailable
    message: str
    http_status: int | None = None
    attempts: int = 1
    refund_id: str | None = None
    amount: Decimal | None = None
    currency: str | None = None
    kind: str | None = None  # reversal | refund: the gateway decides
    created_at: str | None = None
    replayed: bool = False  # the gateway answered from an earlier call with the same key
    found_by_lookup: bool = False  # the answer was lost; the refund was found under its key

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def retryable(self) -> bool:
        return self.status == "unknown"


@dataclass(frozen=True)
class GatewayOutcome:
    ok: bool
    already_done: bool
    http_status: int | None
    code: str
    message: str
    retryable: bool
    attempts: int = 1


# --- one exchange and what it means --------------------------------------------------------------


def _error(exchange: Exchange) -> tuple[str, str]:
    if exchange.failure:
        return ("gateway_timeout" if exchange.failure == "timeout" else "gateway_unavailable"), exchange.detail
    return (exchange.body.get("error") or f"http_{exchange.status}",
            exchange.body.get("message") or f"HTTP {exchange.status}")


def refund_outcome(key: str, exchange: Exchange) -> RefundOutcome:
    if exchange.status in (200, 201):
        return _succeeded(key, exchange)
    code, message = _error(exchange)
    status: Literal["unknown", "failed"] = "unknown" if exchange.worth_retrying else "failed"
    return RefundOutcome(status, key, code, message, exchange.status)


def _succeeded(key: str, exchange: Exchange) -> RefundOutcome:
    body = exchange.body
    return RefundOutcome(
        "succeeded",
        key,
        "ok",
        "",
        exchange.status,
        refund_id=body.get("refund_id"),
        amount=Decimal(body["amount"]) if body.get("amount") is not None else None,
        currency=body.get("currency"),
        kind=body.get("kind"),
        created_at=body.get("created_at"),
        replayed=exchange.headers.get("idempotent-replayed") == "true",
    )


def schedule_outcome(exchange: Exchange) -> GatewayOutcome:
    if exchange.status == 200:
        already = bool(exchange.body.get("already_stopped"))
        return GatewayOutcome(True, already, 200, "ok", "", False)
    code, message = _error(exchange)
    return GatewayOutcome(False, False, exchange.status, code, message, exchange.worth_retrying)


def _money(amount: Decimal) -> str:
    # Two places on the wire; a finer amount is sent as it is for the gateway to refuse, never rounded here.
    cents = amount.quantize(CENT)
    return str(cents) if cents == amount else str(amount)


def _refund_body(
    gateway_charge_id: str, amount: Decimal, currency: str, reason: str, request_id: str, subscription_id: str
) -> dict[str, Any]:
    return {
        "gateway_charge_id": gateway_charge_id,
        "amount": _money(amount),
        "currency": currency,
        "reason": reason,
        "request_id": request_id,
        "subscription_id": subscription_id,
    }


def _capture_body(
    amount: Decimal,
    currency: str,
    account_id: str,
    subscription_id: str,
    captured_at: datetime | None,
    gateway_charge_id: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": _money(amount),
        "currency": currency,
        "account_id": account_id,
        "subscription_id": subscription_id,
    }
    if captured_at is not None:
        body["captured_at"] = captured_at.isoformat()
    if gateway_charge_id is not None:
        body["gateway_charge_id"] = gateway_charge_id
    return body


# --- the client ----------------------------------------------------------------------------------


class AbstractGatewayClient(Protocol):
    async def refund(
        self,
        key: str,
        *,
        gateway_charge_id: str,
        amount: Decimal,
        currency: str,
        reason: str,
        request_id: str,
        subscription_id: str,
    ) -> RefundOutcome: ...

    async def lookup_refund(self, key: str) -> RefundOutcome | None: ...

    async def stop_schedule(self, subscription_id: str, *, request_id: str) -> GatewayOutcome: ...

    async def get_charge(self, gateway_charge_id: str) -> dict[str, Any] | None: ...

    async def capture(
        self,
        *,
        amount: Decimal,
        currency: str,
        account_id: str,
        subscription_id: str,
        captured_at: datetime | None = None,
        gateway_charge_id: str | None = None,
    ) -> dict[str, Any]: ...


class GatewayClient(JsonApiClient):
    """The payment gateway's API; see `JsonApiClient` for the session, timeout and retry budget."""

    target = "gateway"

    # refunds

    async def refund(
        self,
        key: str,
        *,
        gateway_charge_id: str,
        amount: Decimal,
        currency: str,
        reason: str,
        request_id: str,
        subscription_id: str,
    ) -> RefundOutcome:
        body = _refund_body(gateway_charge_id, amount, currency, reason, request_id, subscription_id)

        async def once() -> RefundOutcome:
            exchange = await self._exchange("POST", "/v1/refunds", body, headers={"Idempotency-Key": key})
            if exchange.answer_lost:
                found = await self._find_refund(key)
                if found is not None:
                    return replace(found, found_by_lookup=True)
            return refund_outcome(key, exchange)

        outcome, attempts = await self.with_retries(once, lambda outcome: outcome.status == "unknown")
        return replace(outcome, attempts=attempts)

    async def lookup_refund(self, key: str) -> RefundOutcome | None:
        """The refund created with `key`, None when there is none; GatewayError when the gateway can't say."""
        exchange, _ = await self.with_retries(
            lambda: self._exchange("GET", _refund_path(key)), lambda exchange: exchange.worth_retrying
        )
        if exchange.status == 404:
            return None
        if exchange.status == 200:
            return _succeeded(key, exchange)
        raise GatewayError(*_error(exchange), http_status=exchange.status)

    async def _find_refund(self, key: str) -> RefundOutcome | None:
        """One look-up inside a refund's own budget; no answer counts as not found (the key stays safe)."""
        exchange = await self._exchange("GET", _refund_path(key))
        return _succeeded(key, exchange) if exchange.status == 200 else None

    # schedules and charges

    async def stop_schedule(self, subscription_id: str, *, request_id: str) -> GatewayOutcome:
        path = f"/v1/schedules/{quote(subscription_id, safe='')}/cancel"
        body = {"subscription_id": subscription_id, "request_id": request_id}
        exchange, attempts = await self.with_retries(
            lambda: self._exchange("POST", path, body), lambda exchange: exchange.worth_retrying
        )
        return replace(schedule_outcome(exchange), attempts=attempts)

    async def get_charge(self, gateway_charge_id: str) -> dict[str, Any] | None:
        """The charge as the gateway sees it now (state, refunded, refundable); None when unknown."""
        path = f"/v1/charges/{quote(gateway_charge_id, safe='')}"
        exchange, _ = await self.with_retries(
            lambda: self._exchange("GET", path), lambda exchange: exchange.worth_retrying
        )
        if exchange.status == 404:
            return None
        if exchange.status == 200:
            return exchange.body
        raise GatewayError(*_error(exchange), http_status=exchange.status)

    async def capture(
        self,
        *,
        amount: Decimal,
        currency: str,
        account_id: str,
        subscription_id: str,
        captured_at: datetime | None = None,
        gateway_charge_id: str | None = None,
    ) -> dict[str, Any]:
        """Capture money (loaders and tests). Retried only with a charge id: without one, a lost answer
        sent again could capture twice."""
        body = _capture_body(amount, currency, account_id, subscription_id, captured_at, gateway_charge_id)
        exchange, _ = await self.with_retries(
            lambda: self._exchange("POST", "/v1/charges", body),
            lambda exchange: gateway_charge_id is not None and exchange.worth_retrying,
        )
        if exchange.status in (200, 201):
            return exchange.body
        raise GatewayError(*_error(exchange), http_status=exchange.status, retryable=exchange.worth_retrying)

    # plumbing

    async def _exchange(self, method: str, path: str, body: dict[str, Any] | None = None,
                        headers: dict[str, str] | None = None) -> Exchange:
        return await self.exchange(method, path, body, headers, operation=_operation(method, path))


def _operation(method: str, path: str) -> str:
    """A metrics label for a call (never the ids in its path)."""
    if path.startswith("/v1/refunds"):
        return "refund" if method == "POST" else "lookup_refund"
    if path.startswith("/v1/schedules"):
        return "stop_schedule"
    if path.startswith("/v1/charges"):
        return "capture" if method == "POST" else "get_charge"
    return "other"


def _refund_path(key: str) -> str:
    return f"/v1/refunds/{quote(key, safe='')}"
