"""Every topic cancelflow reads or writes, with its partitions and configs.

The public ones (contract section 2) keep their contract names; `cancellations.saga` is internal:
every saga event of a request, keyed by `request_id`, so one partition holds a request's whole story
in the order it happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The largest record a topic takes (its max.message.bytes) and a producer sends (max_request_size), set
# explicitly rather than left to Kafka's default of about 1 MiB: a dead-letter record keeps a rejected
# record of up to 1 MiB (CONTRACT.md section 7) as base64, about 1.4 MiB. Every event a service derives
# from a valid record is far smaller (events.TEXT_CHARS).
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
SIZE_LIMIT = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    key: str
    written_by: str
    read_by: str
    public: bool = True
    configs: dict[str, str] = field(default_factory=lambda: dict(SIZE_LIMIT))
    # Fewer partitions on the embedded broker, whose cost grows with them: every fetch answers for each
    # partition (even an idle one), a fetch of a partition with new records lists every record batch it
    # holds, and a relay round writes a batch to each partition its records go to (docs/performance.md,
    # item 30). Kafka gets `partitions`, the room to scale out.
    embedded_partitions: int | None = None

    def partitions_on(self, *, embedded: bool) -> int:
        """How many partitions the topic is created with on the embedded broker, or on Kafka."""
        return self.embedded_partitions if embedded and self.embedded_partitions else self.partitions


PLATFORM_SUBSCRIPTIONS = "platform.subscriptions"
PAYMENTS_CHARGES = "payments.charges"
REQUESTED = "cancellations.requested"
SAGA = "cancellations.saga"
STATUS = "cancellations.status"
DLQ = "cancellations.dlq"

TOPICS: tuple[Topic, ...] = (
    Topic(PLATFORM_SUBSCRIPTIONS, 3, "subscription_id", "upstream platform",
          "billing, notification", embedded_partitions=1),
    Topic(PAYMENTS_CHARGES, 3, "account_id", "upstream platform / gateway webhooks",
          "payment-gateway, dispute", embedded_partitions=1),
    Topic(REQUESTED, 4, "subscription_id or account_id", "upstream apps (storefront, BSS)",
          "billing (intake: validates, dead-letters, routes charge disputes)"),
    Topic(SAGA, 4, "request_id", "billing, provisioning, payment-gateway, dispute, notification",
          "every service (each handles its own event types)", public=False, embedded_partitions=2),
    Topic(STATUS, 4, "request_id", "status-tracker only", "support dashboards, the CLI",
          configs={**SIZE_LIMIT, "cleanup.policy": "compact"}),
    Topic(DLQ, 1, "key of the rejected record", "every service", "operators"),
)

BY_NAME = {t.name: t for t in TOPICS}
