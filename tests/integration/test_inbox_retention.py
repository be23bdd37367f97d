"""The inbox keeps the ids of processed events for a retention period, then they are pruned
(messaging/retention.py), on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import MetaData, func, insert, select, text

from cancelflow import db
from cancelflow.messaging.retention import InboxPruner
from cancelflow.messaging.store import messaging_tables
from cancelflow.service import ServiceRuntime
from cancelflow.settings import CommonSettings
from cancelflow.sql import Db
from cancelflow_tools.services import service_settings
from tests.conftest import DatabaseFactory, eventually, sqlite_left_by_an_older_release

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
# age in days -> how many inbox rows processed that long before NOW
AGES = {400: 3, 45: 7, 30.5: 2, 29.5: 2, 1: 4, 0: 1}


def pruned_total() -> float:
    return REGISTRY.get_sample_value("cancelflow_inbox_pruned_total") or 0.0


async def fill(engine: Any, tables: Any, now: datetime = NOW) -> None:
    rows = [{"message_id": f"{age}-{i}", "topic": "cancellations.saga", "partition": 0, "offset": i,
             "processed_at": now - timedelta(days=age)} for age, count in AGES.items() for i in range(count)]
    async with engine.begin() as conn:
        await conn.execute(insert(tables.inbox), rows)


async def ids_left(engine: Any, tables: Any) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.execute(select(tables.inbox.c.message_id))).scalars())


async def test_rows_older_than_the_retention_go_in_chunks_and_the_rest_stay(store: DatabaseFactory) -> None:
    tables = messaging_tables(metadata := MetaData())
    engine = db.make_engine(store("inbox"))
    try:
        await db.create_schema(engine, metadata)
        await fill(engine, tables)
        pruner = InboxPruner(db.transactions(engine), tables, retention_days=30, chunk=5)
        before = pruned_total()

        assert await pruner.prune(now=NOW) == 12  # 3 + 7 + 2, in three chunks of at most 5
        assert await ids_left(engine, tables) == {f"{age}-{i}" for age in (29.5, 1, 0) for i in range(AGES[age])}
        assert pruned_total() - before == 12
        assert await pruner.prune(now=NOW) == 0
        # a redelivered event processed within the retention is still known to the inbox
        async with db.transactions(engine)() as tx, tx.begin():
            assert await Db(tx).first(tables.inbox_has, message_id="29.5-0") is not None
    finally:
        await engine.dispose()


async def test_the_pruner_runs_at_start_and_again_after_a_failed_pass(tmp_path: Path) -> None:
    tables = messaging_tables(metadata := MetaData())
    engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'inbox.db'}")
    transactions = db.transactions(engine)
    calls = 0

    def flaky() -> Any:  # the database is away for the first pass
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database away")
        return transactions()

    try:
        await db.create_schema(engine, metadata)
        await fill(engine, tables, now=datetime.now(UTC))  # the pruner's own clock, not NOW
        pruner = InboxPruner(flaky, tables, retention_days=30, interval_s=0)
        task = asyncio.create_task(pruner.run())
        try:
            await eventually(lambda: pruner.passes >= 2, message="two passes")
            assert not task.done()  # the failed pass did not end the loop
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # the real clock: the rows of 30.5 days and older are gone, 29.5 days is kept
        assert await ids_left(engine, tables) == {f"{age}-{i}" for age in (29.5, 1, 0) for i in range(AGES[age])}
    finally:
        await engine.dispose()


async def test_an_existing_sqlite_inbox_gets_the_index_and_the_prune_uses_it(tmp_path: Path) -> None:
    async with sqlite_left_by_an_older_release(  # the inbox as releases before the index created it
        tmp_path / "old.db",
        "CREATE TABLE inbox (message_id VARCHAR(200) NOT NULL, topic VARCHAR(200) NOT NULL, "
        "partition INTEGER NOT NULL, \"offset\" BIGINT NOT NULL, processed_at DATETIME NOT NULL, "
        "PRIMARY KEY (message_id))",
        "INSERT INTO inbox VALUES ('e-1', 't', 0, 1, '2026-01-01 00:00:00.000000')",
    ) as engine:
        tables = messaging_tables(metadata := MetaData())
        await db.create_schema(engine, metadata)
        await db.create_schema(engine, metadata)  # a second start: nothing to add
        async with engine.begin() as conn:
            indexes = (await conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'inbox' AND sql IS NOT NULL"
            ))).scalars().all()
            assert indexes == ["ix_inbox_processed_at"]
            assert (await conn.execute(select(func.count()).select_from(tables.inbox))).scalar_one() == 1
            prune = tables.inbox_prune.plan(conn.dialect, ["before", "size"])
            values = tuple(prune.parameters({"before": NOW, "size": 10}))
            plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {prune.sql}", values)).all()
            assert any("ix_inbox_processed_at" in str(step) for step in plan), plan


async def test_every_service_prunes_unless_the_retention_is_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CANCELFLOW_DATA_DIR", str(tmp_path))
    settings = service_settings("dispute")
    assert settings.inbox_retention_days == 30
    tables = messaging_tables(metadata := MetaData())
    runtime = ServiceRuntime("dispute", settings, metadata, tables)
    assert runtime.inbox_pruner.run in runtime.tasks
    monkeypatch.setenv("CANCELFLOW_INBOX_RETENTION_DAYS", "0")
    runtime = ServiceRuntime("dispute", service_settings("dispute"), metadata, tables)
    assert runtime.inbox_pruner.run not in runtime.tasks
    monkeypatch.setenv("CANCELFLOW_INBOX_RETENTION_DAYS", "-1")
    with pytest.raises(ValidationError, match="CANCELFLOW_INBOX_RETENTION_DAYS"):
        CommonSettings()
