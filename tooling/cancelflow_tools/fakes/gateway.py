"""An in-memory payment gateway for handler tests: the gateway sandbox's rules behind the client's interface."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from cancelflow.http_client import Exchange, lower_keys
from cancelflow_tools.fakes.common import SandboxFake
from cancelflow_tools.sandboxes import gateway as gateway_sandbox
from cancelflow_tools.sandboxes.common import Reply
from payment_gateway.adapters.gateway import (
    GatewayError,
    GatewayOutcome,
    RefundOutcome,
    _capture_body,
    _error,
    _refund_body,
    _succeeded,
    refund_outcome,
    schedule_outcome,
)


def _exchange_of(reply: Reply) -> Exchange:
    """A sandbox reply (the fake runs the sandbox's rules in-process) as an exchange."""
    return Exchange(reply.status, reply.body, lower_keys(reply.headers))


class FakeGatewayClient(SandboxFake[RefundOutcome]):
    """In-memory gateway for handler tests.

    It runs the gateway sandbox's own rules (idempotency keys, refundable amounts, disputes, reversal or
    refund), so it answers as the real one does; `script_refund()` queues outcomes returned instead.
    """

    def __init__(self) -> None:
        super().__init__(gateway_sandbox.empty_state())

    def script_refund(self, *outcomes: RefundOutcome) -> None:
        self._queue(*outcomes)

    def force_state(self, gateway_charge_id: str, state: str) -> None:
        """Make the gateway report a charge as `disputed`, `settled`, ... (as the sandbox hook does)."""
        self._run(gateway_sandbox.force_charge_state, gateway_charge_id, {"state": state})

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
        self.calls.append({"call": "refund", "idempotency_key": key, **body})
        if (scripted := self._next_scripted()) is not None:
            return scripted
        return refund_outcome(key, self._run(gateway_sandbox.refund, key, body))

    async def lookup_refund(self, key: str) -> RefundOutcome | None:
        self.calls.append({"call": "lookup_refund", "idempotency_key": key})
        exchange = self._run(gateway_sandbox.get_refund, key, {})
        return _succeeded(key, exchange) if exchange.status == 200 else None

    async def stop_schedule(self, subscription_id: str, *, request_id: str) -> GatewayOutcome:
        body = {"subscription_id": subscription_id, "request_id": request_id}
        self.calls.append({"call": "stop_schedule", **body})
        return schedule_outcome(self._run(gateway_sandbox.stop_schedule, subscription_id, body))

    async def get_charge(self, gateway_charge_id: str) -> dict[str, Any] | None:
        self.calls.append({"call": "get_charge", "gateway_charge_id": gateway_charge_id})
        exchange = self._run(gateway_sandbox.get_charge, gateway_charge_id, {})
        return exchange.body if exchange.status == 200 else None

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
        body = _capture_body(amount, currency, account_id, subscription_id, captured_at, gateway_charge_id)
        exchange = _exchange_of(self._apply(gateway_sandbox.capture, body))
        if exchange.status in (200, 201):
            return exchange.body
        raise GatewayError(*_error(exchange), http_status=exchange.status, retryable=False)

    def _run(self, action: Callable[..., Reply], value: str | None, body: dict[str, Any]) -> Exchange:
        return _exchange_of(self._apply(lambda state, b: action(state, value, b), body))
