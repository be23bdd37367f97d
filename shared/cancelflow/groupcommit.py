"""Group commit: what many tasks hand in while one write is under way goes in the next write, together.

`await group.add(item)` returns once a flush that held `item` has finished (or raises what that flush
raised). The first item starts a flush at once; items handed in meanwhile wait for it and then go in
one flush of their own. Nothing waits for a timer or a batch size: a lone item is written at once,
and under load the batches grow by themselves to what arrives during one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[None]]) -> None:
        self._flush = flush
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def add(self, item: T) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._drain())
        # The item is written even when the caller stops waiting (shield): it was handed in.
        await asyncio.shield(future)

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    await self._flush([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter of this batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                            future.exception()  # a waiter that went away must not log it as unretrieved
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._flushing = None
            for _, future in batch + self._waiting:  # cancelled (shutdown): nobody waits for ever
                future.cancel()
            self._waiting = []
