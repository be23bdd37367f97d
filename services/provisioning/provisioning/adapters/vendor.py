"""The vendor's provisioning API, as every answer turned into a `VendorOutcome`.

Cancelling and setting a quantity are idempotent at the vendor (a second cancel is 409 `already_canceled`,
the same quantity again is a no-op), so a call whose answer was lost (5xx, timeout, dropped connection)
is simply sent again within a small budget. A 4xx is the vendor's decision and is never retried.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_random_exponential

from cancelflow import metrics
from cancelflow.sandboxes import vendor as vendor_sandbox
from cancelflow.sandboxes.common import run_action
from cancelflow.sandboxes.vendor import SubscriptionAction

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


@dataclass(frozen=True)
class _Exchange:
    """One HTTP exchange: the answer, or why there was none (`timeout`, `dropped`, `unreachable`)."""

    status: int | None
    body: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    detail: str = ""


def classify(exchange: _Exchange, *, cancelling: bool = True) -> VendorOutcome:
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


class VendorClient:
    """One aiohttp session per client: `async with VendorClient(url) as vendor`, or `start()`/`close()`."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        attempts: int = 4,
        backoff_base: float = 0.2,
        backoff_cap: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> VendorClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

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
            return classify(await self._exchange(path, body), cancelling=cancelling)

        outcome, attempts = await self._with_retries(once, lambda outcome: outcome.retryable)
        return replace(outcome, attempts=attempts)

    async def _with_retries(
        self, once: Callable[[], Awaitable[T]], retry_when: Callable[[T], bool]
    ) -> tuple[T, int]:
        """Run `once` until `retry_when` is false or the budget is spent; the last result and the count."""
        attempts = 0

        async def counted() -> T:
            nonlocal attempts
            attempts += 1
            return await once()

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            # Full jitter, so callers retrying the same vendor at once spread out.
            wait=wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_cap),
            retry=retry_if_result(retry_when),
            retry_error_callback=lambda state: state.outcome.result(),  # out of budget: keep the last answer
        )
        return await retrying(counted), attempts

    async def _exchange(self, path: str, body: dict[str, Any]) -> _Exchange:
        """One HTTP exchange, timed in cancelflow_external_call_seconds{target="vendor"}."""
        started = time.perf_counter()
        exchange = await self._send(path, body)
        operation = "cancel" if path.endswith("/cancel") else "set_quantity"
        metrics.EXTERNAL_CALL_SECONDS.labels(
            "vendor", operation, metrics.call_outcome(exchange.status, exchange.failure)
        ).observe(time.perf_counter() - started)
        return exchange

    async def _send(self, path: str, body: dict[str, Any]) -> _Exchange:
        await self.start()
        assert self._session is not None
        try:
            async with self._session.post(self.base_url + path, json=body) as response:
                return _Exchange(response.status, _json_object(await response.text()))
        except TimeoutError:
            return _Exchange(
                None, failure="timeout", detail=f"The vendor did not answer within {self.timeout:g} s"
            )
        except aiohttp.ClientConnectorError as exc:
            return _Exchange(None, failure="unreachable", detail=f"Cannot reach the vendor: {exc}")
        except aiohttp.ClientError as exc:
            detail = f"The connection to the vendor was lost before it answered ({type(exc).__name__})"
            return _Exchange(None, failure="dropped", detail=detail)


def _json_object(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"message": text[:500]}


# --- the fake ------------------------------------------------------------------------------------


class FakeVendorClient:
    """In-memory vendor for handler tests.

    It runs the vendor sandbox's own rules (lazy creation, 409 already_canceled, idempotent quantity),
    so it answers as the real one does; `script()` queues outcomes returned instead, with no effect.
    """

    def __init__(self) -> None:
        self.state = vendor_sandbox.empty_state()
        self.calls: list[dict[str, Any]] = []
        self.effects: list[dict[str, Any]] = []
        self._scripted: deque[VendorOutcome] = deque()

    def script(self, *outcomes: VendorOutcome) -> None:
        self._scripted.extend(outcomes)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def cancel(
        self, vendor_subscription_id: str, *, subscription_id: str, request_id: str, effective_date: date
    ) -> VendorOutcome:
        body = _cancel_body(subscription_id, request_id, effective_date)
        return self._call(vendor_subscription_id, body, vendor_sandbox.cancel, cancelling=True)

    async def set_quantity(
        self,
        vendor_subscription_id: str,
        *,
        subscription_id: str,
        request_id: str,
        quantity: int,
        current_quantity: int | None,
    ) -> VendorOutcome:
        body = _quantity_body(subscription_id, request_id, quantity, current_quantity)
        return self._call(vendor_subscription_id, body, vendor_sandbox.set_quantity, cancelling=False)

    def _call(
        self,
        vendor_subscription_id: str,
        body: dict[str, Any],
        action: SubscriptionAction,
        *,
        cancelling: bool,
    ) -> VendorOutcome:
        name = "cancel" if cancelling else "set_quantity"
        self.calls.append({"call": name, "vendor_subscription_id": vendor_subscription_id, **body})
        if self._scripted:
            return self._scripted.popleft()
        reply = run_action(lambda state, b: action(state, vendor_subscription_id, b), self.state, body)
        self.effects.extend(reply.effects)
        return classify(_Exchange(reply.status, reply.body), cancelling=cancelling)
