"""The operators' API of the status service (CONTRACT.md section 11) over real HTTP, on SQLite and
PostgreSQL: sign-in (401, 403, the session cookie), every action in every state (202 with the events in
the outbox, 400, 404, 409), one resolution per request, and the audit trail of everything tried."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from cancelflow import db, topics
from cancelflow.messaging.uow import UnitOfWork
from status_tracker import fold, http, orm, tracking
from status_tracker.actions import Actions
from status_tracker.operators import Operators, parse_operators
from status_tracker.projection import ReadModel

ALICE = "alice-token-0123456789"
VERA = "vera-token-0123456789"
OPERATORS = f"alice:operator:{ALICE},vera:viewer:{VERA}"
AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class Api:
    def __init__(self, client: TestClient, read_model: ReadModel, sessions: Any) -> None:
        self.client = client
        self.read_model = read_model
        self.sessions = sessions

    async def call(self, method: str, path: str, token: str | None = ALICE, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = orjson.dumps(body) if body is not None else None
        async with self.client.request(method, path, headers=headers, data=data) as response:
            text = await response.text()
            return response.status, (orjson.loads(text) if text and response.content_type == "application/json"
                                     else text)

    async def seed(self, state: str, **view: Any) -> str:
        """A request the tracker folded to `state` (the view's other fields as given)."""
        request_id = str(uuid.uuid4())
        entry = tracking.new_entry(request_id, AT)
        entry["view"] = {**fold.empty_view(request_id), "account_id": "acct-1", "target": "subscription",
                         "subscription_id": f"sub-{request_id[:8]}", "mode": "immediate", "state": state,
                         "history": [{"at": AT.isoformat(), "message": "requested"}], **view}
        entry["version"] = 1
        entry["request"] = {"quantity": 2, "effective_date": None, "reason": "too expensive",
                            "opt_out_of_emails": True, "charge_ids": []}
        await self.read_model.save(tracking.document(entry), entry)
        return request_id

    async def outbox(self) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            rows = (await session.execute(select(orm.messaging.outbox).order_by(orm.messaging.outbox.c.id))).mappings()
            return [{"topic": r["topic"], "key": r["key"], "headers": r["headers"], **orjson.loads(r["value"])}
                    for r in rows]


@pytest.fixture
async def api(store) -> AsyncIterator[Api]:  # type: ignore[no-untyped-def]
    engine = db.make_engine(store("status_tracker"))
    await db.create_schema(engine, orm.metadata)
    sessions, transactions = db.session_factory(engine), db.transactions(engine)
    read_model = ReadModel(engine, sessions)

    def new_uow() -> UnitOfWork:
        return UnitOfWork(transactions, orm.messaging, producer="status_tracker")

    app = web.Application()
    http.install(app, read_model, None, operators=Operators(parse_operators(OPERATORS)),  # type: ignore[arg-type]
                 actions=Actions(new_uow), sessions=sessions)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, read_model, sessions)
    await engine.dispose()


FAILED_VENDOR = {"state": "failed", "stage": "vendor",
                 "error": {"source": "vendor", "code": "vendor_rejected", "message": "locked"}}
FAILED_PLATFORM = {"state": "failed", "stage": "platform",
                   "error": {"source": "platform", "code": "platform_commit_failed", "message": "boom"}}
REFUND_REFUSED = {"state": "manual_review", "stage": "payment",
                  "error": {"source": "payment", "code": "refund_failed", "message": "refused"},
                  "refund": {"amount": "10.00", "currency": "USD", "status": "failed"}}
RENEW_REFUSED = {"state": "manual_review", "stage": "payment",
                 "error": {"source": "payment", "code": "auto_renew_stop_failed", "message": "refused"}}
REJECTED = {"state": "rejected", "stage": "validation",
            "error": {"source": "validation", "code": "not_active", "message": "no"}}
FAILED_VALIDATION_LIKE = {"state": "failed", "stage": "notification",
                          "error": {"source": "notification", "code": "x", "message": "y"}}


# --- sign-in ---------------------------------------------------------------------------------------


