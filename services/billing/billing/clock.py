"""Billing's idea of today. Production reads the UTC date; tests and demos may move it forward
(the offset is stored in billing's database, so a restart keeps it)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing import orm
from cancelflow.sql import Db, Query

# How far tests and demos may move today, either way: ten years (a date past year 9999 cannot exist).
MAX_OFFSET_DAYS = 3650

OFFSET = Query(select(orm.clock.c.offset_days))
SET_OFFSET = Query(update(orm.clock))
ADD_OFFSET = Query(insert(orm.clock))


class Clock:
    def __init__(self, offset_days: int = 0) -> None:
        self.offset_days = offset_days

    def today(self) -> date:
        return datetime.now(UTC).date() + timedelta(days=self.offset_days)

    async def load(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            stored = await Db(session).scalar(OFFSET)
        if stored is not None:
            self.offset_days = stored

    async def set_offset(self, sessions: async_sessionmaker[AsyncSession], offset_days: int) -> None:
        async with sessions() as session, session.begin():
            db = Db(session)
            if not await db.run(SET_OFFSET, offset_days=offset_days):
                await db.run(ADD_OFFSET, id=1, offset_days=offset_days)
        self.offset_days = offset_days
