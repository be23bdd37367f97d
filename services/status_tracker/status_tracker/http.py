"""HTTP on STATUS_HTTP_PORT: the read API, the live feed and the support dashboard.

- `GET /requests`: filters `state`, `account_id`, `subscription_id`, `error_source` (`state` and
  `error_source` take comma-separated alternatives), paged by `limit` (<= 500) and `offset`;
- `GET /requests/{request_id}`: the full status with its history, emails and errors (404 if unknown);
- `GET /events`: server-sent events, one `status` event per record on `cancellations.status`;
- `GET /` and `GET /ui/requests/{request_id}`: the dashboard (pages/ and static/, no build step);
- `GET /ui/subscriptions/{subscription_id}` and `GET /subscriptions/{subscription_id}`: a subscription as
  the services that own it see it (billing, provisioning, payment-gateway), and its requests;
- operators (CONTRACT.md section 11): `POST /session` (sign in: sets the session cookie), `GET /session`,
  `POST /requests/{id}/approve|decline|retry|resolve`, `POST /cancellations`, `GET /audit`.

With CANCELFLOW_OPERATORS set, everything but /healthz, /readyz, /inflight and /metrics needs a signed-in operator
(`operators.py`); a browser without one gets the sign-in page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import select

from cancelflow.service import json_response
from status_tracker import orm
from status_tracker.actions import Actions, allowed_actions
from status_tracker.feed import StatusFeed
from status_tracker.operators import COOKIE, OPEN_PATHS, OPERATOR_KEY, Operators, operator_of
from status_tracker.projection import MAX_PAGE, Query, ReadModel
from status_tracker.subscriptions import SubscriptionViews

STATIC = Path(__file__).parent / "static"
PAGES = Path(__file__).parent / "pages"  # the dashboard's pages: one frame (_page.html) around each
HEARTBEAT_S = 15.0
ACTIONS = ("approve", "decline", "retry", "resolve")


def install(app: web.Application, read_model: ReadModel, feed: StatusFeed, *, operators: Operators,
            actions: Actions, sessions, subscriptions: SubscriptionViews | None = None) -> None:
    app.middlewares.append(_signed_in(operators))
    api = _Api(read_model, feed, actions, sessions)
    if subscriptions is not None:
        app.router.add_get("/subscriptions/{subscription_id}", _subscription(subscriptions))
    app.router.add_get("/requests", api.listing)
    app.router.add_get("/requests/{request_id}", api.one)
    app.router.add_get("/events", api.events)
    app.router.add_get("/session", _session_info)
    app.router.add_post("/session", _sign_in)
    app.router.add_delete("/session", _sign_out)
    for action in ACTIONS:
        app.router.add_post(f"/requests/{{request_id}}/{action}", api.action(action))
    app.router.add_post("/cancellations", api.on_behalf)
    app.router.add_get("/audit", api.audit)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/ui/requests/{request_id}", _page("request.html"))
    app.router.add_get("/ui/subscriptions/{subscription_id}", _page("subscription.html"))
    app.router.add_static("/static/", STATIC, append_version=False)


def _signed_in(operators: Operators):
    @web.middleware
    async def middleware(request: web.Request, handler):
        if not operators.enabled or request.path in OPEN_PATHS:
            return await handler(request)
        operator = operators.from_request(request)
        if operator is None:
            if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
                # A browser: the sign-in page, which asks for the token and comes back here.
                return web.FileResponse(STATIC / "signin.html", status=401,
                                        headers={"Cache-Control": "no-store"})
            return web.json_response({"error": "sign in: Authorization: Bearer <token>"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="cancelflow"'})
        request[OPERATOR_KEY] = operator
        return await handler(request)

    return middleware


def _subscription(views: SubscriptionViews):
    async def subscription(request: web.Request) -> web.Response:
        return json_response(await views.view(request.match_info["subscription_id"]))

    return subscription


async def _session_info(request: web.Request) -> web.Response:
    operator = operator_of(request)
    return json_response({"name": operator.name, "role": operator.role.value, "may_act": operator.may_act})


async def _sign_in(request: web.Request) -> web.Response:
    """The token came in the Authorization header (the middleware checked it): a cookie for the browser
    session, so page loads and the live feed (EventSource cannot send headers) are signed in too."""
    operator = operator_of(request)
    response = json_response({"name": operator.name, "role": operator.role.value, "may_act": operator.may_act})
    if operator.token:
        secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
        response.set_cookie(COOKIE, operator.token, httponly=True, samesite="Strict", path="/", secure=secure)
    return response


async def _sign_out(_request: web.Request) -> web.Response:
    response = json_response({"signed_out": True})
    response.del_cookie(COOKIE, path="/")
    return response


_pages = Environment(loader=FileSystemLoader(PAGES), autoescape=True, undefined=StrictUndefined,
                     trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    body = _pages.get_template(name).render().encode()  # no per-request data: rendered once

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    return page


async def _body(request: web.Request) -> object:
    """The JSON body, or a marker the action refuses with 400 (an empty body is an empty object)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not JSON"


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


AUDIT_LIMIT = 200


class _Api:
    def __init__(self, read_model: ReadModel, feed: StatusFeed, actions: Actions, sessions) -> None:
        self._read_model = read_model
        self._feed = feed
        self._actions = actions
        self._sessions = sessions

    async def one(self, request: web.Request) -> web.Response:
        document = await self._read_model.get(request.match_info["request_id"])
        if document is None:
            return json_response({"error": "unknown request_id"}, 404)
        return json_response({**document, "actions": allowed_actions(document)})

    def action(self, action: str):
        async def act(request: web.Request) -> web.Response:
            answer = await self._actions.on_request(operator_of(request), action, request.match_info["request_id"],
                                                    await _body(request))
            return json_response(answer.body, answer.status)

        return act

    async def on_behalf(self, request: web.Request) -> web.Response:
        answer = await self._actions.on_behalf(operator_of(request), await _body(request))
        return json_response(answer.body, answer.status)

    async def audit(self, request: web.Request) -> web.Response:
        """The audit trail, newest first (`request_id` narrows it to one request)."""
        audit = orm.audit
        query = select(audit).order_by(audit.c.id.desc()).limit(_number(request, "limit", 50, AUDIT_LIMIT))
        if request_id := request.query.get("request_id"):
            query = query.where((audit.c.request_id == request_id) | (audit.c.new_request_id == request_id))
        async with self._sessions() as session:
            rows = (await session.execute(query)).mappings().all()
        items = [{**{k: v for k, v in row.items() if k != "at"}, "at": row["at"].isoformat()} for row in rows]
        return json_response({"items": items})

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