async def test_every_route_but_health_and_metrics_needs_a_valid_token(api: Api) -> None:
    rid = await api.seed("completed")
    for path in ("/requests", f"/requests/{rid}", "/audit", "/session", "/", f"/ui/requests/{rid}",
                 "/static/dashboard.js"):
        status, body = await api.call("GET", path, token=None)
        assert status == 401, path
        status, _ = await api.call("GET", path, token="alice-token-0123456788")  # one character off
        assert status == 401, path
    for path in (f"/requests/{rid}/approve", "/cancellations"):
        assert (await api.call("POST", path, token=None, body={}))[0] == 401
    assert (await api.call("GET", "/healthz", token=None))[0] == 404  # not installed here, but not 401
    status, body = await api.call("GET", f"/requests/{rid}", token=VERA)
    assert status == 200 and body["request_id"] == rid


async def test_a_browser_without_a_session_gets_the_sign_in_page(api: Api) -> None:
    async with api.client.get("/", headers={"Accept": "text/html"}) as response:
        assert response.status == 401
        assert "Operator token" in await response.text()


@pytest.mark.parametrize(("path", "page", "title", "own_element", "live", "crumbs"), [
    ("/", "list", "Cancellation requests", 'id="rows"', True, False),
    ("/ui/requests/r-1", "request", "Request", 'id="request-id"', True, True),
    ("/ui/subscriptions/s-1", "subscription", "Subscription", 'id="sub-details"', False, True),
])
async def test_each_dashboard_page_is_served_whole_in_the_shared_frame(
        api: Api, path: str, page: str, title: str, own_element: str, live: bool, crumbs: bool) -> None:
    async with api.client.get(path, headers={"Authorization": f"Bearer {VERA}"}) as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-cache"
        html = await response.text()
    assert html.startswith("<!doctype html>\n") and html.endswith("</body>\n</html>\n")
    assert f"<title>{title} · cancelflow support</title>" in html and f'<body data-page="{page}">' in html
    assert own_element in html and html.count('<main id="main" tabindex="-1">') == 1
    assert ('id="connection"' in html) is live and ('class="crumbs"' in html) is crumbs
    assert html.index("</header>") < html.index(own_element) < html.index('<script src="/static/dashboard.js"')


