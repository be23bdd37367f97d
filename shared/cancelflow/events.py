"""The event contracts: the envelope (CONTRACT.md section 1) and every payload, as pydantic models.

A payload class names its `event_type`, `schema_version` and topic; `REGISTRY` maps
(event_type, schema_version) to the class so a consumer can reject what it does not know.
schemas/ is generated from these classes (scripts/gen_schemas.py).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from cancelflow import topics

# --- value types -------------------------------------------------------------------------------

_MONEY = re.compile(r"^-?\d{1,12}(\.\d{1,2})?$")


def _parse_money(value: Any) -> Decimal:
    # Money is a decimal string ("49.95", CONTRACT.md section 1): a JSON number is the wrong type (a float
    # would bring binary noise). Code passes Decimals.
    if isinstance(value, Decimal):
        return value.quantize(Decimal("0.01"))
    if not isinstance(value, str):
        raise ValueError("money must be a decimal string such as \"49.95\"")
    text = str(value)
    if not _MONEY.match(text):
        raise ValueError(f"not a money amount with at most two decimals: {text!r}")
    return Decimal(text).quantize(Decimal("0.01"))


Money = Annotated[
    Decimal,
    BeforeValidator(_parse_money),
    PlainSerializer(lambda d: f"{d:.2f}", return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^-?\d+\.\d{2}$", "examples": ["49.95"]}),
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Source(StrEnum):
    validation = "validation"
    vendor = "vendor"
    platform = "platform"
    payment = "payment"
    notification = "notification"


class State(StrEnum):
    received = "received"
    pending_approval = "pending_approval"
    in_progress = "in_progress"
    scheduled = "scheduled"
    completed = "completed"
    failed = "failed"
    rejected = "rejected"
    manual_review = "manual_review"
    declined = "declined"


TERMINAL_STATES = frozenset({State.completed, State.failed, State.rejected, State.manual_review, State.declined})


class ValidationCode(StrEnum):
    not_owner = "not_owner"
    not_active = "not_active"
    invalid_effective_date = "invalid_effective_date"
    invalid_quantity = "invalid_quantity"
    provisioning_in_progress = "provisioning_in_progress"
    unknown_subscription = "unknown_subscription"
    unknown_charge = "unknown_charge"
    # Not a business rule: the record itself was unreadable (CONTRACT.md section 7).
    bad_input = "bad_input"


# --- base classes ------------------------------------------------------------------------------


class Payload(BaseModel):
    """An event's own fields. Unknown extra fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    topic: ClassVar[str]
    key_field: ClassVar[str] = "request_id"

    def record_key(self) -> str:
        return str(getattr(self, self.key_field))


