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
    AfterValidator,
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

_MONEY = re.compile(r"^\d{1,12}(\.\d{1,2})?$")


def _parse_money(value: Any) -> Decimal:
    # Money is a decimal string ("49.95", CONTRACT.md section 1): a JSON number is the wrong type (a float
    # would bring binary noise). Code passes Decimals. Never negative: a refund is its own event.
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise ValueError(f"not a money amount: {value}")
        return value.quantize(Decimal("0.01"))
    if not isinstance(value, str):
        raise ValueError("money must be a decimal string such as \"49.95\"")
    text = str(value)
    if not _MONEY.match(text):
        raise ValueError(f"not a money amount (digits, at most two decimals, never negative): {text!r}")
    return Decimal(text).quantize(Decimal("0.01"))


def _positive(amount: Decimal) -> Decimal:
    if amount <= 0:
        raise ValueError(f"an amount must be positive, not {amount:.2f}")
    return amount


Money = Annotated[
    Decimal,
    BeforeValidator(_parse_money),
    PlainSerializer(lambda d: f"{d:.2f}", return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+\.\d{2}$", "examples": ["49.95"]}),
]
# What was paid (a captured charge): above zero (CONTRACT.md section 5, "amounts are positive").
PositiveMoney = Annotated[
    Decimal,
    BeforeValidator(_parse_money),
    AfterValidator(_positive),
    PlainSerializer(lambda d: f"{d:.2f}", return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+\.\d{2}$", "not": {"pattern": r"^0+\.00$"},
                    "examples": ["49.95"]}),
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", max_length=3, description="ISO 4217 code")]

# What the stores hold (each service's orm.py): a value a schema accepts fits wherever it is kept, so a
# value that would not is bad input at the door (tests/unit/test_store_limits.py holds the two together).
ID_CHARS = 100  # subscription, account and charge ids
NAME_CHARS = 200  # the vendor's and the gateway's ids, idempotency keys, names, who did something
# A request's free text (reason, an operator's note): small enough that every event derived from a
# request, its status history included, stays far below a record's 1 MiB (CONTRACT.md section 7).
TEXT_CHARS = 2000
ACTOR_CHARS = NAME_CHARS + 50  # who did a step: a user id with its role and channel (dispute's audit)
MAX_CHARGES = 100  # charge ids in one request

Id = Annotated[str, Field(max_length=ID_CHARS)]
Name = Annotated[str, Field(max_length=NAME_CHARS)]
Text = Annotated[str, Field(max_length=TEXT_CHARS)]
Code = Annotated[str, Field(max_length=50)]  # an error code (provisioning's `code` column)
Status = Annotated[str, Field(max_length=20)]  # a subscription's, a refund's or an email's status
LongStatus = Annotated[str, Field(max_length=30)]  # a provisioning status, a gateway's charge state


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


# The services, by the names they sign with (`published_by` below).
BILLING, PROVISIONING, PAYMENT_GATEWAY = frozenset({"billing"}), frozenset({"provisioning"}), frozenset({"payment_gateway"})
DISPUTE, NOTIFICATION, STATUS_TRACKER = frozenset({"dispute"}), frozenset({"notification"}), frozenset({"status_tracker"})
PUBLISHERS = BILLING | PROVISIONING | PAYMENT_GATEWAY | DISPUTE | NOTIFICATION | STATUS_TRACKER


# --- base classes ------------------------------------------------------------------------------


class Payload(BaseModel):
    """An event's own fields. Unknown extra fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    topic: ClassVar[str]
    key_field: ClassVar[str] = "request_id"
    # An internal type: the services whose signature a consumer accepts on it (CONTRACT.md section 10).
    # None: any of our services (a dead letter), or an upstream type (its producers are configured).
    published_by: ClassVar[frozenset[str] | None] = None

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
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)
    name: Name


@register
class SubscriptionActivated(Payload):
    event_type: ClassVar[str] = "SubscriptionActivated"
    topic: ClassVar[str] = topics.PLATFORM_SUBSCRIPTIONS
    key_field: ClassVar[str] = "subscription_id"

    subscription_id: Id = Field(min_length=1)
    account_id: Id = Field(min_length=1)
    customer: Customer
    product_name: Name
    vendor: Id
    vendor_subscription_id: Name
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

    charge_id: Id = Field(min_length=1)
    account_id: Id = Field(min_length=1)
    subscription_id: Id = Field(min_length=1)
    amount: PositiveMoney
    currency: Currency
    captured_at: AwareDatetime
    gateway_charge_id: Name = Field(min_length=1)
    period_start: date
    period_end: date
    quantity: int | None = Field(None, ge=1, description="the licenses this charge pays for; absent = the subscription's")


# --- upstream requests (section 4) -------------------------------------------------------------


class RequestedBy(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: Name
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
    account_id: Id = Field(min_length=1)
    requested_by: RequestedBy
    target: Literal["subscription", "charges"]
    subscription_id: Id | None = None
    mode: Mode = Mode.immediate
    effective_date: date | None = None
    quantity: int | None = Field(None, description="licenses to remove (partial); absent = whole subscription")
    charge_ids: list[Id] = Field(default_factory=list, max_length=MAX_CHARGES)
    reason: Text = ""
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
    decided_by: Name
    note: Text = ""


@register
class CancellationDeclined(Payload):
    event_type: ClassVar[str] = "CancellationDeclined"
    topic: ClassVar[str] = topics.REQUESTED

    request_id: uuid.UUID
    decided_by: Name
    note: Text = ""


# --- saga events (internal topic cancellations.saga, key request_id) ---------------------------


class SagaEvent(Payload):
    topic: ClassVar[str] = topics.SAGA
    request_id: uuid.UUID


@register
class CancellationReceived(SagaEvent):
    """The intake accepted the record as a request: what the tracker starts the request's view from."""

    event_type: ClassVar[str] = "CancellationReceived"
    published_by: ClassVar[frozenset[str] | None] = BILLING

    account_id: Id
    target: Literal["subscription", "charges"]
    subscription_id: Id | None = None
    charge_ids: list[Id] = Field(default_factory=list, max_length=MAX_CHARGES)
    mode: Mode
    effective_date: date | None = None
    quantity: int | None = None
    requested_by: RequestedBy
    reason: Text = ""
    requires_approval: bool = False
    opt_out_of_emails: bool = False
    retry_of: uuid.UUID | None = None


class SubscriptionSnapshot(BaseModel):
    """The subscription's statuses as a step left them (what support sees in the status record)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    subscription_status: Status | None = None
    provisioning_status: LongStatus | None = None
    effective_date: date | None = None
    access_end_date: date | None = None


@register
class ApprovalPending(SagaEvent):
    """A valid storefront request waits for an operator (no side effect until approved)."""

    event_type: ClassVar[str] = "ApprovalPending"
    published_by: ClassVar[frozenset[str] | None] = BILLING

    subscription_id: Id
    snapshot: SubscriptionSnapshot


@register
class RequestDeclined(SagaEvent):
    """An operator declined a request that was pending approval; the customer is told."""

    event_type: ClassVar[str] = "RequestDeclined"
    published_by: ClassVar[frozenset[str] | None] = BILLING

    subscription_id: Id | None = None
    decided_by: Name
    note: Text = ""


@register
class CancellationScheduled(SagaEvent):
    """End-of-term: the vendor-first steps run when the period ends. A full cancellation stops auto-renew
    now (billing, and the gateway's schedule on this event); a partial one (`full` false) keeps it: the
    subscription renews with the licenses that are left."""

    event_type: ClassVar[str] = "CancellationScheduled"
    published_by: ClassVar[frozenset[str] | None] = BILLING

    account_id: Id
    subscription_id: Id
    run_on: date
    history: str
    snapshot: SubscriptionSnapshot
    full: bool = True


@register
class AutoRenewStopped(SagaEvent):
    """The gateway's recurring schedule for the subscription is stopped."""

    event_type: ClassVar[str] = "AutoRenewStopped"
    published_by: ClassVar[frozenset[str] | None] = PAYMENT_GATEWAY

    subscription_id: Id


@register
class VendorCancellationRequested(SagaEvent):
    """Billing locked the subscription (provisioning `In Progress`) and asks provisioning to go to the vendor."""

    event_type: ClassVar[str] = "VendorCancellationRequested"
    published_by: ClassVar[frozenset[str] | None] = BILLING

    account_id: Id
    subscription_id: Id
    vendor: Id
    vendor_subscription_id: Name
    effective_date: date
    current_quantity: int
    new_quantity: int = Field(description="0 for a full cancellation")
    snapshot: SubscriptionSnapshot
    retry_of: uuid.UUID | None = Field(None, description="an operator's retry of this request (section 11)")


@register
class VendorProvisioned(SagaEvent):
    """The vendor confirmed the cancellation (or had already applied it)."""

    event_type: ClassVar[str] = "VendorProvisioned"
    published_by: ClassVar[frozenset[str] | None] = PROVISIONING

    subscription_id: Id
    vendor: Id
    vendor_subscription_id: Name
    new_quantity: int
    already_applied: bool = False
    attempts: int = 1


@register
class VendorCancellationFailed(SagaEvent):
    """The vendor refused or could not be reached within the retry budget; billing reverts."""

    event_type: ClassVar[str] = "VendorCancellationFailed"
    published_by: ClassVar[frozenset[str] | None] = PROVISIONING

    subscription_id: Id
    vendor: Id
    vendor_subscription_id: Name
    code: Code
    message: str
    http_status: int | None = None
    retryable: bool
    attempts: int = 1


@register
class PlatformCommitted(SagaEvent):
    """Billing committed the cancellation on our platform; what the money side needs to refund."""

    event_type: ClassVar[str] = "PlatformCommitted"
    published_by: ClassVar[frozenset[str] | None] = BILLING

    account_id: Id
    subscription_id: Id
    mode: Mode
    full: bool
    trial: bool
    effective_date: date
    access_end_date: date
    period_start: date
    period_end: date
    quantity_before: int
    quantity_after: int
    period_quantity: int | None = Field(None, ge=1, description="the subscription's quantity when the period "
                                                                 "began: the licenses a charge without its own "
                                                                 "quantity paid for")
    currency: Currency
    refund_due: bool
    history: str
    snapshot: SubscriptionSnapshot


class RefundLine(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: Id
    gateway_charge_id: Name
    amount: Money
    currency: Currency
    idempotency_key: Name
    kind: Status | None = None  # refund | reversal
    outcome: Literal["succeeded", "failed", "unknown"]
    refund_id: Name | None = None
    error: str | None = None


@register
class RefundIssued(SagaEvent):
    """The money step is done: the refund went through, or no refund was due."""

    event_type: ClassVar[str] = "RefundIssued"
    published_by: ClassVar[frozenset[str] | None] = PAYMENT_GATEWAY | DISPUTE

    subscription_id: Id | None = None
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
    published_by: ClassVar[frozenset[str] | None] = BILLING | PROVISIONING | PAYMENT_GATEWAY | DISPUTE | NOTIFICATION

    source: Source
    code: Code
    message: str
    retryable: bool = False
    history: str | None = None
    snapshot: SubscriptionSnapshot | None = None
    details: dict[str, Any] = Field(default_factory=dict, description="what support needs to act")


@register
class EmailSent(SagaEvent):
    """An outcome email (or a support alert) was delivered; the tracker adds it to the history."""

    event_type: ClassVar[str] = "EmailSent"
    published_by: ClassVar[frozenset[str] | None] = NOTIFICATION

    kind: Annotated[str, Field(max_length=50)]
    audience: Literal["customer", "support"]
    subject: str
    message_id: Name


@register
class RequestStuck(SagaEvent):
    """A request made no progress at `stage` since `since` and is not terminal: support is alerted
    and the customer is told it is being reviewed (one of each per request)."""

    event_type: ClassVar[str] = "RequestStuck"
    published_by: ClassVar[frozenset[str] | None] = STATUS_TRACKER

    stage: Status
    since: AwareDatetime
    stuck_for_seconds: float = Field(ge=0)


@register
class OperatorActed(SagaEvent):
    """A support operator acted on the request (CONTRACT.md section 11): a history line, and on a
    finished request its `resolution`. The work the action causes runs as its own request
    (`new_request_id`)."""

    event_type: ClassVar[str] = "OperatorActed"
    published_by: ClassVar[frozenset[str] | None] = STATUS_TRACKER

    action: Literal["approve", "decline", "retry", "retry_refund", "close"]
    operator: Id  # the operator's name, as the audit trail keeps it
    note: Text = ""
    new_request_id: uuid.UUID | None = None


@register
class RefundRetryRequested(SagaEvent):
    """An operator resolves a `manual_review` request by trying its refused refunds again: a request of
    its own (`request_id`) for the refunds of `retry_of`, through the refund guard with new keys."""

    event_type: ClassVar[str] = "RefundRetryRequested"
    published_by: ClassVar[frozenset[str] | None] = STATUS_TRACKER

    retry_of: uuid.UUID
    account_id: Id | None = None
    subscription_id: Id | None = None
    operator: Id  # the operator's name, as the audit trail keeps it
    note: Text = ""


# --- the multiple-charge flow (target `charges`): dispute <-> payment-gateway ----------------------


class DisputedCharge(BaseModel):
    """A charge a dispute asks about, as the dispute service knows it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: Id
    gateway_charge_id: Name
    amount: Money
    currency: Currency


@register
class ChargesVerificationRequested(SagaEvent):
    """Dispute found listed charges that look duplicated and asks payment-gateway to confirm their state
    with the gateway (captured, settled, refunded, disputed) before anything is refunded."""

    event_type: ClassVar[str] = "ChargesVerificationRequested"
    published_by: ClassVar[frozenset[str] | None] = DISPUTE

    account_id: Id
    charges: list[DisputedCharge]


class ChargeVerification(BaseModel):
    """What the gateway says of one charge now, and what our refund guard has left of it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: Id
    gateway_charge_id: Name
    found: bool = Field(description="false when the gateway does not know the charge (or could not say)")
    state: LongStatus | None = Field(None, description="captured | settled | partially_refunded | refunded | disputed")
    amount: Money | None = None
    currency: Currency | None = None
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
    published_by: ClassVar[frozenset[str] | None] = PAYMENT_GATEWAY

    charges: list[ChargeVerification]


class DuplicateRefundLine(BaseModel):
    """One confirmed duplicate to refund in full, under the key derived from the request and the charge."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    charge_id: Id
    gateway_charge_id: Name
    amount: Money
    currency: Currency
    idempotency_key: Name = Field(description="cf-dispute-<request_id>-<charge_id>")
    duplicate_of: Id | None = None


@register
class DuplicateRefundRequested(SagaEvent):
    """Dispute asks payment-gateway to refund confirmed duplicates, through the same refund guard and
    idempotency keys as cancellation refunds (the gateway decides reversal or refund)."""

    event_type: ClassVar[str] = "DuplicateRefundRequested"
    published_by: ClassVar[frozenset[str] | None] = DISPUTE

    account_id: Id
    lines: list[DuplicateRefundLine]


@register
class DuplicateRefundsIssued(SagaEvent):
    """Payment-gateway's outcome per duplicate: succeeded (reversal or refund) or failed (the guard found
    too little left of the charge, or the gateway refused) with the error."""

    event_type: ClassVar[str] = "DuplicateRefundsIssued"
    published_by: ClassVar[frozenset[str] | None] = PAYMENT_GATEWAY

    lines: list[RefundLine]


@register
class DisputeStepRecorded(SagaEvent):
    """One audit record of a dispute (detected, validated, gateway_verified, refund_requested,
    refund_issued, refund_failed, escalated): kept in the dispute service's database and added to the
    request's status history."""

    event_type: ClassVar[str] = "DisputeStepRecorded"
    published_by: ClassVar[frozenset[str] | None] = DISPUTE

    step: Annotated[str, Field(max_length=40)]
    actor: Annotated[str, Field(max_length=ACTOR_CHARS)]
    charge_id: Id | None = None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


# --- outputs -----------------------------------------------------------------------------------


class RefundView(BaseModel):
    model_config = ConfigDict(extra="ignore")
    amount: Money
    currency: Currency
    status: Status


class ErrorView(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: Source
    code: Code
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
    action: LongStatus
    note: Text = ""
    request_id: uuid.UUID | None = Field(None, description="the new request of a retry")


@register
class CancellationStatusChanged(Payload):
    """CONTRACT.md section 6: the full current view of a request, one record per change."""

    event_type: ClassVar[str] = "CancellationStatusChanged"
    published_by: ClassVar[frozenset[str] | None] = STATUS_TRACKER
    topic: ClassVar[str] = topics.STATUS

    request_id: uuid.UUID
    account_id: Id | None = None
    target: Literal["subscription", "charges"] | None = None
    subscription_id: Id | None = None
    charge_ids: list[Id] = Field(default_factory=list, max_length=MAX_CHARGES)
    mode: Mode | None = None
    state: State
    stage: Source | None = None
    subscription_status: Status | None = None
    provisioning_status: LongStatus | None = None
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

    reason: Annotated[str, Field(max_length=40)]
    detail: str
    topic_name: Name = Field(alias="topic")
    partition: int
    offset: int
    original_key: Name | None = Field(None, description="the record's key; when longer than 200 characters, "
                                      "its start and the sha256 of the whole")
    consumer_group: str
    original_size: int
    original_sha256: str
    original_base64: str | None = Field(None, description="the record value; null when it was over 1 MiB")
    request_id: Annotated[str, Field(max_length=64)] | None = None

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
