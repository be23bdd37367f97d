"""`cancelflow bench` end to end, small: a burst and a paced run finish, every invariant holds over what
they left, and the JSON line carries the figures; the same with two instances of every service
(scale-out); and a SIGTERM stops the run together with the stack it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cancelflow.settings import CommonSettings
from cancelflow_tools.stack.embedded import running_stack
from cancelflow_tools.testing.stack import StackProcess
from tests.scripts import load_script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FIGURES = {"throughput_per_s", "baseline_per_s", "ratio", "p50_ms", "p99_ms", "p99_ms_paced", "rss_mb"}


def bench_figures(tmp_path: Path, *options: str) -> dict:
    """Run `cancelflow bench OPTIONS --json` to the end; the figures of its last line."""
    run = subprocess.run([sys.executable, "-m", "cancelflow_tools", "bench", *options, "--json", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_bench_run_is_correct_and_reports_its_figures(tmp_path: Path) -> None:
    figures = bench_figures(tmp_path, "--requests", "24", "--paced", "12", "--rate", "20")
    assert FIGURES <= figures.keys()
    assert figures["instances"] == 1 and figures["correct"] is True and figures["violations"] == {}
    # the embedded stack as `cancelflow up` runs it, not the test stack's shorter fetch wait
    assert figures["fetch_wait_ms"] == CommonSettings().fetch_max_wait_ms
    assert figures["throughput_per_s"] > 0 and figures["baseline_per_s"] > 0
    assert figures["p50_ms"] <= figures["p99_ms"]
    assert set(figures["rss_mb"]) == {"billing", "provisioning", "payment_gateway", "dispute", "notification",
                                      "status_tracker", "broker"}
    assert figures["cpu_s"]["broker"] > 0  # what the broker costs is part of the picture
    # and so is what else shares the cores during the burst
    assert set(figures["cpu_s_harness"]) == {"bench (load generator)", "SMTP sink", "vendor sandbox",
                                             "gateway sandbox", "stack supervisor"}
    assert figures["cpu_s_harness"]["bench (load generator)"] > 0
    # per request, in the burst and in the paced run, for every process of both kinds
    everyone = figures["cpu_s"].keys() | figures["cpu_s_harness"].keys()
    assert figures["cpu_ms_per_request"].keys() == figures["cpu_ms_per_request_paced"].keys() == everyone
    assert sum(figures["cpu_ms_per_request_paced"].values()) > 0
    # the broker's paced cost per request while each half of the paced run was sent (6 requests each);
    # what it spent after the last send (the drain) is in neither half
    first, second = figures["broker_ms_per_request_paced_halves"]
    assert first > 0 and second > 0
    assert (first + second) / 2 <= figures["cpu_ms_per_request_paced"]["broker"] + 0.01
    # what recording each accepted email as sent costs (a transaction per email), in both runs
    assert figures["email_record_ms"] > 0 and figures["email_record_ms_paced"] > 0
    assert figures["steps_ms"], "the per-step breakdown is missing"
    # the saga events of a cancellation, in order: what scripts/kafka_floor.py's stand-ins publish
    assert [step.split(" -> ")[1] for step in figures["steps_ms"]] == list(load_script("kafka_floor").SAGA_STEPS)
    # what the figures were taken on, and how fast it ran Python before and after the runs
    box = figures["machine"]
    assert box["cores"] == os.cpu_count() and box["cpu"] and box["python"]
    assert len(box["reference_us"]) == 2 and all(us > 0 for us in box["reference_us"])


def test_two_instances_of_every_service_finish_the_run_correctly(tmp_path: Path) -> None:
    figures = bench_figures(tmp_path, "--requests", "40", "--paced", "0", "--instances", "2", "--fetch-wait-ms", "50")
    assert figures["fetch_wait_ms"] == 50
    assert figures["instances"] == 2 and figures["correct"] is True and figures["violations"] == {}
    assert {"billing#2", "status_tracker#2"} <= figures["cpu_s"].keys()


def test_a_running_stack_is_measured_and_left_running(tmp_path: Path) -> None:
    """`--running` measures the stack `cancelflow up` runs with this environment instead of starting one."""
    stack = StackProcess(tmp_path / "stack").start()
    command = [sys.executable, "-m", "cancelflow_tools", "bench", "--running", "--requests", "12", "--paced", "0", "--json"]
    try:
        run = subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        assert figures["correct"] is True and figures["throughput_per_s"] > 0
        assert figures["fetch_wait_ms"] == stack.settings.fetch_max_wait_ms  # the running stack's, not ours
        assert set(figures["rss_mb"]) == {"billing", "provisioning", "payment_gateway", "dispute", "notification",
                                          "status_tracker", "broker"}
        assert "stack supervisor" in figures["cpu_s_harness"]
        assert running_stack(stack.settings) is not None, "the bench stopped a stack it did not start"
    finally:
        stack.stop()
    refused = subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no stack is running" in refused.stderr


def _processes_of(run_dir: Path) -> list[int]:
    """Processes whose environment names the run's data directory: the stack's."""
    needle = f"CANCELFLOW_DATA_DIR={run_dir}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _until(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return bool(condition())


def test_sigterm_stops_the_run_and_the_stack_it_started(tmp_path: Path) -> None:
    bench = subprocess.Popen([sys.executable, "-m", "cancelflow_tools", "bench", "--requests", "200", "--paced", "0",
                              "--data-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _until(lambda: any("service started" in log.read_text()
                                  for log in tmp_path.glob("bench-*/logs/billing.log")), 120), "no stack came up"
        run_dir = next(tmp_path.glob("bench-*"))
        assert _processes_of(run_dir), "the stack's processes are not found"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        assert _until(lambda: not _processes_of(run_dir), 30), f"left running: {_processes_of(run_dir)}"
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _processes_of(next(iter(tmp_path.glob("bench-*")), tmp_path)):
            os.kill(pid, signal.SIGKILL)
