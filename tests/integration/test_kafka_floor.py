"""scripts/kafka_floor.py, small: its six stand-in services, on a broker of their own, carry every request to
its six status records, and the script reports the CPU of each process (docs/performance.md, item 33). That the
stand-ins move what a real cancellation moves is checked against a real run in tests/e2e/test_bench.py."""

from __future__ import annotations

import asyncio
import io
import sys

import pytest
from rich.console import Console

from tests.scripts import ROOT, load_script

pytestmark = pytest.mark.timeout(180)


def test_the_floor_script_carries_every_request_and_reports_each_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # its processes are spawned: they import the script by name, with the test's sys.path
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = load_script("kafka_floor")
    monkeypatch.setitem(sys.modules, "kafka_floor", script)
    elapsed, cpu = asyncio.run(script.measure(30, None, 25, Console(file=io.StringIO())))
    assert elapsed > 0
    assert cpu.keys() == {*script.SERVICES, "broker", "load generator and status reader"}
    # /proc counts CPU in ticks of 10 ms: a small run may show 0 for a process, not less, and not 0 for all
    assert all(seconds >= 0 for seconds in cpu.values()) and sum(cpu.values()) > 0, cpu


def test_each_saga_event_has_one_publisher_and_the_chain_is_whole() -> None:
    script = load_script("kafka_floor")
    published = [step for _, publishes in script.SERVICES.values() for steps in publishes.values() for step in steps]
    assert sorted(published) == sorted(script.SAGA_STEPS)
    # every step but the first ones (published for the request) is published for an earlier step
    triggers = {trigger for _, publishes in script.SERVICES.values() for trigger in publishes}
    assert triggers - {""} <= set(script.SAGA_STEPS[:-1])

