"""CONTRACT.md section 10 on the whole stack: with producer keys configured, only records signed by a
known producer's key (any of its keys, for rotation) have an effect; the rest are dead-lettered with
reason `bad_signature`, counted, and leave no trace in the status. The same holds on the internal saga
topic, where each type is accepted only from the service that owns it: forged money events move no money."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import date

import orjson
import pytest

from cancelflow import topics
from cancelflow.events import (
    CancellationRequested,
    DuplicateRefundRequested,
    Payload,
    PlatformCommitted,
    envelope_for,
)
from cancelflow.messaging.codec import encode
from cancelflow.messaging.signatures import SignatureCheck, parse_keys, sign, signature_headers
from cancelflow_tools.ops import sample_subscription
from cancelflow_tools.services import SERVICES
from cancelflow_tools.testing.smtp import RecordingSMTPServer
from cancelflow_tools.testing.stack import StackProcess
from cancelflow_tools.upstream import UpstreamPublisher
from tests.e2e.conftest import _pg_urls
from tests.e2e.test_cancellation_flow import _effects, _finish, _ledger, _read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.broker_agnostic]

KEYS = "storefront:new-key,storefront:old-key,bss:bss-key,platform:platform-key"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def stack(request, tmp_path_factory, smtp: RecordingSMTPServer) -> Iterator[StackProcess]:  # type: ignore[no-untyped-def]
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port), "CANCELFLOW_PRODUCER_KEYS": KEYS}
    if request.param == "pg":  # the relays read what they sign from PostgreSQL's outboxes
        env.update(_pg_urls(request.getfixturevalue("pg_server"), uuid.uuid4().hex[:8]))
    process = StackProcess(tmp_path_factory.mktemp(f"stack-signed-{request.param}"), extra_env=env)
    process.start()
    yield process
    assert process.stop() == 0


def _request(account: str, subscription_id: str) -> tuple[str, bytes]:
    request = CancellationRequested(request_id=uuid.uuid4(), account_id=account, target="subscription",
                                    subscription_id=subscription_id,
                                    requested_by={"user_id": "u", "role": "customer", "channel": "storefront"})
    envelope = envelope_for(request, producer="storefront", correlation_id=str(request.request_id),
                            causation_id=None)
    return str(request.request_id), encode(envelope)


async def _metric(client, url: str, name: str, topic: str = "") -> float:  # type: ignore[no-untyped-def]
    assert client._http is not None
    async with client._http.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and f'topic="{topic}' in line)


async def _until(check, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    """Poll `check` (an awaitable-returning callable) until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_only_records_signed_by_a_known_producer_have_an_effect(client, watcher, stack, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-sig-{ids['tag']}", today=today)
    await client.load([sample])  # signed with the storefront's current key by StackClient
    key = sample.facts.subscription_id
    before = await _metric(client, client.endpoints.billing, "cancelflow_bad_signatures_total")

    unsigned_rid, unsigned = _request(ids["account"], key)
    await client.publisher._producer.send_and_wait(topics.REQUESTED, unsigned, key=key.encode())
    forged_rid, forged = _request(ids["account"], key)
    await client.publisher._producer.send_and_wait(
        topics.REQUESTED, forged, key=key.encode(),
        headers=[("cf-producer", b"storefront"), ("cf-signature", sign(forged, "stolen-guess").encode())])
    wrong_owner_rid, wrong_owner = _request(ids["account"], key)
    await client.publisher._producer.send_and_wait(  # a real key, but of another producer
        topics.REQUESTED, wrong_owner, key=key.encode(),
        headers=[("cf-producer", b"storefront"), ("cf-signature", sign(wrong_owner, "bss-key").encode())])

    # The storefront's previous key still signs during a rotation.
    async with UpstreamPublisher(stack.settings, producer_name="storefront", signing_key="old-key") as old:
        valid_rid, valid = _request(ids["account"], key)
        await old.send_raw(topics.REQUESTED, valid, key=key)

    status = await _finish(watcher, valid_rid)
    assert status["state"] == "completed"
    dead = [orjson.loads(r.value)["payload"] for r in await _read_topic(
        stack.endpoints.bootstrap, topics.DLQ, lambda r: r.key == key.encode(), 3)]
    assert [d["reason"] for d in dead] == ["bad_signature"] * 3
    assert "not signed" in dead[0]["detail"] and "does not match" in dead[1]["detail"]
    assert all(d["request_id"] is None for d in dead)
    for rid in (unsigned_rid, forged_rid, wrong_owner_rid):
        assert rid not in watcher.latest, "an unauthenticated record must leave no status"
    assert await _metric(client, client.endpoints.billing, "cancelflow_bad_signatures_total") == before + 3


async def test_forged_subscription_facts_are_not_ingested(client, stack, ids, today):
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-fake-{ids['tag']}", today=today)
    await client.publisher._producer.send_and_wait(
        topics.PLATFORM_SUBSCRIPTIONS, encode(envelope_for(sample.facts, producer="platform", correlation_id="x",
                                                          causation_id=None)),
        key=sample.facts.subscription_id.encode())
    marker = sample_subscription(account_id=ids["account"], subscription_id=f"sub-real-{ids['tag']}", today=today)
    await client.load([marker])
    dead = await _read_topic(stack.endpoints.bootstrap, topics.DLQ,
                             lambda r: r.key == sample.facts.subscription_id.encode(), 1)
    assert orjson.loads(dead[0].value)["payload"]["reason"] == "bad_signature"
    code, _ = await client.get_json(f"{client.endpoints.billing}/subscriptions/{sample.facts.subscription_id}")
    assert code == 404


async def test_forged_charges_are_not_ingested(client, stack, ids, today):
    """payments.charges is checked too: a charge no producer signed reaches neither payment-gateway
    (which dead-letters it) nor dispute."""
    forged = sample_subscription(account_id=ids["account"], subscription_id=f"sub-fch-{ids['tag']}", today=today)
    [charge] = forged.charges
    await client.publisher._producer.send_and_wait(
        topics.PAYMENTS_CHARGES, encode(envelope_for(charge, producer="platform", correlation_id="x",
                                                    causation_id=None)),
        key=charge.account_id.encode(),
        headers=[("cf-producer", b"platform"), ("cf-signature", sign(b"other bytes", "platform-key").encode())])
    # A signed charge on the same account (so the same partition, behind the forged one): once both
    # services know it, they have read past the forged one.
    marker = sample_subscription(account_id=ids["account"], subscription_id=f"sub-rch-{ids['tag']}", today=today)
    await client.load_for_dispute([marker])  # waits until payment-gateway and dispute both have it
    dead = await _read_topic(stack.endpoints.bootstrap, topics.DLQ,
                             lambda r: orjson.loads(r.value)["payload"]["topic"] == topics.PAYMENTS_CHARGES
                             and r.key == charge.account_id.encode(), 1)
    payload = orjson.loads(dead[0].value)["payload"]
    assert (payload["reason"], payload["consumer_group"]) == ("bad_signature", "cancelflow-payment_gateway")
    for url in (client.endpoints.payment_gateway, client.endpoints.dispute):
        code, _ = await client.get_json(f"{url}/charges/{marker.charges[0].charge_id}")
        assert code == 200, url
        code, _ = await client.get_json(f"{url}/charges/{charge.charge_id}")
        assert code == 404, f"{url} ingested a forged charge"


def _saga_record(payload: Payload, producer: str) -> bytes:
    return encode(envelope_for(payload, producer=producer, correlation_id=str(payload.request_id),  # type: ignore[attr-defined]
                               causation_id=None))


def _platform_committed(sample, today: date) -> PlatformCommitted:  # type: ignore[no-untyped-def]
    facts = sample.facts
    return PlatformCommitted(
        request_id=uuid.uuid4(), account_id=facts.account_id, subscription_id=facts.subscription_id,
        mode="immediate", full=True, trial=False, effective_date=today, access_end_date=today,
        period_start=facts.current_period_start, period_end=facts.current_period_end, quantity_before=1,
        quantity_after=0, currency="USD", refund_due=True, history="", snapshot={})


async def test_forged_saga_events_move_no_money(client, watcher, stack, ids, today):
    """The issue's probe: with keys on, an unsigned DuplicateRefundRequested, a PlatformCommitted for a
    subscription nobody cancelled signed by a service that does not own the type, and a genuine
    PlatformCommitted replayed with its body altered: no refund, no stopped schedule, no status; each
    is dead-lettered `bad_signature` (by the status tracker, which reads every saga record)."""
    victims = [sample_subscription(account_id=ids["account"], subscription_id=f"sub-victim{n}-{ids['tag']}",
                                   today=today) for n in range(3)]
    genuine = sample_subscription(account_id=ids["account"], subscription_id=f"sub-gen-{ids['tag']}", today=today)
    await client.load([*victims, genuine])
    genuine_rid = await client.request_cancellation(account_id=ids["account"],
                                                    subscription_id=genuine.facts.subscription_id)
    assert (await _finish(watcher, genuine_rid))["state"] == "completed"  # signed by each service: accepted
    [committed] = await _read_topic(stack.endpoints.bootstrap, topics.SAGA, lambda r: r.key == genuine_rid.encode()
                                    and orjson.loads(r.value)["event_type"] == "PlatformCommitted", 1)
    # `cancelflow up` made the services' keys (none were given) and kept them in the data dir.
    service_keys = (stack.data_dir / "service-keys").read_text()
    assert set(parse_keys(service_keys)) == set(SERVICES)
    assert SignatureCheck.from_text(None, service_keys).problem(  # type: ignore[union-attr]
        topics.SAGA, committed.value, committed.headers) is None
    gateway_url = client.endpoints.payment_gateway
    before = await _metric(client, gateway_url, "cancelflow_bad_signatures_total", topics.SAGA)

    charge = victims[0].charges[0]
    duplicate = DuplicateRefundRequested(request_id=uuid.uuid4(), account_id=ids["account"], lines=[{
        "charge_id": charge.charge_id, "gateway_charge_id": charge.gateway_charge_id, "amount": "30.00",
        "currency": "USD", "idempotency_key": f"cf-dispute-forged-{ids['tag']}"}])
    not_owner = _platform_committed(victims[1], today)
    replay = orjson.loads(committed.value)
    replay["event_id"] = str(uuid.uuid4())
    replay["payload"]["subscription_id"] = victims[2].facts.subscription_id
    forgeries = [
        (duplicate.request_id, _saga_record(duplicate, "dispute"), []),  # unsigned
        (not_owner.request_id, value := _saga_record(not_owner, "billing"),  # signed by a non-owner's key
         signature_headers(value, "notification", parse_keys(service_keys)["notification"][0])),
        (genuine_rid, orjson.dumps(replay), [h for h in committed.headers if h[0].startswith("cf-")]),
    ]
    for rid, value, headers in forgeries:
        event_type = orjson.loads(value)["event_type"]
        await client.publisher._producer.send_and_wait(
            topics.SAGA, value, key=str(rid).encode(),
            headers=[*(h for h in headers if h[0] != "cf-event-type"), ("cf-event-type", event_type.encode())])

    async def gateway_read_them() -> bool:
        ledger = await _ledger(client, client.endpoints.gateway)
        moved = _effects(ledger, "refund") + _effects(ledger, "reversal") + _effects(ledger, "schedule_stopped")
        assert not [e for e in moved if e.get("gateway_charge_id") == charge.gateway_charge_id
                    or e.get("subscription_id") in {v.facts.subscription_id for v in victims}], moved
        return await _metric(client, gateway_url, "cancelflow_bad_signatures_total", topics.SAGA) >= before + 3

    await _until(gateway_read_them)
    dead = [orjson.loads(r.value)["payload"] for r in await _read_topic(
        stack.endpoints.bootstrap, topics.DLQ, lambda r: orjson.loads(r.value)["payload"]["topic"] == topics.SAGA
        and r.key in {str(rid).encode() for rid, _, _ in forgeries}, 3)]
    assert sorted(d["reason"] for d in dead) == ["bad_signature"] * 3
    assert {d["consumer_group"] for d in dead} == {"cancelflow-status_tracker"}
    details = " | ".join(d["detail"] for d in dead)
    assert "not signed" in details and "published by billing" in details and "does not match" in details
    for rid in (duplicate.request_id, not_owner.request_id):
        assert str(rid) not in watcher.latest
    for victim in victims[1:]:
        _, body = await client.get_json(f"{client.endpoints.billing}/subscriptions/{victim.facts.subscription_id}")
        assert body["subscription"]["status"] == "active"
