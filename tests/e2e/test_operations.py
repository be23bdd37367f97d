"""Operations, end to end: every service of the running stack answers /healthz, /readyz and /metrics,
and one cancellation moves the counters an operator watches (events, latency, vendor and gateway calls,
refunds, emails, outcomes)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cancelflow import topics
from cancelflow_tools.ops import emails_owed, sample_subscription
from cancelflow_tools.services import SERVICES
from tests.contract import http_port_var

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def service_url(stack: Any, service: str) -> str:
    return f"http://127.0.0.1:{stack.env[http_port_var(service)]}"


async def scrape(client: Any, stack: Any, service: str) -> Samples:
    assert client._http is not None
    async with client._http.get(f"{service_url(stack, service)}/metrics") as response:
        assert response.status == 200, service
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, series), value in samples.items() if n == name and wanted <= series)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def names(samples: Iterable[tuple[str, Any]]) -> set[str]:
    return {name for name, _ in samples}


async def test_every_service_answers_health_readiness_and_metrics(client, stack):  # type: ignore[no-untyped-def]
    for service in SERVICES:
        url = service_url(stack, service)
        status, health = await client.get_json(f"{url}/healthz")
        assert status == 200 and health["status"] == "ok" and health["service"] == service
        status, ready = await client.get_json(f"{url}/readyz")
        assert status == 200, ready
        assert ready == {"ready": True, "service": service, "problems": {}}
        samples = await scrape(client, stack, service)
        # Exported from the start, before any traffic: the outbox backlog gauge and the process metrics.
        assert ("cancelflow_outbox_backlog", frozenset()) in samples, service
        assert "process_cpu_seconds_total" in names(samples) or "python_info" in names(samples)


async def test_metrics_move_after_a_cancellation(client, stack, watcher, ids, today):  # type: ignore[no-untyped-def]
    before = {service: await scrape(client, stack, service) for service in SERVICES}
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ops-{ids['tag']}",
                                 today=today, price="30.00", days_into_period=10, period_days=30)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"],
                                            subscription_id=sample.facts.subscription_id)
    terminal = await watcher.terminal(rid, timeout=60)
    status = await watcher.terminal(rid, emails=emails_owed(terminal), timeout=60)
    assert status["state"] == "completed" and status["refund"]["amount"] == "20.00"
    after = {service: await scrape(client, stack, service) for service in SERVICES}

    def delta(service: str, name: str, **labels: str) -> float:
        return moved(before[service], after[service], name, **labels)

    # Events consumed and produced, by type; handler latency observed.
    assert delta("billing", "cancelflow_events_consumed_total", topic=topics.REQUESTED,
                 event_type="CancellationRequested") >= 1
    assert delta("billing", "cancelflow_events_produced_total",
                 event_type="VendorCancellationRequested") >= 1
    assert delta("billing", "cancelflow_handler_seconds_count", event_type="CancellationRequested") >= 1
    assert delta("provisioning", "cancelflow_events_consumed_total",
                 event_type="VendorCancellationRequested") >= 1
    assert delta("provisioning", "cancelflow_events_produced_total", event_type="VendorProvisioned") >= 1
    assert delta("status_tracker", "cancelflow_events_produced_total", topic=topics.STATUS,
                 event_type="CancellationStatusChanged") >= 3
    # Vendor and gateway calls: latency histograms by operation and outcome.
    assert delta("provisioning", "cancelflow_external_call_seconds_count", target="vendor",
                 operation="cancel", outcome="2xx") >= 1
    assert delta("provisioning", "cancelflow_external_call_seconds_sum", target="vendor") > 0
    assert delta("payment_gateway", "cancelflow_external_call_seconds_count", target="gateway",
                 operation="refund", outcome="2xx") >= 1
    assert delta("payment_gateway", "cancelflow_external_call_seconds_count", target="gateway",
                 operation="stop_schedule") >= 1
    # Refunds (count and amount), emails, outcomes.
    assert delta("payment_gateway", "cancelflow_refunds_total", outcome="succeeded") >= 1
    assert delta("payment_gateway", "cancelflow_refund_amount_total", currency="USD") >= 20.0
    assert delta("notification", "cancelflow_emails_total", kind="completed", outcome="sent") >= 1
    assert delta("notification", "cancelflow_external_call_seconds_count", target="smtp", outcome="ok") >= 1
    assert delta("status_tracker", "cancelflow_outcomes_total", state="completed") >= 1
    # Gauges every service keeps: nothing left in the outbox once the request is done; the consumer's
    # lag is reported per partition it read.
    for service in ("billing", "provisioning", "payment_gateway", "notification", "status_tracker"):
        assert ("cancelflow_consumer_lag" in names(after[service])), service
    assert "cancelflow_requests_open" in names(after["status_tracker"])
