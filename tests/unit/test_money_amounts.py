"""Amounts are positive decimal strings (CONTRACT.md sections 1 and 5): a negative or zero charge is bad
input, refused at decoding (then dead-lettered, section 7), never recorded."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from cancelflow import topics
from cancelflow.events import ChargeCaptured, RefundIssued, SubscriptionActivated, envelope_for
from cancelflow.messaging.codec import BadRecord, decode, encode


def charge_envelope(amount: str) -> dict[str, Any]:
    charge = ChargeCaptured(charge_id="c1", account_id="a", subscription_id="s", amount="30.00", currency="USD",
                            captured_at=datetime(2026, 11, 1, tzinfo=UTC), gateway_charge_id="gw-1",
                            period_start="2026-11-01", period_end="2026-12-01")
    envelope = orjson.loads(encode(envelope_for(charge, producer="platform", correlation_id="a", causation_id=None)))
    envelope["payload"]["amount"] = amount
    return envelope


@pytest.mark.parametrize("amount", ["-30.00", "-0.01", "0.00", "0", "-0.00", "+30.00", "30.001", " 30.00"])
def test_a_charge_that_is_not_a_positive_amount_is_bad_input(amount: str) -> None:
    with pytest.raises(BadRecord) as bad:
        decode(orjson.dumps(charge_envelope(amount)), topic=topics.PAYMENTS_CHARGES)
    assert bad.value.reason == "invalid_payload"
    assert "amount" in bad.value.detail


@pytest.mark.parametrize(("amount", "read"), [("30.00", "30.00"), ("0.01", "0.01"), ("7", "7.00"), ("7.5", "7.50")])
def test_a_positive_charge_is_read_to_the_cent(amount: str, read: str) -> None:
    message = decode(orjson.dumps(charge_envelope(amount)), topic=topics.PAYMENTS_CHARGES)
    assert message.payload.amount == Decimal(read)  # type: ignore[attr-defined]


def test_a_negative_price_is_refused_and_a_free_one_is_not() -> None:
    values: dict[str, Any] = dict(
        subscription_id="s", account_id="a", customer={"email": "a@b.c", "name": "n"}, product_name="p",
        vendor="v", vendor_subscription_id="vs", billing_period="monthly", currency="USD", quantity=1,
        status="trial", current_period_start="2026-11-01", current_period_end="2026-12-01", auto_renew=True)
    with pytest.raises(ValidationError, match="unit_price"):
        SubscriptionActivated.model_validate({**values, "unit_price": "-1.00"})
    assert SubscriptionActivated.model_validate({**values, "unit_price": "0.00"}).unit_price == Decimal("0.00")


def test_code_cannot_build_a_negative_amount_either() -> None:
    with pytest.raises(ValidationError):
        RefundIssued(request_id="00000000-0000-0000-0000-000000000001", amount=Decimal("-1.00"), currency="USD",
                     status="succeeded")
    assert RefundIssued(request_id="00000000-0000-0000-0000-000000000001", amount=Decimal("0"), currency="USD",
                        status="not_due").amount == Decimal("0.00")
