"""The vendor-first cancellation, end to end: the seed release note's three scenarios, a
past-dated cancellation, validation, redelivery and poison records, on the whole stack.

Each scenario is checked the way a support engineer or an auditor would: the status records on
`cancellations.status`, the exact history text, the vendor and gateway sandbox ledgers, and the
emails the SMTP server received.
"""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from decimal import Decimal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from billing.domain import HISTORY_PLATFORM_ERROR, HISTORY_VENDOR_ERROR
from cancelflow import topics
from cancelflow.events import NAME_CHARS, TEXT_CHARS, CancellationRequested, envelope_for
from cancelflow.messaging.codec import MAX_RECORD_BYTES, encode
from cancelflow.messaging.kafka import partitions_of
from cancelflow_tools.ops import emails_owed, sample_subscription
from tests.e2e.conftest import (
    SUPPORT,
    id_on_same_saga_partition,
    loaded_subscription,
    saga_partition,
    vendor_answers,
)

pytestmark = pytest.mark.e2e


async def _ledger(client, url: str) -> dict:  # type: ignore[no-untyped-def]
    _, body = await client.get_json(f"{url}/_sandbox/ledger")
    return body


def _effects(ledger: dict, kind: str, **match: str) -> list[dict]:
    return [e for e in ledger["effects"] if e["type"] == kind and all(e.get(k) == v for k, v in match.items())]


def _mails(smtp, request_id: str) -> list:  # type: ignore[no-untyped-def]
    return [m for m in smtp.messages if m["X-Cancelflow-Request-Id"] == request_id]


async def _finish(watcher, request_id: str) -> dict:  # type: ignore[no-untyped-def]
    """The request's last record: terminal, with every email it owes delivered."""
    terminal = await watcher.terminal(request_id, timeout=60)
    return await watcher.terminal(request_id, emails=emails_owed(terminal), timeout=60)


def _versions_step_by_one(watcher, request_id: str) -> None:  # type: ignore[no-untyped-def]
    versions = [r["version"] for r in watcher.history_of(request_id)]
    assert versions == list(range(1, len(versions) + 1)), versions


async def test_success_cancels_at_vendor_then_platform_and_refunds(client, watcher, smtp, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ok-{ids['tag']}", today=today,
                                 price="30.00", days_into_period=10, period_days=30)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    status = await _finish(watcher, rid)

    assert status["state"] == "completed" and status["error"] is None
    assert (status["subscription_status"], status["provisioning_status"]) == ("canceled", "Synchronized")
    assert status["effective_date"] == status["access_end_date"] == today.isoformat()
    messages = [h["message"] for h in status["history"]]
    assert f"Status is set to canceled with effective date {today.isoformat()}" in messages
    assert status["refund"] == {"amount": "20.00", "currency": "USD", "status": "succeeded"}  # 30 * 20/30
    _versions_step_by_one(watcher, rid)
    states = [r["state"] for r in watcher.history_of(rid)]
    assert states[0] == "received" and "in_progress" in states

    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1
    gateway = await _ledger(client, client.endpoints.gateway)
    charge = sample.charges[0]
    refunds = [e for e in gateway["effects"] if e["type"] in ("refund", "reversal")
               and e["gateway_charge_id"] == charge.gateway_charge_id]
    assert [(Decimal(r["amount"]), r["idempotency_key"]) for r in refunds] == [
        (Decimal("20.00"), f"cf-refund-{rid}-{charge.charge_id}")]
    assert len(_effects(gateway, "schedule_stopped", subscription_id=sample.facts.subscription_id)) == 1

    mail = await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == rid)
    assert mail["Subject"] == "Subscription Cancellation Request Completed"
    assert mail["To"] == "customer@example.com"
    body = mail.get_body(("plain",)).get_content()
    assert "20.00" in body and rid in body and today.isoformat() in body

    _, billing_view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{sample.facts.subscription_id}")
    assert billing_view["subscription"]["status"] == "canceled"
    assert billing_view["subscription"]["auto_renew"] is False


