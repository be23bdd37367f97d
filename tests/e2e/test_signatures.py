"""CONTRACT.md section 10 on the whole stack: with producer keys configured, only records signed by a
known producer's key (any of its keys, for rotation) have an effect; the rest are dead-lettered with
reason `bad_signature`, counted, and leave no trace in the status."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest

from cancelflow import topics
from cancelflow.events import CancellationRequested, envelope_for
from cancelflow.messaging.codec import encode
from cancelflow.messaging.signatures import sign
from cancelflow.ops import sample_subscription
from cancelflow.testing.smtp import RecordingSMTPServer
from cancelflow.testing.stack import StackProcess
from cancelflow.upstream import UpstreamPublisher
from tests.e2e.test_cancellation_flow import _finish, _read_topic

pytestmark = pytest.mark.e2e

KEYS = "storefront:new-key,storefront:old-key,bss:bss-key,platform:platform-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smtp: RecordingSMTPServer) -> Iterator[StackProcess]:  # type: ignore[no-untyped-def]
    process = StackProcess(tmp_path_factory.mktemp("stack-signed"), extra_env={
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port), "CANCELFLOW_PRODUCER_KEYS": KEYS})
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


async def _metric(client, url: str, name: str) -> float:  # type: ignore[no-untyped-def]
    assert client._http is not None
    async with client._http.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


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
