"""An in-memory vendor for handler tests: the vendor sandbox's rules behind the client's interface."""

from __future__ import annotations

from datetime import date
from typing import Any

from cancelflow.http_client import Exchange
from cancelflow_tools.fakes.common import SandboxFake
from cancelflow_tools.sandboxes import vendor as vendor_sandbox
from cancelflow_tools.sandboxes.vendor import SubscriptionAction
from provisioning.adapters.vendor import VendorOutcome, _cancel_body, _quantity_body, classify


class FakeVendorClient(SandboxFake[VendorOutcome]):
    """In-memory vendor for handler tests.

    It runs the vendor sandbox's own rules (lazy creation, 409 already_canceled, idempotent quantity),
    so it answers as the real one does; `script()` queues outcomes returned instead, with no effect.
    """

    def __init__(self) -> None:
        super().__init__(vendor_sandbox.empty_state())

    def script(self, *outcomes: VendorOutcome) -> None:
        self._queue(*outcomes)

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
        if (scripted := self._next_scripted()) is not None:
            return scripted
        reply = self._apply(lambda state, b: action(state, vendor_subscription_id, b), body)
        return classify(Exchange(reply.status, reply.body), cancelling=cancelling)