async def test_vendor_failure_reverts_and_says_so(client, watcher, smtp, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-vf-{ids['tag']}",
                                       today=today)
    await vendor_answers(client, sample, {"status": 422, "error": "Subscription is locked by a reseller hold"})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    status = await _finish(watcher, rid)

    assert status["state"] == "failed"
    assert status["error"]["source"] == "vendor"
    assert "locked by a reseller hold" in status["error"]["message"]
    assert (status["subscription_status"], status["provisioning_status"]) == ("active", "Synchronized")
    assert status["effective_date"] is None and status["access_end_date"] is None  # nothing took effect
    vendor_records = [h["message"] for h in status["history"] if h["message"].startswith(HISTORY_VENDOR_ERROR)]
    assert len(vendor_records) == 1 and "locked by a reseller hold" in vendor_records[0]
    vendor = await _ledger(client, client.endpoints.vendor)
    calls = [c for c in vendor["calls"] if sample.facts.vendor_subscription_id in c["path"]]
    assert len(calls) == 1, "a 4xx is not retried"
    assert _effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id) == []
    gateway = await _ledger(client, client.endpoints.gateway)
    assert not [e for e in gateway["effects"] if e.get("request_id") == rid]
    mail = await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == rid)
    assert mail["X-Cancelflow-Kind"] == "failed_vendor"
    assert HISTORY_VENDOR_ERROR in " ".join(mail.get_body(("plain",)).get_content().split())

    # The customer may simply retry with a new request id: it goes through.
    retry = await client.request_cancellation(account_id=ids["account"],
                                              subscription_id=sample.facts.subscription_id)
    assert (await _finish(watcher, retry))["state"] == "completed"


async def test_vendor_5xx_is_retried_within_budget(client, watcher, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-5xx-{ids['tag']}",
                                       today=today)
    await vendor_answers(client, sample, {"status": 503, "error": "maintenance"}, times=2)
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    assert (await _finish(watcher, rid))["state"] == "completed"
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len([c for c in vendor["calls"] if sample.facts.vendor_subscription_id in c["path"]]) == 3
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1


async def test_platform_failure_after_vendor_success_reverts_and_alerts_support(client, watcher, smtp, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-pf-{ids['tag']}",
                                       today=today)
    await client.post_json(f"{client.endpoints.billing}/_faults",
                           {"subscription_id": sample.facts.subscription_id, "stage": "commit"})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    status = await _finish(watcher, rid)

    assert status["state"] == "failed" and status["error"]["source"] == "platform"
    assert (status["subscription_status"], status["provisioning_status"]) == ("active", "Synchronized")
    assert HISTORY_PLATFORM_ERROR in [h["message"] for h in status["history"]]
    assert status["refund"] is None
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1
    gateway = await _ledger(client, client.endpoints.gateway)
    assert not [e for e in gateway["effects"] if e.get("request_id") == rid]

    await smtp.wait_until(lambda msgs: len([m for m in msgs if m["X-Cancelflow-Request-Id"] == rid]) == 2)
    by_kind = {m["X-Cancelflow-Kind"]: m for m in _mails(smtp, rid)}
    assert set(by_kind) == {"failed_platform", "support_platform_failure"}
    assert by_kind["support_platform_failure"]["To"] == SUPPORT
    alert = by_kind["support_platform_failure"].get_body(("plain",)).get_content()
    assert sample.facts.vendor_subscription_id in alert and rid in alert and ids["account"] in alert
    assert "injected platform fault at stage 'commit'" in alert  # the error itself, for whoever finishes it
    _, billing_view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{sample.facts.subscription_id}")
    assert billing_view["subscription"]["status"] == "active"


async def test_past_dated_cancellation_refunds_from_the_effective_date(client, watcher, smtp, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-pd-{ids['tag']}", today=today,
                                 price="30.00", days_into_period=10, period_days=30)
    effective = sample.facts.current_period_start + timedelta(days=4)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            mode="past_dated", effective_date=effective)

    status = await _finish(watcher, rid)

    assert status["state"] == "completed"
    assert status["effective_date"] == effective.isoformat()
    assert f"Status is set to canceled with effective date {effective.isoformat()}" in [
        h["message"] for h in status["history"]]
    assert status["refund"]["amount"] == "26.00"  # 30 * 26/30 unused days


