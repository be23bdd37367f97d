"""Routes keyed by event class (cancelflow.messaging.dispatch): what `on` refuses, what `dispatch` runs,
and that mypy rejects a handler registered for an event it is not typed with."""

from __future__ import annotations

import textwrap
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api

from cancelflow import topics
from cancelflow.events import ChargeCaptured, Payload, RequestStuck, SagaEvent, VendorProvisioned
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext, Route, dispatch
from cancelflow_tools.testing.messages import message

ROOT = Path(__file__).resolve().parents[2]


def provisioned() -> Message[VendorProvisioned]:
    return message(VendorProvisioned(request_id=uuid.uuid4(), subscription_id="sub-1", vendor="acme",
                                     vendor_subscription_id="V-1", new_quantity=0))


async def test_dispatch_runs_the_handler_of_the_messages_class_and_says_when_there_is_none() -> None:
    seen: list[tuple[str, Any]] = []

    async def on_provisioned(msg: Message[VendorProvisioned], ctx: HandlerContext) -> None:
        seen.append((msg.payload.vendor_subscription_id, ctx))

    route = Route(topics.SAGA).on(VendorProvisioned, on_provisioned)
    context: Any = object()
    assert route.handles("VendorProvisioned") and not route.handles("RequestStuck")
    assert await dispatch(route, provisioned(), context) is True
    assert seen == [("V-1", context)]
    stuck = message(RequestStuck(request_id=uuid.uuid4(), stage="in_progress", since=datetime.now(UTC),
                                 stuck_for_seconds=60))
    assert await dispatch(route, stuck, context) is False
    assert len(seen) == 1


async def test_one_handler_for_several_events() -> None:
    seen: list[str] = []

    async def timeline(msg: Message[SagaEvent], ctx: HandlerContext) -> None:
        seen.append(msg.event_type)

    route = Route(topics.SAGA).on_each([VendorProvisioned, RequestStuck], timeline)
    context: Any = object()
    assert await dispatch(route, provisioned(), context)
    assert seen == ["VendorProvisioned"] and route.handles("RequestStuck")


def test_a_route_refuses_an_event_of_another_topic_and_a_second_handler() -> None:
    async def handler(msg: Message[Payload], ctx: HandlerContext) -> None:
        return None

    with pytest.raises(ValueError, match="published on"):
        Route(topics.SAGA).on(ChargeCaptured, handler)
    with pytest.raises(ValueError, match="already has a handler"):
        Route(topics.SAGA).on(VendorProvisioned, handler).on(VendorProvisioned, handler)


def test_mypy_rejects_a_handler_typed_with_another_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the config's paths are the repository's
    source = tmp_path / "wrong_route.py"
    source.write_text(textwrap.dedent("""
        from cancelflow import topics
        from cancelflow.events import RequestStuck, VendorProvisioned
        from cancelflow.messaging.codec import Message
        from cancelflow.messaging.dispatch import HandlerContext, Route

        async def on_stuck(msg: Message[RequestStuck], ctx: HandlerContext) -> None:
            print(msg.payload.stuck_for_seconds)

        Route(topics.SAGA).on(RequestStuck, on_stuck)  # agrees
        Route(topics.SAGA).on(VendorProvisioned, on_stuck)  # does not
    """))
    out, _err, status = mypy_api.run([
        "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
        "--follow-imports", "silent", str(source)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1, out
    assert len(errors) == 1 and "wrong_route.py:11:" in errors[0], out
