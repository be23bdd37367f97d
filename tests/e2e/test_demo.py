"""`cancelflow demo`, what the README's first command runs: on a data dir with no stack it starts the
embedded stack, runs the release note's three scenarios and a past-dated cancellation, shows each
outcome with its history in the release note's words, and stops the stack again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cancelflow_tools.stack.embedded import running_stack
from cancelflow_tools.testing.stack import StackProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SEED_VENDOR = "Subscription failed to cancel due to Provisioning Error. Please try to cancel the subscription again."
SEED_PLATFORM = ("The subscription cancellation process has encountered an error on our Platform. "
                 "Please contact your administrator")


def test_the_demo_starts_a_stack_runs_every_scenario_and_stops_it(tmp_path: Path) -> None:
    # The environment of a test stack (free ports, this data dir), but the demo starts the stack itself.
    stack = StackProcess(tmp_path)
    run = subprocess.run([sys.executable, "-m", "cancelflow_tools", "demo"], capture_output=True, text=True,
                         timeout=240, env={**stack.env, "COLUMNS": "400"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    said = " ".join(run.stdout.split())
    assert "all four scenarios ended as the release note describes" in said
    assert SEED_VENDOR in said and SEED_PLATFORM in said
    assert "Status is set to canceled with effective date" in said
    assert "email to support: [cancelflow] Platform failure after vendor cancellation" in said
    assert sorted(p.name for p in tmp_path.glob("*.db")), "the demo's stack did not keep its data in its data dir"
    assert running_stack(stack.settings) is None, "the demo's own stack was left running"
