"""Builds the status tracker: the saga fold and the read API on STATUS_HTTP_PORT."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime, json_response
from cancelflow.settings import service_settings
from status_tracker import fold, gauges, orm
from status_tracker.handlers import TrackerHandlers, load_view


def build() -> ServiceRuntime:
    settings = service_settings("status_tracker")
    runtime = ServiceRuntime("status_tracker", settings, orm.metadata, orm.messaging)
    handlers = TrackerHandlers()
    # The tracker owns dead-lettering on the internal topic (every service reads it; one reports).
    runtime.add_route(Route(topics.SAGA, {t: handlers.saga_event for t in fold.SAGA_EVENT_TYPES},
                            dead_letter=True))
    runtime.tasks.append(gauges.refresher(runtime.sessions))  # open requests on /metrics
    runtime.http.router.add_get("/requests", _list(runtime))
    runtime.http.router.add_get("/requests/{request_id}", _one(runtime))
    return runtime


def _status(row: dict) -> dict:
    return {**row["view"], "version": row["version"], "updated_at": row["updated_at"]}


def _one(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    async def one(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            row = await load_view(session, request.match_info["request_id"])
        if row is None:
            return json_response({"error": "unknown request_id"}, 404)
        return json_response(_status(row))

    return one


def _list(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    async def listing(request: web.Request) -> web.Response:
        query = select(orm.views).order_by(orm.views.c.created_at.desc())
        for field in ("state", "account_id", "subscription_id"):
            if value := request.query.get(field):
                query = query.where(getattr(orm.views.c, field) == value)
        limit = min(int(request.query.get("limit", "50")), 500)
        offset = int(request.query.get("offset", "0"))
        async with runtime.sessions() as session:
            rows = (await session.execute(query.limit(limit).offset(offset))).mappings().all()
        return json_response({"items": [_status(dict(r)) for r in rows], "limit": limit, "offset": offset})

    return listing
