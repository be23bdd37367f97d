"""Every topic cancelflow reads or writes, with its partitions and configs.

The public ones (contract section 2) keep their contract names; `cancellations.saga` is internal:
every saga event of a request, keyed by `request_id`, so one partition holds a request's whole story
in the order it happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    key: str
    written_by: str
    read_by: str
    public: bool = True
    configs: dict[str, str] = field(default_factory=dict)


PLATFORM_SUBSCRIPTIONS = "platform.subscriptions"
PAYMENTS_CHARGES = "payments.charges"
REQUESTED = "cancellations.requested"
SAGA = "cancellations.saga"
STATUS = "cancellations.status"
DLQ = "cancellations.dlq"

# The saga events each service acts on that the status tracker and notification (which read every
# saga event) do not need to share with it: the outbox relay publishes each of them to
# `cancellations.saga` and again to the topic of each service listed here, and those services read
# only their own topic. Every service used to read the whole saga: each saga event made six consumers'
# polls non-empty, for one or two of them to act (README, Performance, item 24). A service's saga
# route must handle exactly these types (ServiceRuntime.add_route checks it at start).
SAGA_READERS: dict[str, tuple[str, ...]] = {
    "billing": ("VendorProvisioned", "VendorCancellationFailed"),
    "provisioning": ("VendorCancellationRequested",),
    "payment_gateway": ("PlatformCommitted", "CancellationScheduled", "ChargesVerificationRequested",
                        "DuplicateRefundRequested"),
    "dispute": ("CancellationReceived", "ChargesVerified", "DuplicateRefundsIssued"),
}


def saga_of(service: str) -> str:
    """The topic of the saga events `service` acts on (SAGA_READERS)."""
    return f"{SAGA}.{service}"


# Event type -> the service topics its saga record is copied to.
SAGA_COPIES: dict[str, tuple[str, ...]] = {
    event_type: tuple(saga_of(service) for service, types in SAGA_READERS.items() if event_type in types)
    for event_type in {event_type for types in SAGA_READERS.values() for event_type in types}
}

TOPICS: tuple[Topic, ...] = (
    Topic(PLATFORM_SUBSCRIPTIONS, 3, "subscription_id", "upstream platform",
          "billing, notification"),
    Topic(PAYMENTS_CHARGES, 3, "account_id", "upstream platform / gateway webhooks",
          "payment-gateway, dispute"),
    Topic(REQUESTED, 4, "subscription_id or account_id", "upstream apps (storefront, BSS)",
          "billing (intake: validates, dead-letters, routes charge disputes)"),
    Topic(SAGA, 4, "request_id", "billing, provisioning, payment-gateway, dispute, notification",
          "the status tracker and notification (every event); the other services read their copy topic below",
          public=False),
    *(Topic(saga_of(service), 4, "request_id", "the outbox relays (a copy of cancellations.saga records)",
            f"{service} ({', '.join(types)})", public=False) for service, types in SAGA_READERS.items()),
    Topic(STATUS, 4, "request_id", "status-tracker only", "support dashboards, the CLI",
          configs={"cleanup.policy": "compact"}),
    Topic(DLQ, 1, "key of the rejected record", "every service", "operators"),
)

BY_NAME = {t.name: t for t in TOPICS}
