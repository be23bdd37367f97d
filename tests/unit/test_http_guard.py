"""Exposure (issue 24, item 7): a web page cannot drive the test hooks with a cross-origin POST, nor read
the status API under a foreign Host (DNS rebinding); billing's clock takes only a sane offset. On the
real apps: billing's (hooks on), the gateway sandbox's, and a bare app for the rules."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cancelflow.http_guard import allowed_hosts, guard
from cancelflow_tools.sandboxes.gateway import build_gateway_app

EVIL = "http://evil.example"
TEXT = {"Content-Type": "text/plain"}  # what a page's form or fetch() sends without a CORS preflight


async def _ok(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def _app(configured: str | None = None, bind: str = "127.0.0.1") -> web.Application:
    app = web.Application(middlewares=[guard(allowed_hosts(bind, configured))])
    app.router.add_post("/_hook", _ok)
    app.router.add_get("/requests", _ok)
    app.router.add_get("/metrics", _ok)
    return app


@pytest.fixture
async def plain() -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(_app(), host="127.0.0.1")) as client:
        yield client


async def _status(client: TestClient, method: str, path: str, **headers: str) -> int:
    async with client.request(method, path, data="{}", headers=headers) as response:
        return response.status


async def test_a_foreign_origin_cannot_post(plain: TestClient) -> None:
    own = f"http://127.0.0.1:{plain.port}"
    assert await _status(plain, "POST", "/_hook") == 200  # the CLI and tests send no Origin
    assert await _status(plain, "POST", "/_hook", Origin=own, **TEXT) == 200  # our own dashboard
    for origin in (EVIL, "null", "http://127.0.0.1:1", f"http://evil.example:{plain.port}", "file://"):
        assert await _status(plain, "POST", "/_hook", Origin=origin, **TEXT) == 403, origin
    assert await _status(plain, "GET", "/requests", Origin=EVIL) == 200  # a page cannot read it (no CORS)


async def test_only_allowed_host_names_are_answered(plain: TestClient) -> None:
    for host in (f"127.0.0.1:{plain.port}", f"localhost:{plain.port}", "LOCALHOST", "[::1]:80"):
        assert await _status(plain, "GET", "/requests", Host=host) == 200, host
    for host in ("evil.example", f"evil.example:{plain.port}", "127.0.0.1.evil.example", ""):
        assert await _status(plain, "GET", "/requests", Host=host) == 403, host
    # Probes and Prometheus address a service by its name or pod IP.
    assert await _status(plain, "GET", "/metrics", Host="billing:8081") == 200


async def test_configured_hosts_and_any_host() -> None:
    async with TestClient(TestServer(_app("status.example.com", bind="0.0.0.0"), host="127.0.0.1")) as client:
        assert await _status(client, "GET", "/requests", Host="status.example.com") == 200
        assert await _status(client, "GET", "/requests", Host="0.0.0.0") == 403
        assert await _status(client, "POST", "/_hook", Host="status.example.com",
                             Origin="http://status.example.com") == 200
    async with TestClient(TestServer(_app("*"), host="127.0.0.1")) as client:
        assert await _status(client, "GET", "/requests", Host="anything.example") == 200
        # Any host, yet a POST with an Origin must come from a page this host served.
        assert await _status(client, "POST", "/_hook", Host="a.example", Origin="http://a.example") == 200
        assert await _status(client, "POST", "/_hook", Host="a.example", Origin=EVIL) == 403


@pytest.fixture
async def billing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> AsyncIterator[TestClient]:  # type: ignore[no-untyped-def]
    from billing.bootstrap import build

    monkeypatch.setenv("CANCELFLOW_ENABLE_FAULT_HOOKS", "1")
    monkeypatch.setenv("CANCELFLOW_DATA_DIR", str(tmp_path))
    runtime = build()
    await runtime.prepare_schema()
    async with TestClient(TestServer(runtime.http, host="127.0.0.1")) as client:
        yield client
    await runtime.producer.client.close()
    await runtime.engine.dispose()


async def test_billing_hooks_refuse_a_page_elsewhere(billing: TestClient) -> None:
    for path, body in (("/_clock", '{"offset_days": 30}'), ("/_faults", '{"subscription_id": "s"}')):
        async with billing.post(path, data=body, headers={"Origin": EVIL, **TEXT}) as response:
            assert response.status == 403, path
            assert (await response.json())["error"] == "origin_not_allowed"
    async with billing.get("/subscriptions/s", headers={"Host": "rebound.evil.example"}) as response:
        assert response.status == 403


async def test_the_clock_takes_only_a_sane_offset(billing: TestClient) -> None:
    for offset in (3_000_000, -3_000_000, 3651, "30", 1.5, True):
        async with billing.post("/_clock", json={"offset_days": offset}) as response:
            assert response.status == 400, offset
            assert "between -3650 and 3650" in (await response.json())["error"]
    async with billing.post("/_clock", data="not json") as response:
        assert response.status == 400
    async with billing.post("/_clock", json={"offset_days": 3650}) as response:
        assert response.status == 200  # ten years on still works, and the clock still answers after
    async with billing.post("/_clock", json={"offset_days": 0}) as response:
        assert response.status == 200 and (await response.json())["offset_days"] == 0


async def test_sandbox_rules_refuse_a_page_elsewhere() -> None:
    async with TestClient(TestServer(build_gateway_app(), host="127.0.0.1")) as client:
        rule = '{"match": {"subscription_id": "s"}, "respond": {"status": 500, "error": "x"}}'
        async with client.post("/_sandbox/rules", data=rule, headers={"Origin": EVIL, **TEXT}) as response:
            assert response.status == 403
        async with client.get("/_sandbox/rules") as response:
            assert await response.json() in ([], {"rules": []})
        # Services reach the sandbox by its container name, with no Origin.
        async with client.post("/_sandbox/rules", data=rule, headers={"Host": "gateway-sandbox:8091"}) as response:
            assert response.status == 201
