"""A clean stop of the embedded stack drains the work in flight first (issue 24, item 4): bounded in
time, and reported on the console (requests open, finished, what is left)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from rich.console import Console

from cancelflow_tools.stack.broker import free_port
from cancelflow_tools.stack.drain import drain

pytestmark = pytest.mark.timeout(30)


class FakeService:
    """Answers /inflight from a script of answers (the last one repeats)."""

    def __init__(self, answers: list[dict[str, int]]) -> None:
        self.answers = answers
        self.asked = 0

    async def inflight(self, _request: web.Request) -> web.Response:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return web.json_response(answer)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[FakeService], asyncio.Future[str]]]:
    runners: list[web.AppRunner] = []

    async def start(service: FakeService) -> str:
        app = web.Application()
        app.router.add_get("/inflight", service.inflight)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=300, color_system=None), out


async def test_the_drain_waits_until_nothing_is_in_flight_and_says_what_finished(serve) -> None:  # type: ignore[no-untyped-def]
    billing = FakeService([{"unhandled": 40, "unpublished": 3}, {"unhandled": 2, "unpublished": 1},
                           {"unhandled": 0, "unpublished": 0}])
    tracker = FakeService([{"unhandled": 9, "unpublished": 2, "open_requests": 7, "finished_requests": 100},
                           {"unhandled": 0, "unpublished": 0, "open_requests": 0, "finished_requests": 107}])
    shown, out = console()
    last = await drain([await serve(billing), await serve(tracker)], shown, within_s=10)
    assert last.idle
    said = out.getvalue()
    assert "7 requests open, 49 records not handled yet, 5 events not published yet" in said
    assert "drained in" in said and "7 requests were open, 7 finished since, 0 still open" in said
    assert billing.asked >= 4  # idle twice in a row before it believes it


async def test_the_drain_is_bounded_and_says_what_is_left(serve) -> None:  # type: ignore[no-untyped-def]
    stuck = FakeService([{"unhandled": 12, "unpublished": 0, "open_requests": 5, "finished_requests": 0}])
    shown, out = console()
    last = await drain([await serve(stuck)], shown, within_s=0.6)
    assert not last.idle
    said = out.getvalue()
    assert "drain stopped after 1 s: 5 requests were open, 0 finished since, 5 still open; 12 records not " \
           "handled" in said


async def test_a_second_ctrl_c_stops_the_drain_at_once(serve) -> None:  # type: ignore[no-untyped-def]
    busy = FakeService([{"unhandled": 1, "unpublished": 0}])
    hurry = asyncio.Event()
    shown, out = console()
    asyncio.get_running_loop().call_later(0.3, hurry.set)
    started = asyncio.get_running_loop().time()
    await drain([await serve(busy)], shown, within_s=20, hurry=hurry)
    assert asyncio.get_running_loop().time() - started < 2
    assert "drain stopped at once" in out.getvalue()


async def test_a_service_that_does_not_answer_is_not_taken_for_idle(serve) -> None:  # type: ignore[no-untyped-def]
    idle = FakeService([{"unhandled": 0, "unpublished": 0}])
    shown, out = console()
    last = await drain([await serve(idle), f"http://127.0.0.1:{free_port()}"], shown, within_s=0.6)
    assert not last.idle
    assert "? records not handled" in out.getvalue()
