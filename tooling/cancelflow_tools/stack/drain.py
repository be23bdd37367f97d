"""A clean stop that loses nothing in flight: the work under way finishes before the broker stops.

The embedded broker keeps its records in memory only, so a record published and not yet handled by every
service that reads it would be lost with it (a refund owed for a cancellation already committed, say).
Before the stack stops, `drain` asks every service what it has in flight (`GET /inflight`: records of its
partitions not handled yet, events committed and not published yet) until all of it is done, for at most
`within_s` seconds, and says on the console how many requests were open, how many finished and what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from rich.console import Console

_EVERY_S = 0.25


@dataclass(frozen=True)
class InFlight:
    """Summed over the services; None when one of them did not answer (restarting, say)."""

    unhandled: int | None = None  # records not handled yet by a service that reads them
    unpublished: int | None = None  # events committed and not handed to the broker yet
    open_requests: int | None = None  # requests received or in progress (the status tracker's count)
    finished_requests: int | None = None

    @property
    def idle(self) -> bool:
        return self.unhandled == 0 and self.unpublished == 0


async def measure(http: aiohttp.ClientSession, urls: Sequence[str]) -> InFlight:
    """What the services at `urls` (their HTTP origins) have in flight now."""

    async def one(url: str) -> dict[str, int] | None:
        try:
            async with http.get(f"{url}/inflight") as response:
                return await response.json() if response.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    answers = await asyncio.gather(*(one(url) for url in urls))

    def total(name: str) -> int | None:
        if any(a is None for a in answers):
            return None
        found = [a[name] for a in answers if a is not None and name in a]
        return sum(found) if found else None

    return InFlight(total("unhandled"), total("unpublished"), total("open_requests"), total("finished_requests"))


async def drain(urls: Sequence[str], console: Console, *, within_s: float,
                hurry: asyncio.Event | None = None) -> InFlight:
    """Wait until nothing is in flight twice in a row (a record between two services shows in one of
    the two looks), `within_s` has passed, or `hurry` is set; report on the console; the last look."""
    hurry = hurry or asyncio.Event()
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), trust_env=False) as http:
        first = now = await measure(http, urls)
        console.print(f"stopping: finishing the work in flight first (at most {within_s:.0f} s; Ctrl-C again "
                      f"stops at once): {_n(first.open_requests)} requests open, {_n(first.unhandled)} records "
                      f"not handled yet, {_n(first.unpublished)} events not published yet", soft_wrap=True)
        quiet = 0
        while not hurry.is_set() and time.monotonic() - started < within_s:
            quiet = quiet + 1 if now.idle else 0
            if quiet >= 2:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), _EVERY_S)
            now = await measure(http, urls)
    took = time.monotonic() - started
    finished = (now.finished_requests - first.finished_requests
                if now.finished_requests is not None and first.finished_requests is not None else None)
    said = (f"{_n(first.open_requests)} requests were open, {_n(finished)} finished since, "
            f"{_n(now.open_requests)} still open")
    if quiet >= 2:
        console.print(f"drained in {took:.1f} s: {said}", soft_wrap=True)
        if now.open_requests:
            console.print("[yellow]the requests still open wait for records an earlier stop lost: the status "
                          "tracker sets them aside for manual review (docs/operations.md)[/]", soft_wrap=True)
    else:
        why = "stopped at once" if hurry.is_set() else f"stopped after {took:.0f} s"
        console.print(f"[yellow]drain {why}: {said}; {_n(now.unhandled)} records not handled (lost with the "
                      f"embedded broker's memory) and {_n(now.unpublished)} events not published (they are, "
                      f"on the next `up`)[/]", soft_wrap=True)
    return now


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"