@pytest.mark.parametrize("case", ["not_owner", "unknown_subscription", "future_date", "before_period"])
async def test_validation_rejects_before_any_side_effect(client, watcher, ids, today, case):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-val-{ids['tag']}",
                                       today=today)
    args = {"account_id": ids["account"], "subscription_id": sample.facts.subscription_id}
    expected = {"not_owner": "not_owner", "unknown_subscription": "unknown_subscription",
                "future_date": "invalid_effective_date", "before_period": "invalid_effective_date"}[case]
    if case == "not_owner":
        args["account_id"] = ids["other_account"]
    elif case == "unknown_subscription":
        args["subscription_id"] = f"sub-missing-{ids['tag']}"
    elif case == "future_date":
        args |= {"mode": "past_dated", "effective_date": today + timedelta(days=1)}
    else:
        args |= {"mode": "past_dated", "effective_date": sample.facts.current_period_start - timedelta(days=1)}
    rid = await client.request_cancellation(**args)

    status = await watcher.terminal(rid)

    assert status["state"] == "rejected"
    assert status["error"]["source"] == "validation" and status["error"]["code"] == expected
    if case == "not_owner":  # nothing about another account's subscription leaks
        assert status["subscription_status"] is None and status["provisioning_status"] is None
    vendor = await _ledger(client, client.endpoints.vendor)
    assert not [c for c in vendor["calls"] if sample.facts.vendor_subscription_id in c["path"]]
    _, view = await client.get_json(f"{client.endpoints.billing}/subscriptions/{sample.facts.subscription_id}")
    assert view["subscription"]["provisioning_status"] == "Synchronized"
    assert view["history"] == []


async def test_second_request_while_in_flight_is_rejected(client, watcher, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-lock-{ids['tag']}",
                                       today=today)
    # The vendor hangs past the client's timeout once, so the first request holds the lock a while.
    await vendor_answers(client, sample, {"timeout": True})
    first = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    await watcher.wait_for(first, lambda s: s["provisioning_status"] == "In Progress")
    second = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)

    rejected = await watcher.terminal(second)
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "provisioning_in_progress"
    assert (await _finish(watcher, first))["state"] == "completed"
    again = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    assert (await watcher.terminal(again))["error"]["code"] == "not_active"


async def test_redelivered_request_and_internal_event_have_no_second_effect(client, watcher, smtp, stack, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-dup-{ids['tag']}",
                                       today=today)
    request = CancellationRequested(
        request_id=uuid.uuid4(), account_id=ids["account"], target="subscription",
        subscription_id=sample.facts.subscription_id, mode="immediate",
        requested_by={"user_id": "u", "role": "customer", "channel": "storefront"})
    await client.publisher.publish(request)
    rid = str(request.request_id)
    done = await _finish(watcher, rid)

    # The same request again (same request_id, new event_id), and the saga's PlatformCommitted record
    # re-delivered byte for byte.
    await client.publisher.publish(request)
    committed = await _read_saga_record(stack.endpoints.bootstrap, rid, "PlatformCommitted")
    await client.publisher.send_raw(topics.SAGA, committed, key=rid)
    # Markers behind them prove they were consumed: a request for the same subscription (the same key on
    # cancellations.requested), and a request completing another subscription whose id puts its saga
    # events on the redelivered record's partition (every saga step, the refund's included, read past it).
    marker = await client.request_cancellation(account_id=ids["account"],
                                               subscription_id=sample.facts.subscription_id)
    assert (await watcher.terminal(marker))["error"]["code"] == "not_active"
    marker_sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-dup2-{ids['tag']}",
                                        today=today)
    await client.load([marker_sample])
    saga_marker = await client.request_cancellation(account_id=ids["account"],
                                                    subscription_id=marker_sample.facts.subscription_id,
                                                    request_id=id_on_same_saga_partition(rid))
    assert saga_partition(saga_marker) == saga_partition(rid)
    assert (await _finish(watcher, saga_marker))["state"] == "completed"

    assert watcher.latest[rid]["version"] == done["version"]
    vendor = await _ledger(client, client.endpoints.vendor)
    assert len(_effects(vendor, "cancellation", vendor_subscription_id=sample.facts.vendor_subscription_id)) == 1
    gateway = await _ledger(client, client.endpoints.gateway)
    assert len([e for e in gateway["effects"] if e.get("request_id") == rid and e["type"] in ("refund", "reversal")]) == 1
    assert len(_mails(smtp, rid)) == 1