async def test_signing_in_sets_a_session_cookie_good_for_reads_only(api: Api) -> None:
    async with api.client.post("/session", headers={"Authorization": f"Bearer {ALICE}"}) as response:
        assert response.status == 200
        assert (await response.json())["name"] == "alice"
        cookie = response.cookies["cf_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
    rid = await api.seed("pending_approval")
    # The client keeps the cookie: reads work without the header, actions do not (no cross-site acting).
    async with api.client.get(f"/requests/{rid}") as response:
        assert response.status == 200
    async with api.client.post(f"/requests/{rid}/approve", data=b"{}") as response:
        assert response.status == 401
    assert await api.outbox() == []


async def test_a_viewer_reads_but_every_action_is_forbidden_and_audited(api: Api) -> None:
    rid = await api.seed("pending_approval")
    for action, body in (("approve", {}), ("decline", {}), ("retry", {}), ("resolve", {"action": "close"})):
        status, answer = await api.call("POST", f"/requests/{rid}/{action}", token=VERA, body=body)
        assert status == 403, action
        assert "viewer" in answer["error"]
    status, _ = await api.call("POST", "/cancellations", token=VERA,
                               body={"account_id": "a", "subscription_id": "s", "reason": "asked"})
    assert status == 403
    assert await api.outbox() == []
    _, audit = await api.call("GET", "/audit")
    assert [(a["operator"], a["status"]) for a in audit["items"]] == [("vera", 403)] * 5


# --- actions in every state ----------------------------------------------------------------------

STATES: dict[str, dict[str, Any]] = {
    "received": {"state": "received"}, "pending_approval": {"state": "pending_approval"},
    "in_progress": {"state": "in_progress", "stage": "vendor"}, "scheduled": {"state": "scheduled"},
    "completed": {"state": "completed"}, "failed_vendor": FAILED_VENDOR, "failed_platform": FAILED_PLATFORM,
    "rejected": REJECTED, "declined": {"state": "declined"}, "refund_refused": REFUND_REFUSED,
    "renew_refused": RENEW_REFUSED,
}
ALLOWED = {
    "approve": {"pending_approval"}, "decline": {"pending_approval"},
    "retry": {"failed_vendor", "failed_platform"},
    "retry_refund": {"refund_refused"}, "close": {"refund_refused", "renew_refused"},
}


@pytest.mark.parametrize("action", sorted(ALLOWED))
async def test_each_action_is_accepted_only_in_its_states(api: Api, action: str) -> None:
    path, body = (("resolve", {"action": action, "note": "n"}) if action in ("retry_refund", "close")
                  else (action, {"note": "n"}))
    for name, view in STATES.items():
        rid = await api.seed(**view)
        status, answer = await api.call("POST", f"/requests/{rid}/{path}", body=body)
        expected = 202 if name in ALLOWED[action] else 409
        assert status == expected, (action, name, answer)
        document = (await api.call("GET", f"/requests/{rid}"))[1]
        assert (action in document["actions"]) == (expected == 202 or name in ALLOWED[action])


async def test_approve_and_decline_send_the_decision_upstream(api: Api) -> None:
    approve, decline = await api.seed("pending_approval"), await api.seed("pending_approval")
    assert (await api.call("POST", f"/requests/{approve}/approve", body={"note": "checked"}))[0] == 202
    status, answer = await api.call("POST", f"/requests/{decline}/decline", body={"note": "fraud"})
    assert status == 202 and answer["request_id"] == decline
    sent = await api.outbox()
    decisions = [(r["event_type"], r["payload"]["request_id"], r["payload"]["decided_by"], r["payload"]["note"])
                 for r in sent if r["topic"] == topics.REQUESTED]
    assert decisions == [("CancellationApproved", approve, "alice", "checked"),
                         ("CancellationDeclined", decline, "alice", "fraud")]
    acted = [r for r in sent if r["event_type"] == "OperatorActed"]
    assert [(a["payload"]["request_id"], a["payload"]["action"]) for a in acted] == [(approve, "approve")]
    # A second decision on the same request: 409, nothing more sent.
    assert (await api.call("POST", f"/requests/{approve}/decline", body={}))[0] == 409
    assert len(await api.outbox()) == len(sent)


async def test_retry_is_a_new_request_for_the_same_target_and_options(api: Api) -> None:
    rid = await api.seed(**FAILED_PLATFORM, mode="past_dated", effective_date="2026-11-28")
    status, answer = await api.call("POST", f"/requests/{rid}/retry", body={"note": "platform is back"})
    assert status == 202 and answer["retry_of"] == rid
    new_id = answer["request_id"]
    assert new_id != rid
    sent = await api.outbox()
    (request,) = [r for r in sent if r["event_type"] == "CancellationRequested"]
    payload = request["payload"]
    assert request["topic"] == topics.REQUESTED and request["key"] == payload["subscription_id"]
    assert payload["request_id"] == new_id and payload["retry_of"] == rid
    assert payload["requested_by"] == {"user_id": "alice", "role": "operator", "channel": "bss"}
    assert payload["mode"] == "past_dated" and payload["quantity"] == 2 and payload["opt_out_of_emails"] is True
    (acted,) = [r for r in sent if r["event_type"] == "OperatorActed"]
    assert acted["payload"]["new_request_id"] == new_id and acted["key"] == rid
    # One resolution per finished request: the same click again gets 409 and no second retry.
    status, answer = await api.call("POST", f"/requests/{rid}/retry", body={})
    assert status == 409 and "already retry by alice" in answer["error"]
    assert len(await api.outbox()) == len(sent)


async def test_operators_clicking_together_retry_once(api: Api) -> None:
    import asyncio

    rid = await api.seed(**FAILED_VENDOR)
    answers = await asyncio.gather(*[api.call("POST", f"/requests/{rid}/retry", body={"note": str(n)})
                                     for n in range(6)])
    assert sorted(status for status, _ in answers) == [202] + [409] * 5
    assert len([r for r in await api.outbox() if r["event_type"] == "CancellationRequested"]) == 1
    _, audit = await api.call("GET", f"/audit?request_id={rid}")
    assert sorted(a["status"] for a in audit["items"]) == [202] + [409] * 5


async def test_retry_refund_starts_a_refund_request_of_its_own(api: Api) -> None:
    rid = await api.seed(**REFUND_REFUSED)
    status, answer = await api.call("POST", f"/requests/{rid}/resolve", body={"action": "retry_refund"})
    assert status == 202
    (retry,) = [r for r in await api.outbox() if r["event_type"] == "RefundRetryRequested"]
    assert retry["topic"] == topics.SAGA and retry["payload"]["request_id"] == answer["request_id"]
    assert retry["payload"]["retry_of"] == rid
    status, _ = await api.call("POST", f"/requests/{rid}/resolve", body={"action": "close"})
    assert status == 409


async def test_bad_bodies_and_unknown_requests(api: Api) -> None:
    rid = await api.seed("pending_approval")
    assert (await api.call("POST", f"/requests/{rid}/approve", body={"note": 3}))[0] == 400
    assert (await api.call("POST", f"/requests/{rid}/approve", body={"nope": 1}))[0] == 400
    assert (await api.call("POST", f"/requests/{rid}/resolve", body={"action": "refund_twice"}))[0] == 400
    async with api.client.post(f"/requests/{rid}/approve", data=b"{not json",
                               headers={"Authorization": f"Bearer {ALICE}"}) as response:
        assert response.status == 400
    assert (await api.call("POST", f"/requests/{uuid.uuid4()}/approve", body={}))[0] == 404
    assert (await api.call("POST", "/requests/not-a-uuid/retry", body={}))[0] == 404
    assert (await api.call("POST", f"/requests/{'x' * 300}/retry", body={}))[0] == 404  # audited, cut short
    assert await api.outbox() == []


async def test_cancel_on_a_customers_behalf(api: Api) -> None:
    body = {"account_id": "acct-9", "subscription_id": "sub-9", "mode": "past_dated",
            "effective_date": "2026-12-01", "quantity": 3, "reason": "customer called", "opt_out_of_emails": True}
    status, answer = await api.call("POST", "/cancellations", body=body)
    assert status == 202
    (request,) = await api.outbox()
    payload = request["payload"]
    assert payload["request_id"] == answer["request_id"] and request["key"] == "sub-9"
    assert payload["requested_by"] == {"user_id": "alice", "role": "operator", "channel": "bss"}
    assert {k: payload[k] for k in body} == body
    for bad in ({**body, "reason": " "}, {k: v for k, v in body.items() if k != "reason"},
                {**body, "subscription_id": None}, {**body, "mode": "someday"}, {**body, "request_id": "x"}):
        assert (await api.call("POST", "/cancellations", body=bad))[0] == 400, bad
    assert len(await api.outbox()) == 1


async def test_the_audit_trail_keeps_everything_tried(api: Api) -> None:
    rid = await api.seed(**FAILED_VENDOR)
    await api.call("POST", f"/requests/{rid}/approve", body={"note": "wrong button"})
    _, answer = await api.call("POST", f"/requests/{rid}/retry", body={"note": "vendor fixed"})
    await api.call("POST", f"/requests/{rid}/retry", token=VERA, body={})
    _, audit = await api.call("GET", f"/audit?request_id={rid}")
    rows = [(a["operator"], a["action"], a["status"], a["note"]) for a in reversed(audit["items"])]
    assert rows == [("alice", "approve", 409, "wrong button"), ("alice", "retry", 202, "vendor fixed"),
                    ("vera", "retry", 403, None)]
    assert audit["items"][1]["new_request_id"] == answer["request_id"]
    assert all(datetime.fromisoformat(a["at"]) for a in audit["items"])
    assert (await api.call("GET", "/audit", token=None))[0] == 401


async def test_an_open_service_lets_anyone_act_as_anonymous(store) -> None:  # type: ignore[no-untyped-def]
    """Without CANCELFLOW_OPERATORS (the read API's tests, a stack started before this feature)."""
    engine = db.make_engine(store("status_tracker"))
    await db.create_schema(engine, orm.metadata)
    sessions = db.session_factory(engine)
    app = web.Application()
    http.install(app, ReadModel(engine, sessions), None, operators=Operators([]),  # type: ignore[arg-type]
                 actions=Actions(lambda: UnitOfWork(db.transactions(engine), orm.messaging, producer="t")),
                 sessions=sessions)
    async with TestClient(TestServer(app)) as client:
        async with client.get("/requests") as response:
            assert response.status == 200
        async with client.post("/cancellations", data=orjson.dumps({"account_id": "a", "subscription_id": "s",
                                                                      "reason": "r"})) as response:
            assert response.status == 202
    await engine.dispose()


def test_a_malformed_operator_list_stops_the_start_without_showing_a_token() -> None:
    for bad in ("alice:operator", "alice:admin:" + "t" * 20, "alice:operator:short", f"a:operator:{ALICE},a:viewer:{VERA}"):
        with pytest.raises(ValueError) as raised:
            parse_operators(bad)
        assert ALICE not in str(raised.value) and "t" * 20 not in str(raised.value)
    assert ALICE not in repr(parse_operators(OPERATORS))
