"""The live feed behind GET /events: `cancellations.status` followed from its end, fanned out to every
connected dashboard. It reads the topic rather than hearing the agent, so any replica streams every
request's changes, whichever replica folded them.

It reads only while a dashboard is connected. Following the topic with nobody listening cost a
consumer's fetches (every status record decoded and dropped) on the tracker and on the broker; with
the last dashboard gone the partitions are paused, and the next dashboard's subscription moves them
to the topic's end before it is told it is connected, so it misses nothing from then on."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from cancelflow import topics
from cancelflow.events import CancellationStatusChanged
from cancelflow.logging import get_logger
from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.kafka import client_security, partitions_of
from cancelflow.messaging.signatures import SignatureCheck
from cancelflow.settings import ServiceSettings

log = get_logger(__name__)

Subscriber = asyncio.Queue[dict[str, Any] | None]


class StatusFeed:
    QUEUE_SIZE = 1000  # a dashboard this far behind is dropped; it reconnects and reloads

    def __init__(self, settings: ServiceSettings) -> None:
        self._settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._subscribers: set[Subscriber] = set()
        self._partitions: list[TopicPartition] = []
        self.idle = asyncio.Event()  # set while the partitions are paused (no dashboard connected)
        self._resuming = asyncio.Lock()
        self._signatures = SignatureCheck.from_text(None, settings.service_keys)

    async def start(self) -> None:
        settings = self._settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
            fetch_max_wait_ms=settings.fetch_max_wait_ms, client_id="cancelflow-status_tracker-feed",
            **client_security(settings))
        await self._consumer.start()
        self._partitions = await partitions_of(self._consumer, topics.STATUS)
        self._consumer.assign(self._partitions)
        self._pause()  # until a dashboard connects

    @property
    def following(self) -> bool:
        """Reading the topic (a dashboard is connected)."""
        return not self.idle.is_set()

    def _pause(self) -> None:
        assert self._consumer is not None
        self._consumer.pause(*self._partitions)
        self.idle.set()

    async def run(self) -> None:
        assert self._consumer is not None
        gaps = GapGuard()
        while True:
            batch = await gaps.check(self._consumer, await self._consumer.getmany(timeout_ms=1000))
            for records in batch.values():
                for record in records:
                    if status := self._status_of(record):
                        self._fan_out(status)

    def _status_of(self, record: ConsumerRecord) -> dict[str, Any] | None:
        """The status a record carries, or None when it is not one of ours: the tracker is the topic's
        only writer, and with service keys it signs each record (CONTRACT.md section 10)."""
        signatures = self._signatures
        if signatures and signatures.problem(record.topic, record.value, record.headers):
            return None
        try:
            envelope = orjson.loads(record.value)
            status = {"event_id": envelope["event_id"], **envelope["payload"]}
            event_type = envelope["event_type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if signatures and (event_type != CancellationStatusChanged.event_type
                           or signatures.not_owner(record.topic, event_type, record.headers)):
            return None
        return status

    def _fan_out(self, status: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(status)
            except asyncio.QueueFull:
                self._drop(queue)

    def _drop(self, queue: Subscriber) -> None:
        self.unsubscribe(queue)
        while not queue.empty():  # make room for the end marker
            queue.get_nowait()
        queue.put_nowait(None)

    async def subscribe(self) -> Subscriber:
        """A queue of every status record from now on (the feed moves to the topic's end first if it
        was paused)."""
        queue: Subscriber = asyncio.Queue(self.QUEUE_SIZE)
        self._subscribers.add(queue)  # first: a dashboard leaving meanwhile does not pause the feed
        try:
            async with self._resuming:
                if self.idle.is_set() and self._consumer is not None:
                    # Paused partitions still take the seek; resuming after it, nothing older is read.
                    await self._consumer.seek_to_end(*self._partitions)
                    self._consumer.resume(*self._partitions)
                    self.idle.clear()
        except BaseException:
            self.unsubscribe(queue)
            raise
        return queue

    def unsubscribe(self, queue: Subscriber) -> None:
        self._subscribers.discard(queue)
        if not self._subscribers and not self.idle.is_set() and self._consumer is not None:
            self._pause()

    async def ping(self) -> None:
        """A metadata round trip to the broker (for /readyz)."""
        if self._consumer is None:
            raise RuntimeError("not started")
        await self._consumer.topics()

    async def stop(self) -> None:
        for queue in list(self._subscribers):  # every open /events response ends
            self._drop(queue)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
