"""Re-reading a partition where a fetch skipped offsets.

Measured on the embedded broker (Tansu 0.6, memory storage): with a dozen producers writing to a
partition while consumers fetch from it, a fetch now and then returns offsets 646-648 and then 650:
offset 649 was assigned to a concurrent produce but was not readable yet, and the fetch went past it.
A fresh read later returns 649. A consumer that carried on would never see that record, and with it
a request's saga would stop (`tests/integration/test_gaps.py` shows it against the broker).

Our topics are neither compacted nor written transactionally, so on them a record's offset is always
the previous one plus one. `GapGuard` holds a partition's records back from the first offset past a
hole, seeks back to the hole and lets the next fetch read it again. A hole that stays for `grace_s` is
accepted (logged and counted): Apache Kafka leaves real holes where a transactional producer wrote a
commit marker or compaction removed a record, and such a topic must not stand still for ever.
`grace_s=0` switches the guard off.
"""

from __future__ import annotations

import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from cancelflow import metrics
from cancelflow.logging import get_logger

log = get_logger(__name__)

Batch = dict[TopicPartition, list[ConsumerRecord]]


class GapGuard:
    def __init__(self, *, grace_s: float = 2.0) -> None:
        self._grace_s = grace_s
        self._expected: dict[TopicPartition, int] = {}  # the next offset each partition must return
        self._holes: dict[tuple[TopicPartition, int], float] = {}  # (partition, offset) -> first seen

    def forget(self, partitions: Any) -> None:
        """Partitions revoked or (re)assigned: their next offset is learnt afresh."""
        for tp in partitions:
            self._expected.pop(tp, None)

    async def check(self, consumer: AIOKafkaConsumer, batch: Batch) -> Batch:
        """`batch` without the records at and after a hole (their partitions are sought back to it)."""
        if self._grace_s <= 0:
            return batch
        clean: Batch = {}
        for tp, records in batch.items():
            if not records:
                continue
            expected = self._expected.get(tp)
            if expected is None:
                expected = await _start_of(consumer, tp, records[0].offset)
            if records[0].offset == expected:
                self._holes.pop((tp, expected), None)  # a hole read again, now filled
            kept = self._contiguous(tp, expected, records)
            self._expected[tp] = kept[-1].offset + 1 if kept else expected
            if kept:
                clean[tp] = kept
            if len(kept) < len(records):
                consumer.seek(tp, self._expected[tp])
        return clean

    def _contiguous(self, tp: TopicPartition, expected: int, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        for i, record in enumerate(records):
            if record.offset > expected and not self._accept_hole(tp, expected, record.offset):
                return records[:i]
            expected = record.offset + 1
        return records

    def _accept_hole(self, tp: TopicPartition, start: int, found: int) -> bool:
        now = time.monotonic()
        first_seen = self._holes.setdefault((tp, start), now)
        if now - first_seen < self._grace_s:
            if first_seen == now:
                metrics.OFFSET_GAPS.labels(tp.topic, "refetched").inc()
                log.info("fetch skipped offsets; reading them again", topic=tp.topic, partition=tp.partition,
                         missing_from=start, next_found=found)
            return False
        del self._holes[(tp, start)]
        metrics.OFFSET_GAPS.labels(tp.topic, "accepted").inc()
        log.warning("offsets stayed missing; carrying on past them", topic=tp.topic, partition=tp.partition,
                    missing_from=start, next_found=found, waited_s=round(now - first_seen, 2))
        return True


async def _start_of(consumer: AIOKafkaConsumer, tp: TopicPartition, first_fetched: int) -> int:
    """Where a group member's reading of `tp` began: the group's committed offset. A reader outside a
    group sought wherever it wanted; its first record is where it began."""
    if consumer._group_id is None:  # noqa: SLF001 (aiokafka has no public accessor)
        return first_fetched
    committed = await consumer.committed(tp)
    return first_fetched if committed is None else min(committed, first_fetched)
