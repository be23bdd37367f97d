"""The status tracker on the real broker (in-process): a restart goes on from its database, a stuck
request ends `manual_review` with a `timeout` error, and the live feed streams every status record."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import orjson

from cancelflow import topics
from cancelflow.events import CancellationReceived, Mode, VendorCancellationRequested, VendorProvisioned
from cancelflow.sql import Db
from status_tracker.projection import ReadModel

CUSTOMER = {"user_id": "u-1", "role": "customer", "channel": "storefront"}


def received(rid: uuid.UUID, sub: str) -> CancellationReceived:
    return CancellationReceived(request_id=rid, account_id="acc-st", target="subscription", subscription_id=sub,
                                mode=Mode.immediate, requested_by=CUSTOMER)


def vendor_requested(rid: uuid.UUID, sub: str) -> VendorCancellationRequested:
    return VendorCancellationRequested(request_id=rid, account_id="acc-st", subscription_id=sub, vendor="acme",
                                       vendor_subscription_id=f"V-{sub}", effective_date="2026-11-21",
                                       current_quantity=1, new_quantity=0,
                                       snapshot={"provisioning_status": "In Progress"})


def about(rid: uuid.UUID):  # type: ignore[no-untyped-def]
    return lambda e: e.payload.get("request_id") == str(rid)


async def test_a_restarted_tracker_goes_on_from_its_database(services, publisher, topic_reader, tmp_path):  # type: ignore[no-untyped-def]
    status = await topic_reader(topics.STATUS)
    rid, sub = uuid.uuid4(), f"sub-{uuid.uuid4().hex[:8]}"
    url = f"sqlite+aiosqlite:///{tmp_path / 'tracker.db'}"
    first = await services.start_service("status_tracker", url)
    group = first.group_id
    await publisher.publish(received(rid, sub))
    await publisher.publish(vendor_requested(rid, sub))
    await status.wait_for_count(about(rid), 2)
    await services.stop(first)

    again = await services.start_service("status_tracker", url, group_id=group)
    await publisher.publish(VendorProvisioned(request_id=rid, subscription_id=sub, vendor="acme",
                                              vendor_subscription_id=f"V-{sub}", new_quantity=0))
    last = await status.wait_for(lambda e: about(rid)(e) and e.payload["version"] == 3)
    assert last.payload["stage"] == "platform"
    # A status record whose outbox row outlived the stop is published again: the same event, which
    # consumers drop by event_id. Distinct records: one per version.
    distinct = {r.event_id: r.payload["version"] for r in status.matching(about(rid))}
    assert sorted(distinct.values()) == [1, 2, 3]
    async with again.runtime.sessions() as session:
        entry = await ReadModel.entry_in(Db(session), str(rid))
    assert entry is not None and entry["version"] == 3


async def test_a_request_without_progress_ends_in_manual_review(services, publisher, topic_reader, tmp_path):  # type: ignore[no-untyped-def]
    saga = await topic_reader(topics.SAGA)
    status = await topic_reader(topics.STATUS)
    running = await services.start_service("status_tracker", f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
                                           STUCK_AFTER_SECONDS="1")
    rid, sub = uuid.uuid4(), f"sub-{uuid.uuid4().hex[:8]}"
    await publisher.publish(received(rid, sub))
    await publisher.publish(vendor_requested(rid, sub))

    stuck = await saga.wait_for(lambda e: e.event_type == "RequestStuck" and e.payload["request_id"] == str(rid),
                                timeout=30)
    assert stuck.payload["stage"] == "vendor" and stuck.payload["stuck_for_seconds"] >= 1
    assert stuck.producer == "status_tracker" and saga.record_of(stuck).key == str(rid).encode()
    final = await status.wait_for(
        lambda e: e.payload.get("request_id") == str(rid) and e.payload["state"] == "manual_review", timeout=30)
    assert final.payload["error"]["code"] == "timeout" and final.payload["error"]["source"] == "vendor"
    assert final.payload["version"] == 3

    # Said once: later ticks see a terminal request. The timer forgets what it flagged (as it does after
    # a minute), and a second stuck request is the marker: the tick that flags it looked at the first too.
    running.runtime.stuck._flagged.clear()
    marker, marker_sub = uuid.uuid4(), f"sub-{uuid.uuid4().hex[:8]}"
    await publisher.publish(received(marker, marker_sub))
    await publisher.publish(vendor_requested(marker, marker_sub))
    await saga.wait_for(lambda e: e.event_type == "RequestStuck" and e.payload["request_id"] == str(marker),
                        timeout=30)
    assert len(saga.matching(lambda e: e.event_type == "RequestStuck" and e.payload["request_id"] == str(rid))) == 1
    async with aiohttp.ClientSession() as http, http.get(f"{running.http_url}/requests/{rid}") as response:
        body = await response.json()
    assert body["state"] == "manual_review" and body["error_help"]["label"] == "No progress"


async def test_the_live_feed_streams_status_records(services, publisher, tmp_path):  # type: ignore[no-untyped-def]
    running = await services.start_service("status_tracker", f"sqlite+aiosqlite:///{tmp_path / 'f.db'}")
    feed = running.runtime.feed
    partitions = set(feed._partitions)
    # Nobody connected: the feed does not read the topic (its partitions are paused).
    assert not feed.following and running.runtime.feed._consumer.paused() == partitions

    async def stream(rid: uuid.UUID, sub: str) -> dict:
        async with aiohttp.ClientSession() as http, http.get(f"{running.http_url}/events") as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            await response.content.readuntil(b"\n\n")  # connected
            assert feed.following and not feed._consumer.paused()
            await publisher.publish(received(rid, sub))

            async def next_status() -> dict:
                while True:
                    block = (await response.content.readuntil(b"\n\n")).decode()
                    fields = dict(line.split(": ", 1) for line in block.strip().splitlines() if ": " in line)
                    if fields.get("event") == "status" and orjson.loads(fields["data"])["request_id"] == str(rid):
                        return orjson.loads(fields["data"])

            return await asyncio.wait_for(next_status(), 30)

    rid, sub = uuid.uuid4(), f"sub-{uuid.uuid4().hex[:8]}"
    event = await stream(rid, sub)
    assert event["request_id"] == str(rid) and event["state"] == "received" and event["version"] == 1
    await publisher.publish(received(uuid.uuid4(), f"sub-{uuid.uuid4().hex[:8]}"))  # a status record for no one
    await asyncio.wait_for(feed.idle.wait(), 30)  # the server notices the closed stream at that write
    assert feed._consumer.paused() == partitions
    # The next dashboard is moved to the topic's end and gets what happens from then on.
    rid, sub = uuid.uuid4(), f"sub-{uuid.uuid4().hex[:8]}"
    event = await stream(rid, sub)
    assert event["request_id"] == str(rid) and event["state"] == "received" and event["version"] == 1
