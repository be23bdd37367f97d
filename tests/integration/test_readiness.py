"""Ready means consuming (issue 24, item 6): `/readyz` answers 503 until the service's consumer has joined
its group and holds its assignment, and `cancelflow up` waits for exactly that."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from billing.bootstrap import build
from cancelflow.settings import CommonSettings
from cancelflow_tools.stack.embedded import stack_specs
from tests.conftest import RunningService, _commit_at_end

pytestmark = pytest.mark.timeout(120)


async def test_readyz_is_503_until_the_consumer_has_its_partitions(services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = services.configure("billing", f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}")
    runtime = build()
    runtime.group_id = f"readiness-{uuid.uuid4().hex[:8]}"
    await _commit_at_end(services.broker.bootstrap, runtime.group_id, [r.topic for r in runtime.routes])
    stop = asyncio.Event()
    services.running.append(RunningService(runtime, asyncio.create_task(runtime.run(stop)), stop))

    def assigned() -> set[object]:
        return set(runtime.consumer.assignment()) if runtime.consumer else set()

    answers = []
    async with aiohttp.ClientSession() as http:
        while True:
            before = assigned()
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    status, body = response.status, await response.json()
            except aiohttp.ClientConnectionError:  # not listening yet
                await asyncio.sleep(0.01)
                continue
            answers.append(status)
            if not before and not assigned():
                assert status == 503, f"ready before the consumer had any partition: {body}"
            if status == 200:
                assert assigned(), "ready without an assignment"
                break
            assert len(answers) < 5000, "never ready"
    # The service answers on HTTP before it joins its group (Tansu takes about half a session timeout).
    assert answers[0] == 503


def test_up_waits_for_every_service_to_be_ready(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The supervisor waits on each service's /readyz (not /healthz, which answers before the join)."""
    specs = stack_specs(CommonSettings(data_dir=tmp_path), {})
    services = [s for s in specs if not s.name.endswith("sandbox") and s.name != "smtp-sink"]
    assert services and all(s.ready_url and s.ready_url.endswith("/readyz") for s in services)
