"""Open requests for /metrics: how many are in each non-terminal state, and how long the least recently
changed one of each state has been waiting (the "stuck requests" alert reads it).

The tracker holds every request's current view, so it is the one place that can say this; the numbers
are refreshed every `interval_s` from its database.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cancelflow import metrics
from cancelflow.events import TERMINAL_STATES, State
from cancelflow.logging import get_logger
from cancelflow.periodic import repeat
from status_tracker import orm
from status_tracker.tracking import STUCK_STATES

log = get_logger(__name__)

OPEN_STATES = tuple(s.value for s in State if s not in TERMINAL_STATES)


async def refresh(sessions: async_sessionmaker[AsyncSession], now: datetime | None = None) -> dict[str, tuple[int, float]]:
    """Set the gauges from the database; returns {state: (count, oldest age in seconds)}."""
    views = orm.views
    now = now or datetime.now(UTC)
    async with sessions() as session:
        rows = (await session.execute(
            select(views.c.state, func.count(), func.min(views.c.updated_at))
            .where(views.c.state.in_(OPEN_STATES)).group_by(views.c.state)
        )).all()
    found: dict[str, tuple[int, float]] = {}
    for state, count, oldest in rows:
        found[state] = (count, max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    for state in OPEN_STATES:
        count, age = found.get(state, (0, 0.0))
        metrics.REQUESTS_OPEN.labels(state).set(count)
        metrics.OLDEST_OPEN_SECONDS.labels(state).set(age)
    return found


async def request_counts(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """For `/inflight`: the requests that move on only through the broker (received, in progress) and
    those finished (what a draining `cancelflow up` reports)."""
    views = orm.views
    async with sessions() as session:
        rows = (await session.execute(select(views.c.state, func.count()).group_by(views.c.state))).all()
    counts: dict[str, int] = dict(rows)
    return {"open_requests": sum(counts.get(s, 0) for s in STUCK_STATES),
            "finished_requests": sum(counts.get(s.value, 0) for s in TERMINAL_STATES)}


def refresher(sessions: async_sessionmaker[AsyncSession], interval_s: float = 15.0) -> Callable[[], Coroutine[Any, Any, None]]:
    """A runtime task that keeps the gauges fresh until cancelled."""

    async def open_request_gauges() -> None:
        # The database may be away; /readyz says so, and the next round tries again.
        await repeat(lambda: refresh(sessions), every_s=interval_s, failed="open-request gauges not refreshed")

    return open_request_gauges
