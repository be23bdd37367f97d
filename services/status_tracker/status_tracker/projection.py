"""The read model in the tracker's database: one row per request, written with every change in the same
transaction as the status record (outbox) and the processed event (inbox)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cancelflow import sql
from cancelflow.sql import Db
from status_tracker import orm
from status_tracker.tracking import STUCK_STATES

views = orm.views
MAX_PAGE = 500


@dataclass(frozen=True)
class Query:
    """GET /requests filters; each list holds alternatives (`state=failed,manual_review`)."""

    states: list[str] = field(default_factory=list)
    account_id: str | None = None
    subscription_id: str | None = None
    error_sources: list[str] = field(default_factory=list)
    limit: int = 50
    offset: int = 0


ENTRY_KEY = "_entry"


def _public(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != ENTRY_KEY}


_UPDATED = ("state", "account_id", "subscription_id", "error_source", "version", "view", "updated_at")


def _upsert(dialect: Any) -> sql.Query:
    """Store a request's row: an older version never overwrites a newer one, and writing the same
    version again changes nothing. `on_conflict_do_update` is dialect-specific: one statement each."""
    statement = dialect.insert(views)
    return sql.Query(statement.on_conflict_do_update(
        index_elements=[views.c.request_id],
        set_={k: statement.excluded[k] for k in _UPDATED},
        where=views.c.version <= statement.excluded.version,
    ))


UPSERT = {"postgresql": _upsert(postgresql), "sqlite": _upsert(sqlite)}
VIEW = sql.Query(select(views.c.view).where(views.c.request_id == bindparam("request_id")))


class ReadModel:
    def __init__(self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._upsert = UPSERT["postgresql" if engine.dialect.name == "postgresql" else "sqlite"]

    async def write(self, db: Db, document: dict[str, Any], entry: dict[str, Any] | None = None) -> None:
        """Store a request's document (and the tracker's whole `entry` beside it) in the caller's
        transaction; a late, older version is ignored."""
        error = document.get("error") or {}
        await db.run(self._upsert, **{
            "request_id": document["request_id"], "state": document["state"],
            "account_id": document.get("account_id"), "subscription_id": document.get("subscription_id"),
            "error_source": error.get("source"), "version": document["version"],
            "view": {**document, ENTRY_KEY: entry} if entry is not None else document,
            "created_at": datetime.fromisoformat(document["created_at"]),
            "updated_at": datetime.fromisoformat(document["updated_at"]),
        })

    async def save(self, document: dict[str, Any], entry: dict[str, Any] | None = None) -> None:
        async with self._sessions() as session:
            await self.write(Db(session), document, entry)
            await session.commit()

    @staticmethod
    async def _view_in(db: Db, request_id: str) -> dict[str, Any] | None:
        return await db.scalar(VIEW, request_id=request_id)

    @classmethod
    async def entry_in(cls, db: Db, request_id: str) -> dict[str, Any] | None:
        """The tracker's entry for a request, read in the caller's transaction (None before its first step)."""
        view = await cls._view_in(db, request_id)
        return view.get(ENTRY_KEY) if view else None

    async def stuck_candidates(self, before: datetime) -> list[dict[str, Any]]:
        """Entries of requests in a state that should move on by itself, unchanged since `before`."""
        query = select(views.c.view).where(views.c.state.in_(STUCK_STATES), views.c.updated_at <= before)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [row[0][ENTRY_KEY] for row in rows if row[0].get(ENTRY_KEY)]

    async def get(self, request_id: str) -> dict[str, Any] | None:
        async with self._sessions() as session:
            view = await self._view_in(Db(session), request_id)
        return _public(view) if view else None

    async def entry(self, request_id: str) -> dict[str, Any] | None:
        """The tracker's entry as last committed (None before the first step)."""
        async with self._sessions() as session:
            return await self.entry_in(Db(session), request_id)

    async def search(self, query: Query) -> tuple[list[dict[str, Any]], int]:
        """The matching documents, newest request first, and how many match in all."""
        where: list[ColumnElement[bool]] = []
        if query.states:
            where.append(views.c.state.in_(query.states))
        if query.account_id:
            where.append(views.c.account_id == query.account_id)
        if query.subscription_id:
            where.append(views.c.subscription_id == query.subscription_id)
        if query.error_sources:
            where.append(views.c.error_source.in_(query.error_sources))
        page = (select(views.c.view).where(*where)
                .order_by(views.c.created_at.desc(), views.c.request_id)
                .limit(min(max(query.limit, 1), MAX_PAGE)).offset(max(query.offset, 0)))
        async with self._sessions() as session:
            items = [_public(row[0]) for row in (await session.execute(page)).all()]
            total = (await session.execute(select(func.count()).select_from(views).where(*where))).scalar_one()
        return items, total
