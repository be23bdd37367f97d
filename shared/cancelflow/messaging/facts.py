"""How far a service has read its upstream facts topics (subscriptions, charges), so that a request naming
a subscription or charge it does not know yet can tell "unknown" from "not read yet".

After a restart a service meets a backlog: a request may come before the facts published ahead of it.
The consume loop handles a poll's facts first and notes here, per facts partition it holds, its position,
the partition's high-water mark and the time of the last fact it returned. A request's time is read up
to when every such partition is read to its end, or has returned a fact at least as recent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


@dataclass(frozen=True)
class _Read:
    position: int
    highwater: int
    last_fact_ms: int | None


class FactsProgress:
    def __init__(self, topics: set[str] | None = None) -> None:
        self.topics: set[str] = set(topics or ())
        self._read: dict[TopicPartition, _Read | None] = {}  # None: not fetched yet

    async def update(self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """After a poll (whose facts are handled before anything else of it): where each facts partition
        of the assignment stands."""
        read: dict[TopicPartition, _Read | None] = {}
        for tp in consumer.assignment():
            if tp.topic not in self.topics:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:  # no fetch answered for it yet: its position may still be unknown
                read[tp] = None
                continue
            before = self._read.get(tp)
            last = before.last_fact_ms if before else None
            if batch.get(tp):
                last = max(last or 0, max(r.timestamp for r in batch[tp]))
            read[tp] = _Read(await consumer.position(tp), highwater, last)
        self._read = read

    def read_up_to(self, at: datetime) -> bool:
        """Every facts partition this member holds is read to its end or past `at` (False while it holds
        none, or one has not been fetched yet: then nobody can say; True when it reads no facts topic)."""
        if not self.topics:
            return True
        if not self._read:
            return False
        at_ms = int(at.timestamp() * 1000)
        return all(r is not None and (r.position >= r.highwater or (r.last_fact_ms or -1) >= at_ms)
                   for r in self._read.values())
