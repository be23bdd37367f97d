"""scripts/broker_fetch_cost.py, small: it runs a broker of its own, measures at each point asked for, and
counts the fetches that brought records (what item 29 of docs/performance.md divides by). The figures themselves
are the script's to print, not a test's to time."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from rich.console import Console

from tests.scripts import load_script


def test_the_fetch_cost_script_measures_each_point(tmp_path: Path) -> None:
    script = load_script("broker_fetch_cost")
    rows = asyncio.run(script.measure([0, 30], 1.0, str(tmp_path), Console(file=io.StringIO())))
    assert [row[0] for row in rows] == [0, 30]
    for _held, cpu_percent, fetches_per_s, cpu_per_fetch_us in rows:
        assert fetches_per_s > 0, "no fetch brought the records the producer added"
        assert cpu_percent >= 0 and cpu_per_fetch_us >= 0
