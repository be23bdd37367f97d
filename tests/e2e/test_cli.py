"""The README's "Using it" commands against a running stack, as a user types them: `cancelflow sample` gives
the stack something to cancel, `cancelflow cancel --wait` prints the outcome and says by its exit code
whether the request completed, and `cancelflow status` prints a request again."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def cli(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cancelflow_tools", *args], capture_output=True, text=True, timeout=120,
                          env={**stack.env, "COLUMNS": "300"})


def said(run: subprocess.CompletedProcess[str]) -> str:
    return " ".join(run.stdout.split())


def test_the_readme_commands_load_cancel_and_show_a_request(stack: Any, ids: dict[str, str]) -> None:
    account, sub = ids["account"], f"sub-cli-{ids['tag']}"
    loaded = cli(stack, "sample", "--account", account, "--subscription", sub)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert f"ch-{sub}" in said(loaded) and "1 at 30.00 USD" in said(loaded)

    done = cli(stack, "cancel", "--account", account, "--subscription", sub, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "completed" in said(done) and "Status is set to canceled with effective date" in said(done)
    request_id = re.search(r"published CancellationRequested (\S+)", said(done)).group(1)  # type: ignore[union-attr]
    shown = cli(stack, "status", request_id)
    assert shown.returncode == 0 and "completed" in said(shown)

    # The same subscription again: rejected, and the exit code says the request did not complete.
    again = cli(stack, "cancel", "--account", account, "--subscription", sub, "--wait")
    assert again.returncode == 1, again.stdout + again.stderr
    assert "rejected" in said(again) and "not_active" in said(again)

    # An end-of-term request: --wait returns once it is scheduled, which is not a failure.
    later = f"sub-cli-eot-{ids['tag']}"
    assert cli(stack, "sample", "--account", account, "--subscription", later).returncode == 0
    scheduled = cli(stack, "cancel", "--account", account, "--subscription", later, "--mode", "end_of_term", "--wait")
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    assert "scheduled" in said(scheduled)

    # A past-dated one, with a date in the sample's period (it began ten days ago).
    past = f"sub-cli-pd-{ids['tag']}"
    assert cli(stack, "sample", "--account", account, "--subscription", past).returncode == 0
    effective = (datetime.now(UTC).date() - timedelta(days=5)).isoformat()
    dated = cli(stack, "cancel", "--account", account, "--subscription", past, "--mode", "past_dated",
                "--effective-date", effective, "--wait")
    assert dated.returncode == 0, dated.stdout + dated.stderr
    assert f"Status is set to canceled with effective date {effective}" in said(dated)


def test_the_readme_commands_dispute_charges_taken_twice(stack: Any, ids: dict[str, str]) -> None:
    account, sub = ids["account"], f"sub-cli-dup-{ids['tag']}"
    loaded = cli(stack, "sample", "--account", account, "--subscription", sub, "--duplicate-charges", "1")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert f"ch-{sub}-2" in said(loaded)

    disputed = cli(stack, "cancel", "--account", account, "--charge", f"ch-{sub}-2", "--wait")
    assert disputed.returncode == 0, disputed.stdout + disputed.stderr
    assert "completed" in said(disputed) and "30.00" in said(disputed)
