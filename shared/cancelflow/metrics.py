"""Prometheus metrics every service exposes on /metrics (labels never carry customer data)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("cancelflow_events_consumed_total", "Records handled", ["topic", "event_type"])
EVENTS_PRODUCED = Counter("cancelflow_events_produced_total", "Records published from the outbox",
                          ["topic", "event_type"])
HANDLER_SECONDS = Histogram("cancelflow_handler_seconds", "Handler latency", ["event_type"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
INBOX_DUPLICATES = Counter("cancelflow_inbox_duplicates_total", "Redelivered events skipped", ["topic"])
BAD_SIGNATURES = Counter("cancelflow_bad_signatures_total", "Records without a valid signature of their producer (CONTRACT.md section 10)",
                         ["topic"])
DEAD_LETTERED = Counter("cancelflow_dead_lettered_total", "Records sent to the DLQ", ["topic", "reason"])
HANDLER_ERRORS = Counter("cancelflow_handler_errors_total", "Handler attempts that raised", ["event_type"])
INBOX_PRUNED = Counter("cancelflow_inbox_pruned_total",
                       "Inbox rows deleted after the retention period (CANCELFLOW_INBOX_RETENTION_DAYS)")
PRODUCERS_REPLACED = Counter("cancelflow_producers_replaced_total",
                             "Outbox producers replaced after their idempotence state was lost (Apache Kafka)")
OUTBOX_BACKLOG = Gauge("cancelflow_outbox_backlog", "Outbox rows not yet published")
CONSUMER_LAG = Gauge("cancelflow_consumer_lag", "Records behind the partition end", ["topic", "partition"])
OFFSET_GAPS = Counter("cancelflow_offset_gaps_total",
                      "Fetches that skipped offsets: read again, or accepted after the grace period",
                      ["topic", "outcome"])
OUTCOMES = Counter("cancelflow_outcomes_total", "Saga outcomes seen by this service", ["state", "source"])
EXTERNAL_CALL_SECONDS = Histogram("cancelflow_external_call_seconds", "Vendor/gateway/SMTP call latency",
                                  ["target", "operation", "outcome"])
REFUNDS = Counter("cancelflow_refunds_total", "Refunds by outcome", ["outcome"])
REFUND_AMOUNT = Counter("cancelflow_refund_amount_total", "Refunded amount", ["currency"])
EMAILS = Counter("cancelflow_emails_total", "Emails by kind and outcome", ["kind", "outcome"])
# Each email the SMTP server accepted is recorded as sent in a transaction of its own, before its
# connection carries another (a kill repeats at most one email per connection): what that costs.
EMAIL_RECORD_SECONDS = Histogram("cancelflow_email_record_seconds",
                                 "Recording one accepted email as sent (its own transaction)",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
# Emails owed and not sent yet, by status (`pending`, `sending`, `awaiting_contact`), counted by the
# sender every `stale_after_s / 4`: an email waiting for a customer's contact that never arrives is
# otherwise silent.
EMAILS_WAITING = Gauge("cancelflow_emails_waiting", "Emails owed and not sent yet", ["status"])
# Requests not yet terminal, from the status tracker's views (refreshed every few seconds): how many
# per state, and how long the oldest of each state has gone without a change ("stuck" requests).
REQUESTS_OPEN = Gauge("cancelflow_requests_open", "Requests not in a terminal state", ["state"])
OLDEST_OPEN_SECONDS = Gauge("cancelflow_request_oldest_open_seconds",
                            "Seconds since the least recently changed open request changed", ["state"])


def call_outcome(status: int | None, failure: str | None = None) -> str:
    """The `outcome` label of an HTTP call in EXTERNAL_CALL_SECONDS: `2xx`, `4xx`, `5xx`, or why there
    was no answer (`timeout`, `unreachable`, `dropped`)."""
    if failure:
        return failure
    return f"{(status or 0) // 100}xx"
