"""What services agree on without importing each other: the refund idempotency keys and the refund
guard's codes. The keys are the gateway's idempotency: a changed format would refund twice."""

from __future__ import annotations

from enum import StrEnum

# Every cancellation refund's key starts so, its retries' included (they refund the same licenses).
CANCELLATION_REFUND_PREFIX = "cf-refund-"


def cancellation_refund_key(request_id: str, charge_id: str) -> str:
    """A cancellation's refund of one charge: a redelivery or a retry reuses it, never a new one."""
    return f"{CANCELLATION_REFUND_PREFIX}{request_id}-{charge_id}"


def retry_refund_key(refused_request_id: str, charge_id: str) -> str:
    """An operator's retry of a refused refund line: one per refused request and charge, whoever retries."""
    return f"{CANCELLATION_REFUND_PREFIX}retry-{refused_request_id}-{charge_id}"


def dispute_refund_key(request_id: str, charge_id: str) -> str:
    """A duplicate charge's refund (the multiple-charge flow): the dispute service derives it and
    payment-gateway refuses a line carrying any other."""
    return f"cf-dispute-{request_id}-{charge_id}"


class GuardCode(StrEnum):
    """Why the refund guard refused a refund line: the error starts with the code, then `: ` and why."""

    # Too little left of the charge (already refunded, or reserved by a refund in flight).
    insufficient_refundable_balance = "insufficient_refundable_balance"
    unexpected_idempotency_key = "unexpected_idempotency_key"
    unknown_charge = "unknown_charge"
    charge_mismatch = "charge_mismatch"

    def refused(self, why: str) -> str:
        return f"{self.value}: {why}"

    def refused_in(self, error: str | None) -> bool:
        """Whether a refund line's error is this refusal."""
        return (error or "").startswith(self.value)