class Envelope(BaseModel):
    """CONTRACT.md section 1: what every record on every topic is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: uuid.UUID
    event_type: str = Field(min_length=1)
    schema_version: int = Field(ge=1)
    occurred_at: AwareDatetime
    correlation_id: str = Field(min_length=1)
    causation_id: str | None = None
    producer: str = Field(min_length=1)
    payload: dict[str, Any]


REGISTRY: dict[tuple[str, int], type[Payload]] = {}
P = TypeVar("P", bound=type[Payload])


def register(cls: P) -> P:
    REGISTRY[(cls.event_type, cls.schema_version)] = cls
    return cls


# --- upstream facts (section 3) ----------------------------------------------------------------


class Customer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str


@register
class SubscriptionActivated(Payload):
    event_type: ClassVar[str] = "SubscriptionActivated"
    topic: ClassVar[str] = topics.PLATFORM_SUBSCRIPTIONS
    key_field: ClassVar[str] = "subscription_id"

    subscription_id: str = Field(min_length=1)
    account_id: str = Field(min_length=1)
    customer: Customer
    product_name: str
    vendor: str
    vendor_subscription_id: str
    billing_period: Literal["monthly", "annual"]
    unit_price: Money
    currency: Currency
    quantity: int = Field(ge=1)
    status: Literal["active", "trial"]
    current_period_start: date
    current_period_end: date
    auto_renew: bool

    @model_validator(mode="after")
    def _period(self) -> SubscriptionActivated:
        if self.current_period_end <= self.current_period_start:
            raise ValueError("current_period_end must be after current_period_start")
        return self


@register
class ChargeCaptured(Payload):
    event_type: ClassVar[str] = "ChargeCaptured"
    topic: ClassVar[str] = topics.PAYMENTS_CHARGES
    key_field: ClassVar[str] = "account_id"

    charge_id: str = Field(min_length=1)
    account_id: str = Field(min_length=1)
    subscription_id: str = Field(min_length=1)
    amount: Money
    currency: Currency
    captured_at: AwareDatetime
    gateway_charge_id: str = Field(min_length=1)
    period_start: date
    period_end: date
    quantity: int | None = Field(None, ge=1, description="the licenses this charge pays for; absent = the subscription's")


# --- upstream requests (section 4) -------------------------------------------------------------


class RequestedBy(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: str
    role: Literal["customer", "operator"]
    channel: Literal["storefront", "bss"]


class Mode(StrEnum):
    immediate = "immediate"
    past_dated = "past_dated"
    end_of_term = "end_of_term"


@register
class CancellationRequested(Payload):
    event_type: ClassVar[str] = "CancellationRequested"
    topic: ClassVar[str] = topics.REQUESTED

    request_id: uuid.UUID
    account_id: str = Field(min_length=1)
    requested_by: RequestedBy
    target: Literal["subscription", "charges"]
    subscription_id: str | None = None
    mode: Mode = Mode.immediate
    effective_date: date | None = None
    quantity: int | None = Field(None, description="licenses to remove (partial); absent = whole subscription")
    charge_ids: list[str] = Field(default_factory=list)
    reason: str = ""
    requires_approval: bool = False
    opt_out_of_emails: bool = False
    retry_of: uuid.UUID | None = Field(None, description="the request an operator's retry repeats (section 11)")

    @model_validator(mode="after")
    def _target_fields(self) -> CancellationRequested:
        if self.target == "subscription" and not self.subscription_id:
            raise ValueError("target 'subscription' needs subscription_id")
        if self.target == "charges" and not self.charge_ids:
            raise ValueError("target 'charges' needs charge_ids")
        return self

    def record_key(self) -> str:
        return self.subscription_id if self.target == "subscription" else self.account_id  # type: ignore[return-value]


@register
class CancellationApproved(Payload):
    event_type: ClassVar[str] = "CancellationApproved"
    topic: ClassVar[str] = topics.REQUESTED

    request_id: uuid.UUID
    decided_by: str
    note: str = ""


@register
class CancellationDeclined(Payload):
    event_type: ClassVar[str] = "CancellationDeclined"
    topic: ClassVar[str] = topics.REQUESTED

    request_id: uuid.UUID
    decided_by: str
    note: str = ""


# --- saga events (internal topic cancellations.saga, key request_id) ---------------------------


class SagaEvent(Payload):
    topic: ClassVar[str] = topics.SAGA
    request_id: uuid.UUID


@register
class CancellationReceived(SagaEvent):
    """The intake accepted the record as a request: what the tracker starts the request's view from."""

    event_type: ClassVar[str] = "CancellationReceived"

    account_id: str
    target: Literal["subscription", "charges"]
    subscription_id: str | None = None
    charge_ids: list[str] = Field(default_factory=list)
    mode: Mode
    effective_date: date | None = None
    quantity: int | None = None
    requested_by: RequestedBy
    reason: str = ""
    requires_approval: bool = False
    opt_out_of_emails: bool = False
    retry_of: uuid.UUID | None = None


