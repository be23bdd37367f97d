"""GapGuard (messaging/gaps.py) with a stand-in consumer: what it holds back, where it seeks, when it
gives up waiting for a hole."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import REGISTRY

from cancelflow.messaging import gaps
from cancelflow.messaging.gaps import GapGuard

TP = TopicPartition("cancellations.saga", 0)
OTHER = TopicPartition("cancellations.saga", 1)


class FakeConsumer:
    def __init__(self, *, group_id: str | None = "cancelflow-billing", committed: int | None = None) -> None:
        self._group_id = group_id
        self._committed = committed
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def committed(self, tp: TopicPartition) -> int | None:
        return self._committed


def records(tp: TopicPartition, *offsets: int) -> list[ConsumerRecord]:
    return [ConsumerRecord(tp.topic, tp.partition, o, 0, 0, b"k", b"v", None, 1, 1, []) for o in offsets]


def offsets(batch: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[int]]:
    return {tp: [r.offset for r in rs] for tp, rs in batch.items()}


def gap_count(outcome: str) -> float:
    return REGISTRY.get_sample_value("cancelflow_offset_gaps_total",
                                     {"topic": TP.topic, "outcome": outcome}) or 0.0


async def test_contiguous_records_pass_untouched() -> None:
    consumer, guard = FakeConsumer(committed=5), GapGuard()
    batch = {TP: records(TP, 5, 6, 7), OTHER: records(OTHER, 0, 1)}
    assert offsets(await guard.check(consumer, batch)) == {TP: [5, 6, 7], OTHER: [0, 1]}
    assert offsets(await guard.check(consumer, {TP: records(TP, 8, 9)})) == {TP: [8, 9]}
    assert consumer.seeks == []


async def test_a_hole_inside_a_batch_holds_back_the_rest_and_seeks_to_it() -> None:
    consumer, guard = FakeConsumer(committed=646), GapGuard()
    before = gap_count("refetched")
    batch = await guard.check(consumer, {TP: records(TP, 646, 647, 648, 650, 651), OTHER: records(OTHER, 3)})
    assert offsets(batch) == {TP: [646, 647, 648], OTHER: [3]}
    assert consumer.seeks == [(TP, 649)]
    assert gap_count("refetched") == before + 1
    # The next fetch brings the missing record: everything flows on.
    assert offsets(await guard.check(consumer, {TP: records(TP, 649, 650, 651)})) == {TP: [649, 650, 651]}
    assert guard._holes == {}  # a filled hole is not remembered


async def test_a_hole_at_the_start_of_a_fetch_is_read_again() -> None:
    consumer, guard = FakeConsumer(committed=0), GapGuard()
    await guard.check(consumer, {TP: records(TP, 0, 1)})
    assert await guard.check(consumer, {TP: records(TP, 3, 4)}) == {}
    assert consumer.seeks == [(TP, 2)]


async def test_the_committed_offset_is_where_a_group_member_starts() -> None:
    # Offset 10 was skipped by the very first fetch after the assignment.
    consumer, guard = FakeConsumer(committed=10), GapGuard()
    assert await guard.check(consumer, {TP: records(TP, 11, 12)}) == {}
    assert consumer.seeks == [(TP, 10)]


async def test_a_reader_outside_a_group_starts_at_its_first_record() -> None:
    consumer, guard = FakeConsumer(group_id=None), GapGuard()
    assert offsets(await guard.check(consumer, {TP: records(TP, 149, 150)})) == {TP: [149, 150]}


async def test_a_hole_that_stays_is_accepted_after_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(gaps.time, "monotonic", lambda: now[0])
    consumer, guard = FakeConsumer(committed=0), GapGuard(grace_s=2.0)
    await guard.check(consumer, {TP: records(TP, 0)})
    before = gap_count("accepted")
    for _ in range(3):  # read again and again while the grace period runs
        now[0] += 0.5
        assert await guard.check(consumer, {TP: records(TP, 2, 3)}) == {}
    now[0] += 1.0
    assert offsets(await guard.check(consumer, {TP: records(TP, 2, 3)})) == {TP: [2, 3]}
    assert gap_count("accepted") == before + 1
    assert consumer.seeks == [(TP, 1)] * 3


async def test_grace_zero_switches_the_guard_off() -> None:
    consumer, guard = FakeConsumer(committed=0), GapGuard(grace_s=0)
    assert offsets(await guard.check(consumer, {TP: records(TP, 0, 5)})) == {TP: [0, 5]}
    assert consumer.seeks == []


async def test_a_rebalance_makes_it_learn_the_partition_afresh() -> None:
    consumer, guard = FakeConsumer(committed=0), GapGuard()
    await guard.check(consumer, {TP: records(TP, 0, 1)})
    # Another member handled 2..39 meanwhile and committed 40; we get the partition back.
    guard.forget([TP])
    consumer._committed = 40
    assert offsets(await guard.check(consumer, {TP: records(TP, 40, 41)})) == {TP: [40, 41]}
    assert consumer.seeks == []
