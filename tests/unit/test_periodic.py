"""cancelflow.periodic.repeat: rounds again and again, past failures, at the pace a round chooses."""

from __future__ import annotations

import asyncio
from typing import Any

from cancelflow.periodic import repeat


async def _until(done: asyncio.Event, loop: Any) -> None:
    task = asyncio.create_task(loop)
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()


async def test_a_round_that_asks_for_no_pause_is_followed_at_once() -> None:
    rounds, done = [], asyncio.Event()

    async def work() -> int:
        rounds.append(len(rounds))
        if len(rounds) == 3:
            done.set()
        return len(rounds)

    await _until(done, repeat(work, every_s=60, failed="no", then=lambda n: 0 if n < 3 else None))
    assert rounds == [0, 1, 2]


async def test_a_failed_round_is_logged_and_then_is_told_none() -> None:
    told, done = [], asyncio.Event()

    async def work() -> str:
        if not told:
            raise RuntimeError("database away")
        done.set()
        return "ok"

    def then(result: str | None) -> float:
        told.append(result)
        return 0

    await _until(done, repeat(work, every_s=60, failed="round failed", then=then))
    assert told[0] is None


async def test_wakeup_starts_the_next_round_before_its_time() -> None:
    rounds, wakeup, done = [], asyncio.Event(), asyncio.Event()

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 2:
            done.set()
        else:
            wakeup.set()  # as a commit during the round would: not lost

    await _until(done, repeat(work, every_s=60, failed="no", wakeup=wakeup))
    assert rounds == [0, 1]
