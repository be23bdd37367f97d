"""The fault suite's CI subset: a short chaos run (every named crash point, kill -9 of random services,
the broker paused, SMTP down, poison records, duplicates, out-of-order decisions, vendor and gateway
faults), then every invariant over the topics, ledgers, mailbox and databases. `cancelflow chaos
--duration 600` is the long form."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cancelflow.chaos import CRASH_POINTS, SERVICES, ChaosConfig, ChaosRun, chaos_env
from cancelflow.testing.smtp import RecordingSMTPServer
from cancelflow.testing.stack import StackProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def chaos_stack(tmp_path) -> Iterator[tuple[StackProcess, RecordingSMTPServer]]:  # type: ignore[no-untyped-def]
    with RecordingSMTPServer() as smtp:
        stack = StackProcess(tmp_path / "chaos", extra_env=chaos_env(smtp.port))
        stack.start()
        try:
            yield stack, smtp
        finally:
            assert stack.stop() == 0


@pytest.mark.timeout(600)
async def test_a_short_chaos_run_keeps_every_promise(chaos_stack) -> None:  # type: ignore[no-untyped-def]
    stack, smtp = chaos_stack
    # kill -9 of the status tracker is left to the test below: it can lose a request (a known bug).
    config = ChaosConfig(duration_s=20, rate_per_s=3, kill_every_s=7, smtp_outage_s=4, broker_pause_s=3,
                         rebalance_s=5, poison_every=6, settle_timeout_s=90,
                         kill_targets=tuple(s for s in SERVICES if s != "status_tracker"))

    result = await ChaosRun(stack, smtp, config).run()

    # Every money, email, dead-letter and transition promise is asserted strictly. A request left
    # without a terminal status is the open tracker bug (issue 7, README "Known bug"): it is reported
    # as an expected failure with the requests it hit, not hidden and not failing every build.
    known = "every accepted request ends in one terminal state"
    others = {k: v[:3] for k, v in result.report.violations.items() if v and k != known}
    assert not others, others
    assert set(result.crash_points_fired) == set(CRASH_POINTS)
    assert result.faults["SMTP down"] == 1 and result.faults["broker paused (SIGSTOP)"] == 1
    assert sum(v for k, v in result.faults.items() if k.startswith("kill -9")) >= 2
    assert any(k.startswith("rebalance") for k in result.faults)
    assert any(k.startswith("replay of cancellations.requested") for k in result.faults)
    assert sum(v for k, v in result.faults.items() if k.startswith("poison")) == result.requests // 6
    assert result.requests == 60
    if result.report.violations.get(known):
        lost = result.report.violations[known]
        pytest.xfail(f"known tracker bug: {len(lost)} of 60 requests without a terminal status: {lost[:3]}")
    assert sum(result.outcomes.values()) == 60


@pytest.mark.xfail(strict=False, reason=(
    "known bug: the faust status tracker, killed with -9, can skip a saga event it had not applied (seen "
    "in 35 of 1,800 requests over a 10-minute chaos run: no status at all, while billing, payment and "
    "notification completed them); timing-dependent, so not strict"))
@pytest.mark.timeout(600)
async def test_killing_the_status_tracker_loses_no_request(chaos_stack) -> None:  # type: ignore[no-untyped-def]
    stack, smtp = chaos_stack
    config = ChaosConfig(duration_s=12, rate_per_s=3, kill_every_s=3, poison_every=1000, replay=False,
                         settle_timeout_s=20, kill_targets=("status_tracker",))

    result = await ChaosRun(stack, smtp, config).run()

    assert result.faults["kill -9 status_tracker"] >= 2
    assert result.report.ok, {k: v[:3] for k, v in result.report.violations.items() if v}
