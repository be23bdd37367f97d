"""HTTP on STATUS_HTTP_PORT: the read API, the live feed and the support dashboard.

- `GET /requests`: filters `state`, `account_id`, `subscription_id`, `error_source` (`state` and
  `error_source` take comma-separated alternatives), paged by `limit` (<= 500) and `offset`;
- `GET /requests/{request_id}`: the full status with its history, emails and errors (404 if unknown);
- `GET /events`: server-sent events, one `status` event per record on `cancellations.status`;
- `GET /` and `GET /ui/requests/{request_id}`: the dashboard (static files, no build step).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiohttp import web

from cancelflow.service import json_response
from status_tracker.feed import StatusFeed
from status_tracker.projection import MAX_PAGE, Query, ReadModel

STATIC = Path(__file__).parent / "static"
HEARTBEAT_S = 15.0


def install(app: web.Application, read_model: ReadModel, feed: StatusFeed) -> None:
    api = _Api(read_model, feed)
    app.router.add_get("/requests", api.listing)
    app.router.add_get("/requests/{request_id}", api.one)
    app.router.add_get("/events", api.events)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/ui/requests/{request_id}", _page("request.html"))
    app.router.add_static("/static/", STATIC, append_version=False)


def _page(name: str):  # type: ignore[no-untyped-def]
    async def page(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return page


def _alternatives(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _number(request: web.Request, name: str, default: int, high: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if not 0 <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {high}")
    return value


class _Api:
    def __init__(self, read_model: ReadModel, feed: StatusFeed) -> None:
        self._read_model = read_model
        self._feed = feed

    async def one(self, request: web.Request) -> web.Response:
        document = await self._read_model.get(request.match_info["request_id"])
        if document is None:
            return json_response({"error": "unknown request_id"}, 404)
        return json_response(document)

    async def listing(self, request: web.Request) -> web.Response:
        query = Query(
            states=_alternatives(request.query.get("state")),
            account_id=request.query.get("account_id") or None,
            subscription_id=request.query.get("subscription_id") or None,
            error_sources=_alternatives(request.query.get("error_source")),
            limit=max(1, _number(request, "limit", 50, MAX_PAGE)),
            offset=_number(request, "offset", 0, 10**9),
        )
        items, total = await self._read_model.search(query)
        return json_response({"items": items, "total": total, "limit": query.limit, "offset": query.offset})

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue = await self._feed.subscribe()
        try:
            await response.write(b"retry: 2000\n: connected\n\n")
            while True:
                try:
                    status = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if status is None:  # the service stops, or this client fell too far behind
                    break
                data = orjson.dumps(status)
                await response.write(b"event: status\nid: " + status["event_id"].encode() + b"\ndata: " + data + b"\n\n")
        except ConnectionResetError:
            pass  # the dashboard went away
        finally:
            self._feed.unsubscribe(queue)
        return response
