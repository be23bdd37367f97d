"""`cancelflow bench` end to end, small: a burst and a paced run finish, every invariant holds over what
they left, and the JSON line carries the figures.

Two instances of every service (`--instances 2`) are not run here: on the embedded broker a group
member can silently lose its partitions after a rebalance (README, Performance), so that run is not
yet reliable enough for CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FIGURES = {"throughput_per_s", "baseline_per_s", "ratio", "p50_ms", "p99_ms", "p99_ms_paced", "rss_mb"}


def test_a_bench_run_is_correct_and_reports_its_figures(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cancelflow", "bench", "--requests", "24", "--paced", "12", "--rate", "20",
         "--json", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert FIGURES <= figures.keys()
    assert figures["instances"] == 1 and figures["correct"] is True and figures["violations"] == {}
    assert figures["throughput_per_s"] > 0 and figures["baseline_per_s"] > 0
    assert figures["p50_ms"] <= figures["p99_ms"]
    assert set(figures["rss_mb"]) == {"billing", "provisioning", "payment_gateway", "dispute", "notification",
                                      "status_tracker", "broker"}
    assert figures["cpu_s"]["broker"] > 0  # what the broker costs is part of the picture
    assert figures["steps_ms"], "the per-step breakdown is missing"
