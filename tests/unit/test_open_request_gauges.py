"""status_tracker.gauges: open requests per state and the age of the oldest, for the stuck alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import insert

from cancelflow import db
from status_tracker import gauges, orm


def gauge(name: str, state: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"state": state})


async def test_refresh_counts_open_requests_and_ages_the_oldest(store: Any) -> None:
    engine = db.make_engine(store("status"))
    sessions = db.session_factory(engine)
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    try:
        await db.create_schema(engine, orm.metadata)
        rows = [("r1", "in_progress", 30), ("r2", "in_progress", 1200), ("r3", "completed", 9999),
                ("r4", "pending_approval", 60)]
        async with engine.begin() as conn:
            for request_id, state, age in rows:
                at = now - timedelta(seconds=age)
                await conn.execute(insert(orm.views).values(
                    request_id=request_id, state=state, version=1, view={}, created_at=at, updated_at=at))
        found = await gauges.refresh(sessions, now=now)
    finally:
        await engine.dispose()

    assert found == {"in_progress": (2, 1200.0), "pending_approval": (1, 60.0)}
    assert gauge("cancelflow_requests_open", "in_progress") == 2
    assert gauge("cancelflow_request_oldest_open_seconds", "in_progress") == 1200
    # States with nothing open read 0 (not a stale value); terminal states are not reported.
    assert gauge("cancelflow_requests_open", "received") == 0
    assert gauge("cancelflow_request_oldest_open_seconds", "scheduled") == 0
    assert gauge("cancelflow_requests_open", "completed") is None
