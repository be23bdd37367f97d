"""Events with plain defaults, for tests that care about a field or two of them."""

from __future__ import annotations

import uuid
from typing import Any

from cancelflow.events import CancellationRequested

CUSTOMER = {"user_id": "u-1", "role": "customer", "channel": "storefront"}


def cancellation_requested(**overrides: Any) -> CancellationRequested:
    """A customer's immediate cancellation of subscription sub-1 of account acc-1, a fresh request id."""
    values: dict[str, Any] = dict(
        request_id=uuid.uuid4(), account_id="acc-1", requested_by=CUSTOMER,
        target="subscription", subscription_id="sub-1", mode="immediate",
    )
    return CancellationRequested.model_validate({**values, **overrides})