async def test_poison_record_is_dead_lettered_and_the_valid_one_behind_it_completes(client, watcher, stack, ids, today):
    sample = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-poison-{ids['tag']}",
                                       today=today)
    key = sample.facts.subscription_id
    poison_rid = str(uuid.uuid4())
    await client.publisher.send_raw(topics.REQUESTED, b"{this is not json", key=key)
    bad = envelope_for(CancellationRequested(
        request_id=uuid.UUID(poison_rid), account_id=ids["account"], target="subscription", subscription_id=key,
        requested_by={"user_id": "u", "role": "customer", "channel": "storefront"}),
        producer="storefront", correlation_id=poison_rid, causation_id=None)
    broken = orjson.loads(encode(bad))
    del broken["payload"]["requested_by"]
    await client.publisher.send_raw(topics.REQUESTED, orjson.dumps(broken), key=key)
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=key)

    assert (await _finish(watcher, rid))["state"] == "completed"
    rejected = await watcher.terminal(poison_rid)
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "bad_input"
    dead = await _read_dlq(stack.endpoints.bootstrap, key, 2)
    assert [d["reason"] for d in dead] == ["not_json", "invalid_payload"]
    assert base64.b64decode(dead[0]["original_base64"]) == b"{this is not json"
    assert "requested_by" in dead[1]["detail"] and dead[1]["request_id"] == poison_rid
    assert all(d["topic"] == topics.REQUESTED and d["offset"] >= 0 for d in dead)


async def test_a_request_at_its_size_bounds_completes_and_one_of_1_mib_is_rejected(client, watcher, smtp, stack,
                                                                                   ids, today):
    """Issue 24, item 3: a request of about 1 MiB used to complete without a status (billing re-wrapped it
    over the 1 MiB a consumer takes). Its reason is bounded now: the longest completes, status and email."""
    at_bound, too_big = (sample_subscription(account_id=ids["account"], subscription_id=f"sub-{n}-{ids['tag']}",
                                             today=today) for n in ("bound", "big"))
    await client.load([at_bound, too_big])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=at_bound.facts.subscription_id,
                                            reason="\U0001f600" * TEXT_CHARS, user_id="u" * NAME_CHARS)
    big_rid = str(uuid.uuid4())
    big = orjson.loads(encode(envelope_for(CancellationRequested(
        request_id=uuid.UUID(big_rid), account_id=ids["account"], target="subscription",
        subscription_id=too_big.facts.subscription_id,
        requested_by={"user_id": "u", "role": "customer", "channel": "storefront"}),
        producer="storefront", correlation_id=big_rid, causation_id=None)))
    big["payload"]["reason"] = "x" * (MAX_RECORD_BYTES - 2_000)
    value = orjson.dumps(big)
    assert 1_000_000 < len(value) <= MAX_RECORD_BYTES  # valid by size: the schema's bound refuses it
    await client.publisher.send_raw(topics.REQUESTED, value, key=too_big.facts.subscription_id)

    done = await _finish(watcher, rid)
    assert done["state"] == "completed"
    assert (await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == rid))["Subject"] == (
        "Subscription Cancellation Request Completed")
    rejected = await watcher.terminal(big_rid, timeout=60)
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "bad_input"
    assert "reason" in rejected["error"]["message"]
    vendor = await _ledger(client, client.endpoints.vendor)
    assert not [c for c in vendor["calls"] if too_big.facts.vendor_subscription_id in c["path"]]


async def _read_topic(bootstrap: str, topic: str, predicate, count: int, timeout: float = 30) -> list:  # type: ignore[no-untyped-def]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=25)
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list = []
        import asyncio

        async def collect() -> None:
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(r for r in records if predicate(r))

        await asyncio.wait_for(collect(), timeout)
        return found
    finally:
        await consumer.stop()


async def _read_saga_record(bootstrap: str, request_id: str, event_type: str) -> bytes:
    def wanted(record) -> bool:  # type: ignore[no-untyped-def]
        envelope = orjson.loads(record.value)
        return envelope["correlation_id"] == request_id and envelope["event_type"] == event_type

    return (await _read_topic(bootstrap, topics.SAGA, wanted, 1))[0].value


async def _read_dlq(bootstrap: str, key: str, count: int) -> list[dict]:
    records = await _read_topic(bootstrap, topics.DLQ, lambda r: r.key == key.encode(), count)
    return [orjson.loads(r.value)["payload"] for r in records]
