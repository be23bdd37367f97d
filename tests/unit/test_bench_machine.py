"""The bench says what machine its figures were taken on, and how fast that machine ran Python."""

from __future__ import annotations

import gc
import os
import platform

import pytest
from rich.console import Console

from cancelflow_tools import bench


def test_the_reference_is_time_per_unit_of_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock that advances 10 us per unit of work: the figure is per unit whatever the count (a total
    # would grow with it), without timing this machine in a unit test.
    now = [0.0]
    encode = bench.json.dumps

    def costly_dumps(*args: object, **kwargs: object) -> str:
        now[0] += 10e-6
        return encode(*args, **kwargs)

    monkeypatch.setattr(bench.json, "dumps", costly_dumps)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    assert bench.reference_us(units=20, repeat=3) == 10.0
    assert bench.reference_us(units=200, repeat=3) == 10.0
    assert gc.isenabled()  # switched off while timing, and back on


def test_the_reference_leaves_a_collector_that_was_off_off() -> None:
    gc.disable()
    try:
        bench.reference_us(units=5, repeat=1)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_machine_is_described_and_shown_under_the_figures() -> None:
    box = bench.machine()
    assert box["cores"] == os.cpu_count()
    assert box["python"] == platform.python_version()
    assert box["cpu"] and box["memory_gib"] > 0 and len(box["reference_us"]) == 1
    burst = bench.Measured(requests=2, seconds=1.0, latencies_ms=[10.0, 20.0], cpu_s={"billing": 0.1})
    result = bench.BenchResult(burst, None, 100.0, {"billing": bench.ProcessUsage(0.1, 80.0)},
                               machine={**box, "reference_us": [150.0, 180.5]})
    assert result.summary()["machine"]["reference_us"] == [150.0, 180.5]
    console = Console(record=True, width=200)
    bench.render(result, console)
    shown = console.export_text()
    assert f"on {box['cores']} cores ({box['cpu']}" in shown
    assert "reference 150.0 then 180.5 µs" in shown
