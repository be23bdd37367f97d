"""A task that runs a piece of work again and again until cancelled, and outlives its failures.

The services' background rounds (the outbox relay, the email sender, end-of-term cancellations,
pruning the inbox, the stuck-request check, the open-request gauges, the consumer's lag) all wait,
work, and on an error that says the database or the broker is away, log it and try again next round.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from cancelflow.logging import get_logger

log = get_logger(__name__)


async def repeat(work: Callable[[], Awaitable[Any]], *, every_s: float, failed: str, at_once: bool = True,
                 wakeup: asyncio.Event | None = None, level: str = "warning",
                 then: Callable[[Any], float | None] | None = None) -> None:
    """Run `work` (at once, or after the first `every_s` when not `at_once`), then every `every_s`, or as
    soon as `wakeup` is set. A round that raises is logged at `level` with the message `failed`; the
    next round tries again. `then`, given what a round returned (None when it raised), may choose the
    pause before the next one: that many seconds, not cut short by `wakeup` (0: at once)."""
    if not at_once:
        await _pause(every_s, wakeup)
    while True:
        result = None
        try:
            result = await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            getattr(log, level)(failed, error=repr(exc))
        seconds = then(result) if then is not None else None
        if seconds is None:
            await _pause(every_s, wakeup)
        else:
            await asyncio.sleep(seconds)  # 0 too: the others get their turn


async def _pause(seconds: float, wakeup: asyncio.Event | None) -> None:
    if wakeup is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wakeup.wait(), seconds)
    wakeup.clear()
