"""Billing's idea of today. Production reads the UTC date; tests and demos may move it forward
(the offset is stored in billing's database, so a restart keeps it)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing import orm


class Clock:
    def __init__(self, offset_days: int = 0) -> None:
        self.offset_days = offset_days

    def today(self) -> date:
        return datetime.now(UTC).date() + timedelta(days=self.offset_days)

    async def load(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            stored = (await session.execute(select(orm.clock.c.offset_days))).scalar()
        if stored is not None:
            self.offset_days = stored

    async def set_offset(self, sessions: async_sessionmaker[AsyncSession], offset_days: int) -> None:
        async with sessions() as session, session.begin():
            result = await session.execute(update(orm.clock).values(offset_days=offset_days))
            if not result.rowcount:
                await session.execute(insert(orm.clock).values(id=1, offset_days=offset_days))
        self.offset_days = offset_days
