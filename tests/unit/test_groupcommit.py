"""GroupCommit: a lone item is written at once; what arrives during a write goes in the next one, together."""

from __future__ import annotations

import asyncio

import pytest

from cancelflow.groupcommit import GroupCommit


class Store:
    """A flush that can be held open, to hand in items while it is under way."""

    def __init__(self) -> None:
        self.flushes: list[list[int]] = []
        self.started = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail_next: Exception | None = None

    async def flush(self, items: list[int]) -> None:
        self.started.set()
        await self.hold.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.flushes.append(items)


async def test_a_lone_item_is_flushed_at_once_and_the_caller_waits_for_it() -> None:
    store = Store()
    await GroupCommit(store.flush).add(1)
    assert store.flushes == [[1]]


async def test_items_handed_in_during_a_flush_go_together_in_the_next() -> None:
    store = Store()
    group = GroupCommit(store.flush)
    store.hold.clear()
    first = asyncio.create_task(group.add(1))
    await store.started.wait()
    later = [asyncio.create_task(group.add(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)  # let them hand in
    assert not first.done() and store.flushes == []
    store.hold.set()
    await asyncio.gather(first, *later)
    assert store.flushes == [[1], [2, 3, 4]]


async def test_a_failed_flush_fails_its_own_items_only() -> None:
    store = Store()
    group = GroupCommit(store.flush)
    store.hold.clear()
    doomed = asyncio.create_task(group.add(1))
    await store.started.wait()
    fine = asyncio.create_task(group.add(2))
    store.fail_next = RuntimeError("database is locked")
    store.hold.set()
    with pytest.raises(RuntimeError, match="database is locked"):
        await doomed
    await fine
    await group.add(3)
    assert store.flushes == [[2], [3]]


async def test_a_caller_that_stops_waiting_still_has_its_item_written() -> None:
    store = Store()
    group = GroupCommit(store.flush)
    store.hold.clear()
    impatient = asyncio.create_task(group.add(1))
    await store.started.wait()
    impatient.cancel()
    store.hold.set()
    await group.add(2)
    assert store.flushes == [[1], [2]]
