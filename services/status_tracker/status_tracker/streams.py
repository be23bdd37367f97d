"""The tracker's faust app: the saga topic read as raw bytes by one agent, the `views` table (changelog
backed: a restarted tracker rebuilds it before it reads on), and the stuck-request timer.

The saga topic is keyed by request_id, so a request's whole story is on one partition and its table
entry on the same changelog partition; each replica folds the partitions it is assigned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import faust
import orjson
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP

from cancelflow import metrics, topics
from cancelflow.events import envelope_for, utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import encode
from cancelflow.messaging.kafka import client_security
from cancelflow.settings import ServiceSettings
from status_tracker import tracking
from status_tracker.handlers import Record, SagaProcessor
from status_tracker.projection import ReadModel
from status_tracker.tracking import Entry

log = get_logger(__name__)

PARTITIONS = topics.BY_NAME[topics.SAGA].partitions


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust fixes the fetch wait at 1.5 s and the embedded broker waits all of it out on every
        # fetch: use CANCELFLOW_FETCH_MAX_WAIT_MS like every other consumer (read when it starts).
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class _Consumer(faust_kafka.Consumer):
    def _new_consumer_thread(self) -> faust_kafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_kafka.Transport):
    Consumer = _Consumer


class TrackerApp(faust.App):
    fetch_max_wait_ms = 1500

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def credentials(settings: ServiceSettings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """KAFKA_SECURITY_PROTOCOL and friends, as faust takes them (the same as every other client)."""
    options = client_security(settings)
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(username=options["sasl_plain_username"],
                                     password=options["sasl_plain_password"],
                                     mechanism=options["sasl_mechanism"], ssl_context=options.get("ssl_context"))
    if "ssl_context" in options:
        return faust.SSLCredentials(options["ssl_context"])
    return None


class TableEntries:
    """`handlers.Entries` over the faust table (keys and values as bytes; values are orjson)."""

    def __init__(self, table: faust.Table) -> None:
        self._table = table

    def get(self, request_id: str) -> Entry | None:
        raw = self._table.get(request_id.encode())
        return orjson.loads(raw) if raw else None

    def put(self, request_id: str, entry: Entry) -> None:
        # Written while the agent handles the request's saga record: the changelog partition is that
        # record's partition, which the stuck timer uses to look only at partitions this replica owns.
        event = faust.current_event()
        partition = event.message.partition if event is not None else entry.get("partition")
        self._table[request_id.encode()] = orjson.dumps({**entry, "partition": partition})

    def values(self) -> Iterator[Entry]:
        for raw in list(self._table.values()):
            yield orjson.loads(raw)


class TableMarkers:
    """`handlers.Markers` over a faust table: dead-lettered records, so a replay does not repeat them."""

    def __init__(self, table: faust.Table) -> None:
        self._table = table

    def __contains__(self, marker: object) -> bool:
        return isinstance(marker, str) and marker.encode() in self._table

    def add(self, marker: str) -> None:
        self._table[marker.encode()] = b"1"


class Streams:
    def __init__(self, settings: ServiceSettings, *, app_id: str, read_model: ReadModel) -> None:
        self.settings = settings
        session_s = settings.session_timeout_ms / 1000
        self.datadir = settings.data_dir.resolve() / "status_tracker"  # faust keeps nothing there with memory://
        self.app = TrackerApp(
            app_id,
            broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
            broker_credentials=credentials(settings),
            store="memory://",  # the changelog topics are the durable copy
            web_enabled=False,  # HTTP is the tracker's own aiohttp app (status_tracker.http)
            datadir=str(self.datadir),
            topic_partitions=PARTITIONS,
            topic_replication_factor=int(os.environ.get("KAFKA_TOPIC_REPLICATION_FACTOR", "1")),
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # Short sessions, commits and recovery pauses: faust's defaults assume long-lived workers
            # (and the embedded broker completes a group join only after about half the session).
            broker_session_timeout=session_s,
            broker_heartbeat_interval=max(0.3, session_s / 10),
            broker_rebalance_timeout=max(10.0, 2 * session_s),
            broker_commit_interval=0.5,
            stream_wait_empty=False,
            stream_recovery_delay=0.1,
        )
        self.app.fetch_max_wait_ms = settings.fetch_max_wait_ms
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
        self._topics = {name: self.app.topic(name, **raw) for name in (topics.SAGA, topics.STATUS, topics.DLQ)}
        self.views = self.app.Table("views", key_type=bytes, value_type=bytes, partitions=PARTITIONS,
                                    help="the current view of each request")
        self.dead_lettered = self.app.Table("dead_lettered", key_type=bytes, value_type=bytes,
                                            partitions=PARTITIONS, help="saga records sent to the DLQ")
        self.entries = TableEntries(self.views)
        self.processor = SagaProcessor(entries=self.entries, dead_lettered=TableMarkers(self.dead_lettered),
                                       read_model=read_model, publish=self.publish, group_id=app_id)
        self._processed: dict[int, int] = {}  # partition -> last saga offset folded
        self._flagged: dict[str, float] = {}  # request_id -> when RequestStuck was sent (monotonic)
        self.app.agent(self._topics[topics.SAGA], name="status_tracker.fold_saga")(self._fold_saga)
        self.stuck_after_s = settings.stuck_after_s
        self.app.timer(min(30.0, max(0.5, self.stuck_after_s / 4)), name="status_tracker.stuck")(self.flag_stuck)

    async def publish(self, topic: str, key: str | None, value: bytes) -> None:
        """Send a record and return once the broker acknowledged it."""
        pending = await self._topics[topic].send(key=key.encode() if key is not None else None, value=value)
        await pending

    async def _fold_saga(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            m = event.message
            await self.processor.process(Record(m.topic, m.partition, m.offset, m.key, m.value))
            self._processed[m.partition] = m.offset
            highwater = self.app.consumer.highwater(TP(m.topic, m.partition))
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(m.topic, str(m.partition)).set(max(0, highwater - m.offset - 1))

    async def _caught_up(self, partition: int) -> bool:
        tp = TP(topics.SAGA, partition)
        highwater = self.app.consumer.highwater(tp)
        if highwater is None:
            return False
        if partition in self._processed:
            return self._processed[partition] + 1 >= highwater
        position = await self.app.consumer.position(tp)
        return position is not None and position >= highwater

    async def flag_stuck(self) -> list[str]:
        """Send `RequestStuck` for every open request of this replica's partitions that has not changed
        for STUCK_AFTER_SECONDS. Only partitions read to their end count: a backlog may hold the very
        progress that would make the alert false. The agent folds the event like any other (it ends
        the request `manual_review`, or is dropped when the request moved on meanwhile), and
        notification alerts support."""
        assigned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == topics.SAGA}
        current = {p for p in assigned if await self._caught_up(p)}
        candidates = [e for e in self.entries.values() if e.get("partition") in current]
        now, flagged = utcnow(), []
        reflag_after = max(60.0, self.stuck_after_s)
        for stuck in tracking.overdue(candidates, now, self.stuck_after_s):
            request_id = str(stuck.request_id)
            if time.monotonic() - self._flagged.get(request_id, float("-inf")) < reflag_after:
                continue  # sent already; the agent has not folded it yet
            envelope = envelope_for(stuck, producer=tracking.PRODUCER, correlation_id=request_id, causation_id=None)
            await self.publish(topics.SAGA, request_id, encode(envelope))
            self._flagged[request_id] = time.monotonic()
            flagged.append(request_id)
            log.warning("request stuck", request_id=request_id, stage=stuck.stage,
                        stuck_for_seconds=stuck.stuck_for_seconds)
        return flagged