class SubscriptionSnapshot(BaseModel):
    """The subscription's statuses as a step left them (what support sees in the status record)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    subscription_status: str | None = None
    provisioning_status: str | None = None
    effective_date: date | None = None
    access_end_date: date | None = None


@register
class ApprovalPending(SagaEvent):
    """A valid storefront request waits for an operator (no side effect until approved)."""

    event_type: ClassVar[str] = "ApprovalPending"

    subscription_id: str
    snapshot: SubscriptionSnapshot


@register
class RequestDeclined(SagaEvent):
    """An operator declined a request that was pending approval; the customer is told."""

    event_type: ClassVar[str] = "RequestDeclined"

    subscription_id: str | None = None
    decided_by: str
    note: str = ""


@register
class CancellationScheduled(SagaEvent):
    """End-of-term: the vendor-first steps run when the period ends. A full cancellation stops auto-renew
    now (billing, and the gateway's schedule on this event); a partial one (`full` false) keeps it: the
    subscription renews with the licenses that are left."""

    event_type: ClassVar[str] = "CancellationScheduled"

    account_id: str
    subscription_id: str
    run_on: date
    history: str
    snapshot: SubscriptionSnapshot
    full: bool = True


@register
class AutoRenewStopped(SagaEvent):
    """The gateway's recurring schedule for the subscription is stopped."""

    event_type: ClassVar[str] = "AutoRenewStopped"

    subscription_id: str


@register
class VendorCancellationRequested(SagaEvent):
    """Billing locked the subscription (provisioning `In Progress`) and asks provisioning to go to the vendor."""

    event_type: ClassVar[str] = "VendorCancellationRequested"

    account_id: str
    subscription_id: str
    vendor: str
    vendor_subscription_id: str
    effective_date: date
    current_quantity: int
    new_quantity: int = Field(description="0 for a full cancellation")
    snapshot: SubscriptionSnapshot
    retry_of: uuid.UUID | None = Field(None, description="an operator's retry of this request (section 11)")


@register
class VendorProvisioned(SagaEvent):
    """The vendor confirmed the cancellation (or had already applied it)."""

    event_type: ClassVar[str] = "VendorProvisioned"

    subscription_id: str
    vendor: str
    vendor_subscription_id: str
    new_quantity: int
    already_applied: bool = False
    attempts: int = 1


@register
class VendorCancellationFailed(SagaEvent):
    """The vendor refused or could not be reached within the retry budget; billing reverts."""

    event_type: ClassVar[str] = "VendorCancellationFailed"

    subscription_id: str
    vendor: str
    vendor_subscription_id: str
    code: str
    message: str
    http_status: int | None = None
    retryable: bool
    attempts: int = 1


@register
class PlatformCommitted(SagaEvent):
    """Billing committed the cancellation on our platform; what the money side needs to refund."""

    event_type: ClassVar[str] = "PlatformCommitted"

    account_id: str
    subscription_id: str
    mode: Mode
    full: bool
    trial: bool
    effective_date: date
    access_end_date: date
    period_start: date
    period_end: date
    quantity_before: int
    quantity_after: int
    currency: Currency
    refund_due: bool
    history: str
    snapshot: SubscriptionSnapshot


class RefundLine(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: str
    gateway_charge_id: str
    amount: Money
    currency: Currency
    idempotency_key: str
    kind: str | None = None
    outcome: Literal["succeeded", "failed", "unknown"]
    refund_id: str | None = None
    error: str | None = None


@register
class RefundIssued(SagaEvent):
    """The money step is done: the refund went through, or no refund was due."""

    event_type: ClassVar[str] = "RefundIssued"

    subscription_id: str | None = None
    amount: Money
    currency: Currency
    status: Literal["succeeded", "not_due"]
    lines: list[RefundLine] = Field(default_factory=list)
    auto_renew_stopped: bool = False


@register
class Failed(SagaEvent):
    """A request ended badly at `source`. Validation -> rejected, vendor/platform -> failed,
    payment -> manual_review (the cancellation stays committed)."""

    event_type: ClassVar[str] = "Failed"

    source: Source
    code: str
    message: str
    retryable: bool = False
    history: str | None = None
    snapshot: SubscriptionSnapshot | None = None
    details: dict[str, Any] = Field(default_factory=dict, description="what support needs to act")


@register
class EmailSent(SagaEvent):
    """An outcome email (or a support alert) was delivered; the tracker adds it to the history."""

    event_type: ClassVar[str] = "EmailSent"

    kind: str
    audience: Literal["customer", "support"]
    subject: str
    message_id: str


@register
class RequestStuck(SagaEvent):
    """A request made no progress at `stage` since `since` and is not terminal: support is alerted
    and the customer is told it is being reviewed (one of each per request)."""

    event_type: ClassVar[str] = "RequestStuck"

    stage: str
    since: AwareDatetime
    stuck_for_seconds: float = Field(ge=0)


@register
class OperatorActed(SagaEvent):
    """A support operator acted on the request (CONTRACT.md section 11): a history line, and on a
    finished request its `resolution`. The work the action causes runs as its own request
    (`new_request_id`)."""

    event_type: ClassVar[str] = "OperatorActed"

    action: Literal["approve", "decline", "retry", "retry_refund", "close"]
    operator: str
    note: str = ""
    new_request_id: uuid.UUID | None = None


@register
class RefundRetryRequested(SagaEvent):
    """An operator resolves a `manual_review` request by trying its refused refunds again: a request of
    its own (`request_id`) for the refunds of `retry_of`, through the refund guard with new keys."""

    event_type: ClassVar[str] = "RefundRetryRequested"

    retry_of: uuid.UUID
    account_id: str | None = None
    subscription_id: str | None = None
    operator: str
    note: str = ""


# --- the multiple-charge flow (target `charges`): dispute <-> payment-gateway ----------------------


class DisputedCharge(BaseModel):
    """A charge a dispute asks about, as the dispute service knows it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: str
    gateway_charge_id: str
    amount: Money
    currency: Currency


@register
class ChargesVerificationRequested(SagaEvent):
    """Dispute found listed charges that look duplicated and asks payment-gateway to confirm their state
    with the gateway (captured, settled, refunded, disputed) before anything is refunded."""

    event_type: ClassVar[str] = "ChargesVerificationRequested"

    account_id: str
    charges: list[DisputedCharge]


class ChargeVerification(BaseModel):
    """What the gateway says of one charge now, and what our refund guard has left of it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: str
    gateway_charge_id: str
    found: bool = Field(description="false when the gateway does not know the charge (or could not say)")
    state: str | None = Field(None, description="captured | settled | partially_refunded | refunded | disputed")
    amount: Money | None = None
    currency: str | None = None
    refunded: Money | None = None
    refundable: Money | None = Field(None, description="what the gateway would still refund")
    guard_refundable: Money | None = Field(None, description="what the refund guard has left (reservations "
                                                             "of refunds in flight deducted)")
    captured_at: str | None = None
    error: str | None = None


@register
class ChargesVerified(SagaEvent):
    """Payment-gateway's answer to ChargesVerificationRequested: the gateway's view of each charge."""

    event_type: ClassVar[str] = "ChargesVerified"

    charges: list[ChargeVerification]


class DuplicateRefundLine(BaseModel):
    """One confirmed duplicate to refund in full, under the key derived from the request and the charge."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: str
    gateway_charge_id: str
    amount: Money
    currency: Currency
    idempotency_key: str = Field(description="cf-dispute-<request_id>-<charge_id>")
    duplicate_of: str | None = None


@register
class DuplicateRefundRequested(SagaEvent):
    """Dispute asks payment-gateway to refund confirmed duplicates, through the same refund guard and
    idempotency keys as cancellation refunds (the gateway decides reversal or refund)."""

    event_type: ClassVar[str] = "DuplicateRefundRequested"

    account_id: str
    lines: list[DuplicateRefundLine]


@register
class DuplicateRefundsIssued(SagaEvent):
    """Payment-gateway's outcome per duplicate: succeeded (reversal or refund) or failed (the guard found
    too little left of the charge, or the gateway refused) with the error."""

    event_type: ClassVar[str] = "DuplicateRefundsIssued"

    lines: list[RefundLine]


@register
class DisputeStepRecorded(SagaEvent):
    """One audit record of a dispute (detected, validated, gateway_verified, refund_requested,
    refund_issued, refund_failed, escalated): kept in the dispute service's database and added to the
    request's status history."""

    event_type: ClassVar[str] = "DisputeStepRecorded"

    step: str
    actor: str
    charge_id: str | None = None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


# --- outputs -----------------------------------------------------------------------------------


class RefundView(BaseModel):
    model_config = ConfigDict(extra="ignore")
    amount: Money
    currency: Currency
    status: str


class ErrorView(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: Source
    code: str
    message: str


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    at: AwareDatetime
    message: str


class Resolution(BaseModel):
    """CONTRACT.md section 11: what an operator did about a finished request."""

    model_config = ConfigDict(extra="ignore")
    by: str
    at: AwareDatetime
    action: str
    note: str = ""
    request_id: uuid.UUID | None = Field(None, description="the new request of a retry")


@register
class CancellationStatusChanged(Payload):
    """CONTRACT.md section 6: the full current view of a request, one record per change."""

    event_type: ClassVar[str] = "CancellationStatusChanged"
    topic: ClassVar[str] = topics.STATUS

    request_id: uuid.UUID
    account_id: str | None = None
    target: Literal["subscription", "charges"] | None = None
    subscription_id: str | None = None
    charge_ids: list[str] = Field(default_factory=list)
    mode: Mode | None = None
    state: State
    stage: Source | None = None
    subscription_status: str | None = None
    provisioning_status: str | None = None
    effective_date: date | None = None
    access_end_date: date | None = None
    refund: RefundView | None = None
    error: ErrorView | None = None
    history: list[HistoryEntry] = Field(default_factory=list)
    version: int = Field(ge=1)
    updated_at: AwareDatetime
    retry_of: uuid.UUID | None = None
    resolution: Resolution | None = None


@register
class RecordDeadLettered(Payload):
    """CONTRACT.md section 7: a record no consumer could take, kept with its bytes (or digest) and reason."""

    event_type: ClassVar[str] = "RecordDeadLettered"
    topic: ClassVar[str] = topics.DLQ
    key_field: ClassVar[str] = "original_key"

    reason: str
    detail: str
    topic_name: str = Field(alias="topic")
    partition: int
    offset: int
    original_key: str | None = None
    consumer_group: str
    original_size: int
    original_sha256: str
    original_base64: str | None = Field(None, description="the record value; null when it was over 1 MiB")
    request_id: str | None = None

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def record_key(self) -> str:
        return self.original_key or ""


def envelope_for(payload: Payload, *, producer: str, correlation_id: str, causation_id: str | None) -> Envelope:
    return Envelope(
        event_id=uuid.uuid4(),
        event_type=payload.event_type,
        schema_version=payload.schema_version,
        occurred_at=utcnow(),
        correlation_id=correlation_id,
        causation_id=causation_id,
        producer=producer,
        payload=payload.model_dump(mode="json", by_alias=True),
    )
